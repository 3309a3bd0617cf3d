"""MCP toolkits against a real MCP server (the SDK's own, tests/support/mcp_server.py) and the real api:
admins register, read, change and delete toolkits behind the organization wall; secrets are
write-only and sealed at rest; the outbound guard refuses private servers; `/tools` lists a server's
tools live; the client calls tools, sends the token, and tells final failures from passing ones."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_tools.base import ToolFailed
from agent_tools.mcp import (
    EXPOSED_NAME_PATTERN,
    McpToolkits,
    ToolkitConnection,
    UnknownFunctions,
    exposed_tool_name,
)
from core.secrets import SecretBox
from core.settings import Settings
from outbound.guard import OutboundPolicy
from storage import api_keys, toolkits
from storage.models import Toolkit
from storage.toolkits import ToolkitSecrets
from tests.conftest import REMOTE_FILES_HOST, Tenant, make_tenant
from tests.support.chat_api import assert_problem
from tests.support.mcp_server import McpTestServer

Sessions = async_sessionmaker[AsyncSession]

TOKEN = "mcp-test-token-0123456789abcdef"
HEADER_VALUE = "acme-header-secret-9876"
TOOLKITS_URL = "/v1/toolkits"
SERVER_TOOLS = ["add", "lookup", "fail", "slow", "secret_admin"]


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    # On the one private address the test stack's outbound guard lets through.
    with McpTestServer(REMOTE_FILES_HOST, token=TOKEN) as server:
        yield server


@pytest.fixture
def mcp() -> McpToolkits:
    return McpToolkits(
        OutboundPolicy.parse([REMOTE_FILES_HOST]),
        call_timeout_seconds=2,
        list_timeout_seconds=5,
    )


def connection(server: McpTestServer, **overrides: Any) -> ToolkitConnection:
    fields: dict[str, Any] = {
        "id": "tk_test",
        "name": "glossary",
        "url": server.url,
        "headers": {"X-Tenant": HEADER_VALUE},
        "token": TOKEN,
    }
    return ToolkitConnection(**{**fields, **overrides})


class Statuses:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, status: str) -> None:
        self.seen.append(status)


def toolkit_body(server: McpTestServer, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "glossary",
        "description": "Terms and their meanings",
        "url": server.url,
        "headers": {"X-Tenant": HEADER_VALUE},
        "token": TOKEN,
        "allowedTools": ["add", "lookup", "fail"],
        "approvalTools": ["lookup"],
        **overrides,
    }


def assert_no_secret(response: httpx.Response) -> None:
    assert TOKEN not in response.text
    assert HEADER_VALUE not in response.text


async def create(client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(TOOLKITS_URL, json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


# --- the client, against the server directly -------------------------------------------------------


def test_exposed_names_fit_the_tool_name_pattern_and_stay_distinct() -> None:
    plain = exposed_tool_name("glossary", "lookup")
    dotted = exposed_tool_name("glossary", "look.up")
    underscored = exposed_tool_name("glossary", "look_up")
    long = exposed_tool_name("a" * 31, "b" * 100)

    assert plain == "glossary__lookup"
    assert underscored == "glossary__look_up"
    assert dotted.startswith("glossary__look_up_")
    assert dotted != underscored
    for name in (plain, dotted, underscored, long):
        assert re.fullmatch(EXPOSED_NAME_PATTERN, name), name
    assert len(long) == 64
    assert exposed_tool_name("a" * 31, "b" * 101) != long


async def test_list_tools_applies_the_allow_list_and_marks_tools_needing_approval(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    everything = await mcp.list_tools(connection(mcp_server, approval_tools=["*"]))
    allowed = await mcp.list_tools(
        connection(mcp_server, allowed_tools=["add", "lookup"], approval_tools=["lookup"])
    )

    assert [tool.tool_name for tool in everything] == SERVER_TOOLS
    assert all(tool.needs_approval for tool in everything)
    assert [(tool.name, tool.needs_approval) for tool in allowed] == [
        ("glossary__add", False),
        ("glossary__lookup", True),
    ]
    add = allowed[0].definition
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert add.input_schema["properties"]["a"]["type"] == "integer"


async def test_call_tool_answers_text_and_structured_content_and_says_what_it_does(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    statuses = Statuses()

    outcome = await mcp.call_tool(connection(mcp_server), "add", {"a": 2, "b": 40}, statuses)

    assert outcome.output == {"text": "42", "structuredContent": {"result": 42}}
    json.dumps(outcome.output)  # stored whole in the message's tool part
    assert statuses.seen == ["calling glossary.add"]
    assert mcp_server.called("add")[-1].arguments == {"a": 2, "b": 40}


async def test_the_token_goes_as_a_bearer_and_the_headers_as_they_are(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    before = len(mcp_server.headers_seen)

    await mcp.call_tool(connection(mcp_server), "lookup", {"term": "durable"}, Statuses())

    sent = mcp_server.headers_seen[before:]
    assert sent
    assert {headers.get("authorization") for headers in sent} == {f"Bearer {TOKEN}"}
    assert {headers.get("x-tenant") for headers in sent} == {HEADER_VALUE}


async def test_an_is_error_result_is_a_final_failure_carrying_the_tools_text(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    with pytest.raises(ToolFailed) as failed:
        await mcp.call_tool(connection(mcp_server), "fail", {}, Statuses())

    assert failed.value.retryable is False
    assert "the glossary service is down for maintenance" in failed.value.message


async def test_a_server_that_is_down_is_a_retryable_failure(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    # A port of the allowed address nothing listens on.
    down = connection(mcp_server, url=f"http://{REMOTE_FILES_HOST}:1/mcp")

    with pytest.raises(ToolFailed) as failed:
        await mcp.call_tool(down, "add", {"a": 1, "b": 2}, Statuses())

    assert failed.value.retryable is True
    assert "could not be reached" in failed.value.message


async def test_a_5xx_is_retryable_and_a_refused_token_is_final(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    mcp_server.fail_http(503, times=2)
    with pytest.raises(ToolFailed) as unavailable:
        await mcp.call_tool(connection(mcp_server), "add", {"a": 1, "b": 2}, Statuses())
    mcp_server.fail_http(503, times=0)

    with pytest.raises(ToolFailed) as refused:
        await mcp.call_tool(
            connection(mcp_server, token="not-the-token"), "add", {"a": 1, "b": 2}, Statuses()
        )

    assert (unavailable.value.retryable, unavailable.value.message) == (
        True,
        "glossary answered HTTP 503",
    )
    assert refused.value.retryable is False
    assert "refused the toolkit's credentials (HTTP 401)" in refused.value.message
    assert "not-the-token" not in refused.value.message


async def test_a_call_longer_than_the_call_timeout_is_a_retryable_failure(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    started = time.monotonic()

    with pytest.raises(ToolFailed) as failed:
        await mcp.call_tool(connection(mcp_server), "slow", {"seconds": 30}, Statuses())

    assert failed.value.retryable is True
    assert failed.value.message == "glossary did not answer within 2 s"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "169.254.169.254", "[::1]"], ids=["loopback", "metadata", "ipv6-loopback"]
)
async def test_a_server_on_a_refused_address_fails_finally_before_any_connection(
    mcp: McpToolkits, mcp_server: McpTestServer, host: str
) -> None:
    before = len(mcp_server.headers_seen)
    refused = connection(mcp_server, url=f"http://{host}:{mcp_server.port}/mcp")

    with pytest.raises(ToolFailed) as listing:
        await mcp.list_tools(refused)
    with pytest.raises(ToolFailed) as calling:
        await mcp.call_tool(refused, "add", {"a": 1, "b": 2}, Statuses())

    for failed in (listing.value, calling.value):
        assert failed.retryable is False
        assert "not allowed" in failed.message
    assert len(mcp_server.headers_seen) == before


async def test_a_tool_outside_the_allow_list_is_refused_without_calling_the_server(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    before = len(mcp_server.called("secret_admin"))

    with pytest.raises(ToolFailed) as failed:
        await mcp.call_tool(
            connection(mcp_server, allowed_tools=["add"]), "secret_admin", {}, Statuses()
        )

    assert failed.value.retryable is False
    assert len(mcp_server.called("secret_admin")) == before


async def test_tools_for_offers_every_allowed_tool_or_only_the_functions_named(
    mcp: McpToolkits, mcp_server: McpTestServer
) -> None:
    glossary = connection(mcp_server, allowed_tools=["add", "lookup"])
    maths = connection(mcp_server, id="tk_maths", name="maths", allowed_tools=["add"])

    everything = await mcp.tools_for([glossary, maths], None)
    chosen = await mcp.tools_for([glossary, maths], ["maths__add", "glossary__lookup"])
    with pytest.raises(UnknownFunctions) as unknown:
        await mcp.tools_for([glossary, maths], ["maths__add", "maths__lookup", "nope"])
    down = connection(mcp_server, name="down", url=f"http://{REMOTE_FILES_HOST}:1/mcp")
    with pytest.raises(ToolFailed) as unlisted:
        await mcp.tools_for([glossary, down], None)

    assert [tool.name for tool in everything] == ["glossary__add", "glossary__lookup", "maths__add"]
    assert [(tool.toolkit_id, tool.tool_name) for tool in chosen] == [
        ("tk_test", "lookup"),
        ("tk_maths", "add"),
    ]
    assert unknown.value.names == ["maths__lookup", "nope"]
    assert unlisted.value.retryable is True
    assert unlisted.value.message.startswith("down could not be reached")


# --- the api ---------------------------------------------------------------------------------------


async def test_admin_creates_lists_reads_updates_and_deletes_a_toolkit(
    client: httpx.AsyncClient, tenant: Tenant, mcp_server: McpTestServer
) -> None:
    created = await create(client, tenant, toolkit_body(mcp_server))

    assert created["id"].startswith("tk_")
    assert {
        key: created[key] for key in created if key not in ("id", "createdAt", "updatedAt")
    } == {
        "name": "glossary",
        "description": "Terms and their meanings",
        "url": mcp_server.url,
        "headerNames": ["X-Tenant"],
        "hasToken": True,
        "allowedTools": ["add", "lookup", "fail"],
        "approvalTools": ["lookup"],
        "enabled": True,
    }
    toolkit_url = f"{TOOLKITS_URL}/{created['id']}"
    listed = await client.get(TOOLKITS_URL, headers=tenant.headers)
    assert (listed.status_code, listed.json()) == (200, {"items": [created]})
    read = await client.get(toolkit_url, headers=tenant.headers)
    assert (read.status_code, read.json()) == (200, created)

    updated = await client.patch(
        toolkit_url,
        json={"name": "terms", "enabled": False, "allowedTools": None, "approvalTools": ["*"]},
        headers=tenant.headers,
    )
    assert updated.status_code == 200, updated.text
    answer = updated.json()
    assert (answer["name"], answer["enabled"], answer["allowedTools"], answer["approvalTools"]) == (
        "terms",
        False,
        None,
        ["*"],
    )
    # What the update left out stays, secrets included.
    assert (answer["url"], answer["headerNames"], answer["hasToken"]) == (
        mcp_server.url,
        ["X-Tenant"],
        True,
    )
    assert answer["updatedAt"] >= created["updatedAt"]

    deleted = await client.delete(toolkit_url, headers=tenant.headers)
    assert deleted.status_code == 204
    assert_problem(await client.get(toolkit_url, headers=tenant.headers), 404)
    assert_problem(await client.delete(toolkit_url, headers=tenant.headers), 404)
    assert (await client.get(TOOLKITS_URL, headers=tenant.headers)).json() == {"items": []}


async def test_secrets_are_write_only_and_sealed_at_rest(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    settings: Settings,
    mcp_server: McpTestServer,
) -> None:
    response = await client.post(
        TOOLKITS_URL, json=toolkit_body(mcp_server), headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    toolkit_id = response.json()["id"]
    toolkit_url = f"{TOOLKITS_URL}/{toolkit_id}"

    for answer in (
        response,
        await client.get(TOOLKITS_URL, headers=tenant.headers),
        await client.get(toolkit_url, headers=tenant.headers),
        await client.patch(toolkit_url, json={"description": "new"}, headers=tenant.headers),
        await client.get(f"{toolkit_url}/tools", headers=tenant.headers),
    ):
        assert answer.status_code == 200 or answer.status_code == 201, answer.text
        assert_no_secret(answer)

    async with sessions() as session:
        sealed = await session.scalar(
            select(Toolkit.secrets).where(
                Toolkit.organization_id == tenant.organization_id, Toolkit.id == toolkit_id
            )
        )
    assert sealed is not None
    assert TOKEN not in sealed
    assert HEADER_VALUE not in sealed
    assert "X-Tenant" not in sealed
    opened = SecretBox.from_settings(settings).open(sealed)
    assert opened == {"headers": {"X-Tenant": HEADER_VALUE}, "token": TOKEN}


async def test_an_update_replaces_headers_and_removes_the_token(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    settings: Settings,
    mcp_server: McpTestServer,
) -> None:
    created = await create(client, tenant, toolkit_body(mcp_server))
    toolkit_url = f"{TOOLKITS_URL}/{created['id']}"

    replaced = await client.patch(
        toolkit_url, json={"headers": {"X-Api-Key": "another-secret"}}, headers=tenant.headers
    )
    removed = await client.patch(toolkit_url, json={"token": None}, headers=tenant.headers)
    # With the token gone, an Authorization header of its own is fine.
    basic = await client.patch(
        toolkit_url,
        json={"headers": {"Authorization": "Basic YWRhOnNlY3JldA=="}},
        headers=tenant.headers,
    )

    assert (replaced.status_code, replaced.json()["headerNames"]) == (200, ["X-Api-Key"])
    assert "another-secret" not in replaced.text
    assert (removed.status_code, removed.json()["hasToken"]) == (200, False)
    assert (basic.status_code, basic.json()["headerNames"]) == (200, ["Authorization"])
    conflict = await client.patch(toolkit_url, json={"token": TOKEN}, headers=tenant.headers)
    assert_problem(conflict, 422)
    async with sessions() as session:
        (kept,) = await toolkits.toolkit_connections(
            session, SecretBox.from_settings(settings), tenant.organization_id, [created["id"]]
        )
    assert (kept.headers, kept.token) == ({"Authorization": "Basic YWRhOnNlY3JldA=="}, None)


async def test_a_toolkit_moved_to_another_url_keeps_no_credentials_meant_for_the_old_one(
    client: httpx.AsyncClient,
    tenant: Tenant,
    mcp_server: McpTestServer,
) -> None:
    created = await create(client, tenant, toolkit_body(mcp_server))
    assert created["hasToken"] is True
    moved = await client.patch(
        f"{TOOLKITS_URL}/{created['id']}",
        json={"url": mcp_server.url.replace("/mcp", "/other/mcp")},
        headers=tenant.headers,
    )
    assert moved.status_code == 200, moved.text
    assert (moved.json()["hasToken"], moved.json()["headerNames"]) == (False, [])


@pytest.mark.parametrize("bound_to", ["ada", None], ids=["user-key", "organization-key-not-admin"])
async def test_non_admin_keys_get_403_on_every_toolkit_endpoint(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    mcp_server: McpTestServer,
    bound_to: str | None,
) -> None:
    created = await create(client, tenant, toolkit_body(mcp_server))
    async with sessions.begin() as session:
        key = await api_keys.create_key(session, tenant.organization_id, user_id=bound_to)
    headers = {"Authorization": f"Bearer {key.secret}"}
    toolkit_url = f"{TOOLKITS_URL}/{created['id']}"

    for method, path, body in [
        ("POST", TOOLKITS_URL, toolkit_body(mcp_server, name="other")),
        ("GET", TOOLKITS_URL, None),
        ("GET", toolkit_url, None),
        ("PATCH", toolkit_url, {"enabled": False}),
        ("DELETE", toolkit_url, None),
        ("GET", f"{toolkit_url}/tools", None),
    ]:
        response = await client.request(method, path, json=body, headers=headers)
        assert assert_problem(response, 403)["type"] == "/problems/forbidden"
        assert "glossary" not in response.text

    still = await client.get(toolkit_url, headers=tenant.headers)
    assert (still.status_code, still.json()) == (200, created)


async def test_another_organizations_toolkit_is_404_and_its_name_is_free_elsewhere(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions, mcp_server: McpTestServer
) -> None:
    created = await create(client, tenant, toolkit_body(mcp_server))
    other = await make_tenant(sessions)
    toolkit_url = f"{TOOLKITS_URL}/{created['id']}"

    for method, path, body in [
        ("GET", toolkit_url, None),
        ("PATCH", toolkit_url, {"enabled": False}),
        ("DELETE", toolkit_url, None),
        ("GET", f"{toolkit_url}/tools", None),
    ]:
        response = await client.request(method, path, json=body, headers=other.headers)
        assert_problem(response, 404)
        assert_no_secret(response)
    assert (await client.get(TOOLKITS_URL, headers=other.headers)).json() == {"items": []}

    # Names are unique per organization: the same name is a 409 here and fine there.
    again = await client.post(TOOLKITS_URL, json=toolkit_body(mcp_server), headers=tenant.headers)
    assert assert_problem(again, 409)["type"] == "/problems/conflict"
    elsewhere = await create(client, other, toolkit_body(mcp_server))
    assert elsewhere["name"] == created["name"]
    assert elsewhere["id"] != created["id"]
    still = await client.get(toolkit_url, headers=tenant.headers)
    assert (still.status_code, still.json()) == (200, created)


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        pytest.param({"name": "Glossary"}, "name", id="name-with-capitals"),
        pytest.param({"name": "1glossary"}, "name", id="name-starting-with-a-digit"),
        pytest.param({"name": "g" * 32}, "name", id="name-too-long"),
        pytest.param({"name": "glossary-terms"}, "name", id="name-with-a-dash"),
        pytest.param({"name": 7}, "name", id="name-not-a-string"),
        pytest.param({"url": "ftp://files.example.com/mcp"}, "url", id="ftp-url"),
        pytest.param({"url": "not a url"}, "url", id="not-a-url"),
        pytest.param({"url": "https://ada:pw@mcp.example.com/mcp"}, "url", id="url-credentials"),
        pytest.param({"url": ["https://mcp.example.com"]}, "url", id="url-not-a-string"),
        pytest.param({"headers": {"X-Key": "a\r\nInjected: yes"}}, "headers", id="header-crlf"),
        pytest.param({"headers": {"Bad Name": "x"}}, "headers", id="header-name-with-space"),
        pytest.param({"headers": {"Host": "evil.example"}}, "", id="reserved-header"),
        pytest.param({"headers": {"X-Key": 5}}, "headers", id="header-value-not-a-string"),
        pytest.param({"headers": ["X-Key"]}, "headers", id="headers-not-an-object"),
        pytest.param({"headers": {"Authorization": "Bearer x"}}, "", id="token-and-authorization"),
        pytest.param({"token": "has spaces"}, "token", id="token-with-spaces"),
        pytest.param({"token": ""}, "token", id="empty-token"),
        pytest.param({"allowedTools": "add"}, "allowedTools", id="allowed-tools-not-a-list"),
        pytest.param({"allowedTools": ["add", "add"]}, "", id="allowed-tools-twice"),
        pytest.param({"approvalTools": [""]}, "approvalTools", id="empty-tool-name"),
        pytest.param({"enabled": "yes"}, "enabled", id="enabled-not-a-boolean"),
        pytest.param({"secret": "x"}, "secret", id="unknown-field"),
    ],
)
async def test_invalid_toolkits_are_validation_problems_and_store_nothing(
    client: httpx.AsyncClient,
    tenant: Tenant,
    mcp_server: McpTestServer,
    overrides: dict[str, Any],
    where: str,
) -> None:
    response = await client.post(
        TOOLKITS_URL, json=toolkit_body(mcp_server, **overrides), headers=tenant.headers
    )

    problem = assert_problem(response, 422)
    assert problem["type"] == "/problems/validation"
    assert problem["detail"].startswith(where)
    assert_no_secret(response)
    assert (await client.get(TOOLKITS_URL, headers=tenant.headers)).json() == {"items": []}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/mcp",
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/mcp",
        "http://10.1.2.3/mcp",
    ],
    ids=["loopback", "link-local-metadata", "metadata-name", "private"],
)
async def test_a_server_the_outbound_guard_refuses_cannot_be_registered(
    client: httpx.AsyncClient, tenant: Tenant, mcp_server: McpTestServer, url: str
) -> None:
    refused_url = url.format(port=mcp_server.port)
    created = await create(client, tenant, toolkit_body(mcp_server))

    response = await client.post(
        TOOLKITS_URL,
        json=toolkit_body(mcp_server, name="refused", url=refused_url),
        headers=tenant.headers,
    )
    moved = await client.patch(
        f"{TOOLKITS_URL}/{created['id']}", json={"url": refused_url}, headers=tenant.headers
    )

    for answer in (response, moved):
        problem = assert_problem(answer, 422)
        assert problem["errors"][0]["loc"] == ["body", "url"]
        assert "not allowed" in problem["detail"] or "metadata" in problem["detail"]
    listed = (await client.get(TOOLKITS_URL, headers=tenant.headers)).json()["items"]
    assert [(item["name"], item["url"]) for item in listed] == [("glossary", mcp_server.url)]


async def test_tools_lists_the_servers_tools_live_with_the_allow_list_and_approvals(
    client: httpx.AsyncClient, tenant: Tenant, mcp_server: McpTestServer
) -> None:
    created = await create(
        client, tenant, toolkit_body(mcp_server, allowedTools=["lookup", "add", "not_served"])
    )

    response = await client.get(f"{TOOLKITS_URL}/{created['id']}/tools", headers=tenant.headers)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["toolkitId"] == created["id"]
    assert [
        (tool["name"], tool["toolName"], tool["needsApproval"]) for tool in answer["tools"]
    ] == [("glossary__add", "add", False), ("glossary__lookup", "lookup", True)]
    lookup = answer["tools"][1]
    assert lookup["description"] == "Look a term up in the glossary."
    assert lookup["inputSchema"]["required"] == ["term"]

    # Every tool once the allow list is lifted; approvals for all with "*".
    await client.patch(
        f"{TOOLKITS_URL}/{created['id']}",
        json={"allowedTools": None, "approvalTools": ["*"], "enabled": False},
        headers=tenant.headers,
    )
    everything = (
        await client.get(f"{TOOLKITS_URL}/{created['id']}/tools", headers=tenant.headers)
    ).json()["tools"]
    assert [tool["toolName"] for tool in everything] == SERVER_TOOLS
    assert all(tool["needsApproval"] for tool in everything)


async def test_tools_of_a_server_that_refuses_the_token_or_is_down_is_a_502(
    client: httpx.AsyncClient, tenant: Tenant, mcp_server: McpTestServer
) -> None:
    wrong_token = await create(
        client, tenant, toolkit_body(mcp_server, name="wrong", token="not-the-token")
    )
    down = await create(
        client,
        tenant,
        toolkit_body(mcp_server, name="down", url=f"http://{REMOTE_FILES_HOST}:1/mcp"),
    )

    refused = await client.get(f"{TOOLKITS_URL}/{wrong_token['id']}/tools", headers=tenant.headers)
    unreachable = await client.get(f"{TOOLKITS_URL}/{down['id']}/tools", headers=tenant.headers)

    refused_problem = assert_problem(refused, 502)
    assert refused_problem["retryable"] is False
    assert "HTTP 401" in refused_problem["detail"]
    assert "not-the-token" not in refused.text
    unreachable_problem = assert_problem(unreachable, 502)
    assert unreachable_problem["retryable"] is True
    assert "could not be reached" in unreachable_problem["detail"]


async def test_connections_open_the_secrets_of_enabled_toolkits_only(
    sessions: Sessions, settings: Settings, tenant: Tenant
) -> None:
    box = SecretBox.from_settings(settings)
    async with sessions.begin() as session:
        on = await toolkits.create_toolkit(
            session,
            box,
            tenant.organization_id,
            name="on",
            description="",
            url="https://mcp.example.com/mcp",
            secrets=ToolkitSecrets(headers={"X-Key": "k"}, token="t"),
            allowed_tools=["add"],
            approval_tools=["*"],
        )
        off = await toolkits.create_toolkit(
            session,
            box,
            tenant.organization_id,
            name="off",
            description="",
            url="https://mcp.example.com/mcp",
            secrets=ToolkitSecrets(),
            allowed_tools=None,
            approval_tools=[],
            enabled=False,
        )
    other = await make_tenant(sessions)

    async with sessions() as session:
        found = await toolkits.toolkit_connections(
            session, box, tenant.organization_id, [off.id, on.id, "tk_missing"]
        )
        everything = await toolkits.toolkit_connections(
            session, box, tenant.organization_id, [off.id, on.id], enabled_only=False
        )
        elsewhere = await toolkits.toolkit_connections(
            session, box, other.organization_id, [on.id], enabled_only=False
        )

    assert found == [
        ToolkitConnection(
            id=on.id,
            name="on",
            url="https://mcp.example.com/mcp",
            headers={"X-Key": "k"},
            token="t",
            allowed_tools=["add"],
            approval_tools=["*"],
        )
    ]
    assert [connection.id for connection in everything] == [off.id, on.id]
    assert elsewhere == []
    # The repr never shows a secret (it can end up in a log line or a traceback).
    assert "'k'" not in repr(found[0])
    assert "'t'" not in repr(found[0])
