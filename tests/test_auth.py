"""API-key authentication through the real api, and the `durachat keys` commands that manage keys."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import uuid
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from storage import api_keys
from tests.conftest import Tenant, process_environment
from tests.support.processes import REPO_ROOT

UNKNOWN_CHAT = "/v1/chats/no-such-chat"


def assert_unauthorized_problem(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"] == "Bearer"
    problem = response.json()
    assert problem["status"] == 401
    assert problem["type"]
    assert problem["title"] == "Unauthorized"
    assert problem["detail"]


async def test_valid_key_reaches_authenticated_endpoint(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.get(UNKNOWN_CHAT, headers=tenant.headers)

    # Past authentication: the chat lookup itself answers.
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": "Bearer dck_not-a-real-key"}, id="wrong-key"),
        pytest.param({}, id="missing-header"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic-scheme"),
        pytest.param({"Authorization": "Bearer"}, id="scheme-without-key"),
    ],
)
async def test_request_without_valid_key_is_unauthorized_problem(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    assert_unauthorized_problem(await client.get(UNKNOWN_CHAT, headers=headers))


async def test_non_bearer_scheme_with_a_valid_secret_is_unauthorized(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    headers = {"Authorization": f"Token {tenant.secret}"}
    assert_unauthorized_problem(await client.get(UNKNOWN_CHAT, headers=headers))


async def test_revoked_key_is_refused_on_the_very_next_request(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert (await client.get(UNKNOWN_CHAT, headers=tenant.headers)).status_code == 404

    async with sessions.begin() as session:
        assert await api_keys.revoke_key(session, tenant.key_id)

    assert_unauthorized_problem(await client.get(UNKNOWN_CHAT, headers=tenant.headers))


async def test_only_a_sha256_of_the_secret_is_stored(
    tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with sessions() as session:
        row = (
            (
                await session.execute(
                    text("SELECT * FROM api_key WHERE id = :id"), {"id": tenant.key_id}
                )
            )
            .mappings()
            .one()
        )

    assert row["secret_sha256"] == hashlib.sha256(tenant.secret.encode()).hexdigest()
    assert not any(tenant.secret in str(value) for value in row.values())
    # What is shown to tell keys apart is a short stub, not enough to use the key.
    assert tenant.secret.startswith(row["display_prefix"])
    assert len(row["display_prefix"]) < len(tenant.secret) // 2


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(settings: Settings, *args: str) -> CliResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, **process_environment(settings)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


def parse_created_key(output: str) -> tuple[str, str]:
    key_id = re.search(r"^key id:\s+(\S+)$", output, re.MULTILINE)
    secret = re.search(r"^secret:\s+(\S+)$", output, re.MULTILINE)
    assert key_id is not None, output
    assert secret is not None, output
    return key_id.group(1), secret.group(1)


async def test_cli_key_lifecycle_create_list_revoke(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    organization = f"cli-org-{uuid.uuid4().hex[:8]}"

    created = await run_cli(settings, "keys", "create", "--org", organization, "--user", "ada")
    assert created.returncode == 0, created.stderr
    key_id, secret = parse_created_key(created.stdout)
    assert created.stdout.count(secret) == 1
    assert "not shown again" in created.stderr
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await client.get(UNKNOWN_CHAT, headers=headers)).status_code == 404

    listed = await run_cli(settings, "keys", "list", "--org", organization)
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.startswith(key_id)
    assert "user ada" in line
    assert "active" in line
    assert secret not in listed.stdout + listed.stderr

    revoked = await run_cli(settings, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert_unauthorized_problem(await client.get(UNKNOWN_CHAT, headers=headers))

    relisted = await run_cli(settings, "keys", "list", "--org", organization)
    assert "revoked" in relisted.stdout


async def test_cli_revoking_unknown_key_fails_with_clear_message(settings: Settings) -> None:
    result = await run_cli(settings, "keys", "revoke", "no-such-key")

    assert result.returncode != 0
    assert "no active key with id no-such-key" in result.stderr


async def test_cli_listing_unknown_organization_fails_with_clear_message(
    settings: Settings,
) -> None:
    result = await run_cli(settings, "keys", "list", "--org", f"absent-{uuid.uuid4().hex[:8]}")

    assert result.returncode != 0
    assert "no organization named" in result.stderr


async def test_cli_keys_are_admin_keys_unless_bound_to_a_user(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    organization = f"cli-org-{uuid.uuid4().hex[:8]}"
    admin = await run_cli(settings, "keys", "create", "--org", organization)
    user = await run_cli(settings, "keys", "create", "--org", organization, "--user", "ada")
    assert (admin.returncode, user.returncode) == (0, 0), admin.stderr + user.stderr
    _, admin_secret = parse_created_key(admin.stdout)
    user_key_id, user_secret = parse_created_key(user.stdout)

    listed = await client.get("/v1/keys", headers={"Authorization": f"Bearer {admin_secret}"})
    assert listed.status_code == 200, listed.text
    user_key = next(item for item in listed.json()["items"] if item["id"] == user_key_id)
    assert (user_key["userId"], user_key["admin"]) == ("ada", False)
    refused = await client.get("/v1/keys", headers={"Authorization": f"Bearer {user_secret}"})
    assert refused.status_code == 403, refused.text


async def test_cli_refuses_an_admin_key_bound_to_a_user(settings: Settings) -> None:
    organization = f"cli-org-{uuid.uuid4().hex[:8]}"

    result = await run_cli(
        settings, "keys", "create", "--org", organization, "--user", "ada", "--admin"
    )

    assert result.returncode != 0
    assert "a key bound to a user cannot be an admin key" in result.stderr
    assert "secret:" not in result.stdout
    listed = await run_cli(settings, "keys", "list", "--org", organization)
    assert "no organization named" in listed.stderr
