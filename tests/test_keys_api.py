"""The /v1/keys endpoints through the real api: admin-only key management, user keys that see only
their user's chats, organization walls, revocation on the very next request, paging and bad input."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import api_keys
from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import assert_problem

FAST = {"local": {"delayMs": 0}}
KEY_FIELDS = {"id", "name", "userId", "admin", "displayPrefix", "createdAt", "revokedAt"}
UNKNOWN_CHAT = "/v1/chats/no-such-chat"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def create_key(client: httpx.AsyncClient, by: Tenant, /, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/keys", json=body, headers=by.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def list_all_keys(client: httpx.AsyncClient, admin: Tenant) -> dict[str, Any]:
    response = await client.get(
        "/v1/keys", params={"includeRevoked": "true", "limit": 100}, headers=admin.headers
    )
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def start_chat(client: httpx.AsyncClient, secret: str, message: str) -> str:
    response = await client.post(
        "/v1/chats?stream=false",
        json={"message": message, "model": "local/echo", "providerOptions": FAST},
        headers=bearer(secret),
    )
    assert response.status_code == 200, response.text
    chat_id: str = response.json()["chatId"]
    return chat_id


async def test_admin_creates_a_user_key_and_sees_its_secret_only_once(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/keys", json={"name": "  Ada's laptop  ", "userId": "ada"}, headers=tenant.headers
    )

    assert response.status_code == 201, response.text
    created = response.json()
    assert set(created) == KEY_FIELDS | {"secret"}
    assert created["name"] == "Ada's laptop"
    assert created["userId"] == "ada"
    assert created["admin"] is False
    assert created["revokedAt"] is None
    assert created["secret"].startswith("dck_")
    assert created["secret"].startswith(created["displayPrefix"])
    assert response.headers["location"] == f"/v1/keys/{created['id']}"

    read = await client.get(response.headers["location"], headers=tenant.headers)
    assert read.status_code == 200, read.text
    assert read.json() == {field: created[field] for field in KEY_FIELDS}
    assert created["secret"] not in read.text
    # The new key works at once.
    assert (await client.get(UNKNOWN_CHAT, headers=bearer(created["secret"]))).status_code == 404


async def test_user_keys_see_only_their_own_chats_and_the_admin_key_sees_all(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    ada = (await create_key(client, tenant, userId="ada"))["secret"]
    bob = (await create_key(client, tenant, userId="bob"))["secret"]
    adas_chat = await start_chat(client, ada, "ada's plans")
    bobs_chat = await start_chat(client, bob, "bob's plans")

    for secret, own, other in [(ada, adas_chat, bobs_chat), (bob, bobs_chat, adas_chat)]:
        assert (await client.get(f"/v1/chats/{own}", headers=bearer(secret))).status_code == 200
        # Without a cursor, a resume of a chat the key cannot see is the 204 of one that is not there.
        resumed = await client.get(f"/v1/chats/{other}/stream", headers=bearer(secret))
        assert (resumed.status_code, resumed.content) == (204, b"")
        for method, path, body in [
            ("GET", f"/v1/chats/{other}", None),
            ("POST", f"/v1/chats/{other}?stream=false", {"message": "let me in"}),
            ("POST", f"/v1/chats/{other}/stop", None),
        ]:
            response = await client.request(method, path, json=body, headers=bearer(secret))
            problem = assert_problem(response, 404)
            assert "plans" not in str(problem)

    for chat_id, text in [(adas_chat, "ada's plans"), (bobs_chat, "bob's plans")]:
        response = await client.get(f"/v1/chats/{chat_id}", headers=tenant.headers)
        assert response.status_code == 200, response.text
        assert text in response.text
    # Bob's attempt to write into Ada's chat left it as it was.
    ada_view = (await client.get(f"/v1/chats/{adas_chat}", headers=bearer(ada))).json()
    assert len(ada_view["messages"]) == 2


@pytest.mark.parametrize(
    "scope", [{"userId": "ada"}, {}], ids=["user-key", "organization-key-without-admin"]
)
async def test_non_admin_keys_get_403_on_every_key_endpoint_and_change_nothing(
    client: httpx.AsyncClient, tenant: Tenant, scope: dict[str, str]
) -> None:
    member = await create_key(client, tenant, **scope)
    assert member["admin"] is False
    headers = bearer(member["secret"])
    before = await list_all_keys(client, tenant)

    for method, path, body in [
        ("POST", "/v1/keys", {"name": "mine now"}),
        ("POST", "/v1/keys", {"admin": True}),
        # Refused before the body is even read: a non-admin learns nothing from validation.
        ("POST", "/v1/keys", {"userId": "ada", "admin": True, "unknown": 1}),
        ("GET", "/v1/keys", None),
        ("GET", f"/v1/keys/{tenant.key_id}", None),
        ("GET", f"/v1/keys/{member['id']}", None),
        ("DELETE", f"/v1/keys/{tenant.key_id}", None),
        ("DELETE", f"/v1/keys/{member['id']}", None),
    ]:
        response = await client.request(method, path, json=body, headers=headers)
        problem = assert_problem(response, 403)
        assert problem["title"] == "Forbidden"

    assert await list_all_keys(client, tenant) == before
    # Still a working key for everything else.
    assert (await client.get(UNKNOWN_CHAT, headers=headers)).status_code == 404


async def test_key_endpoints_without_a_valid_key_are_401(client: httpx.AsyncClient) -> None:
    for headers in ({}, bearer("dck_not-a-real-key")):
        for method, path in [
            ("POST", "/v1/keys"),
            ("GET", "/v1/keys"),
            ("GET", "/v1/keys/some-key"),
            ("DELETE", "/v1/keys/some-key"),
        ]:
            response = await client.request(method, path, headers=headers)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"


async def test_another_organizations_key_is_404_with_no_data_and_stays_live(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    victim = await create_key(client, tenant, name="payroll bot", userId="ada")
    intruder = await make_tenant(sessions)

    for method in ("GET", "DELETE"):
        response = await client.request(
            method, f"/v1/keys/{victim['id']}", headers=intruder.headers
        )
        problem = assert_problem(response, 404)
        assert "payroll" not in response.text
        assert victim["displayPrefix"] not in response.text
        assert set(problem) <= {"type", "title", "status", "detail"}
    assert victim["id"] not in (await client.get("/v1/keys", headers=intruder.headers)).text

    assert (await client.get(UNKNOWN_CHAT, headers=bearer(victim["secret"]))).status_code == 404
    victim_now = await client.get(f"/v1/keys/{victim['id']}", headers=tenant.headers)
    assert victim_now.json()["revokedAt"] is None


async def test_unknown_key_id_is_404(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for method in ("GET", "DELETE"):
        assert_problem(
            await client.request(method, "/v1/keys/no-such-key", headers=tenant.headers), 404
        )


async def test_revoked_key_is_refused_on_its_very_next_request(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    key = await create_key(client, tenant, userId="ada")
    headers = bearer(key["secret"])
    assert (await client.get(UNKNOWN_CHAT, headers=headers)).status_code == 404

    revoked = await client.delete(f"/v1/keys/{key['id']}", headers=tenant.headers)

    assert revoked.status_code == 204, revoked.text
    assert revoked.content == b""
    response = await client.get(UNKNOWN_CHAT, headers=headers)
    assert_problem(response, 401)
    # Revoking again is the same success, and keeps the first revocation time.
    revoked_at = (await client.get(f"/v1/keys/{key['id']}", headers=tenant.headers)).json()[
        "revokedAt"
    ]
    assert revoked_at is not None
    again = await client.delete(f"/v1/keys/{key['id']}", headers=tenant.headers)
    assert again.status_code == 204, again.text
    read = await client.get(f"/v1/keys/{key['id']}", headers=tenant.headers)
    assert read.json()["revokedAt"] == revoked_at
    assert_problem(await client.get(UNKNOWN_CHAT, headers=headers), 401)


async def test_an_admin_key_may_revoke_itself_and_is_refused_at_once(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    other_admin = await create_key(client, tenant, admin=True)

    response = await client.delete(f"/v1/keys/{tenant.key_id}", headers=tenant.headers)

    assert response.status_code == 204, response.text
    assert_problem(await client.get("/v1/keys", headers=tenant.headers), 401)
    listed = await client.get("/v1/keys", headers=bearer(other_admin["secret"]))
    assert [item["id"] for item in listed.json()["items"]] == [other_admin["id"]]


async def test_an_admin_can_create_admin_keys_and_organization_keys(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    admin = await create_key(client, tenant, admin=True, name="second admin")
    service = await create_key(client, tenant, name="discord bot")

    assert (admin["admin"], admin["userId"]) == (True, None)
    assert (service["admin"], service["userId"]) == (False, None)
    assert (await client.get("/v1/keys", headers=bearer(admin["secret"]))).status_code == 200
    # A key of the whole organization that is not an admin key sees every chat, but manages no keys.
    ada = (await create_key(client, tenant, userId="ada"))["secret"]
    adas_chat = await start_chat(client, ada, "hello from ada")
    seen = await client.get(f"/v1/chats/{adas_chat}", headers=bearer(service["secret"]))
    assert seen.status_code == 200, seen.text
    assert_problem(await client.get("/v1/keys", headers=bearer(service["secret"])), 403)


async def test_listing_pages_through_every_live_key_and_never_shows_secrets(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    created = [await create_key(client, tenant, name=f"key {n}", userId=f"u{n}") for n in range(4)]
    revoked = await create_key(client, tenant, name="gone")
    assert (
        await client.delete(f"/v1/keys/{revoked['id']}", headers=tenant.headers)
    ).status_code == 204
    live_ids = [tenant.key_id, *(key["id"] for key in created)]

    pages = []
    for offset in (0, 2, 4):
        response = await client.get(
            "/v1/keys", params={"limit": 2, "offset": offset}, headers=tenant.headers
        )
        assert response.status_code == 200, response.text
        pages.append(response.json())

    assert [page["total"] for page in pages] == [5, 5, 5]
    assert [(page["limit"], page["offset"]) for page in pages] == [(2, 0), (2, 2), (2, 4)]
    assert [len(page["items"]) for page in pages] == [2, 2, 1]
    items = [item for page in pages for item in page["items"]]
    # Oldest first, so keys created later land on later pages and offsets stay stable.
    assert [item["id"] for item in items] == live_ids
    assert all(set(item) == KEY_FIELDS for item in items)
    assert all(item["revokedAt"] is None for item in items)
    for page in pages:
        text = str(page)
        for key in [*created, revoked]:
            assert key["secret"] not in text
        assert "secret" not in text
        assert "sha256" not in text
    assert tenant.secret not in str(pages)

    default = (await client.get("/v1/keys", headers=tenant.headers)).json()
    assert (default["limit"], default["offset"], default["total"]) == (20, 0, 5)
    everything = await list_all_keys(client, tenant)
    assert everything["total"] == 6
    assert [item["id"] for item in everything["items"]] == [*live_ids, revoked["id"]]
    assert everything["items"][-1]["revokedAt"] is not None


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"includeRevoked": "perhaps"}],
    ids=["limit-0", "limit-101", "negative-offset", "bad-flag"],
)
async def test_bad_paging_parameters_are_422(
    client: httpx.AsyncClient, tenant: Tenant, params: dict[str, Any]
) -> None:
    response = await client.get("/v1/keys", params=params, headers=tenant.headers)
    assert_problem(response, 422)


async def test_bad_bodies_are_problems_and_create_nothing(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    before = await list_all_keys(client, tenant)
    bad_bodies: list[Any] = [
        {"userId": "ada", "admin": True},
        {"unknownField": 1},
        {"user_id": "ada"},
        {"name": "x" * 201},
        {"name": "   "},
        {"userId": ""},
        {"userId": " ada"},
        {"userId": "u" * 201},
        {"admin": "yes"},
        {"admin": 1},
        {"name": 7},
        ["not", "an", "object"],
    ]
    for body in bad_bodies:
        response = await client.post("/v1/keys", json=body, headers=tenant.headers)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), body
        assert "secret" not in response.json()
    scope = await client.post(
        "/v1/keys", json={"userId": "ada", "admin": True}, headers=tenant.headers
    )
    assert "admin" in assert_problem(scope, 422)["detail"]
    not_json = await client.post(
        "/v1/keys",
        content=b"{not json",
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    assert_problem(not_json, 422)

    assert await list_all_keys(client, tenant) == before


async def test_a_post_without_a_body_creates_an_organization_key(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post("/v1/keys", headers=tenant.headers)

    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["name"], created["userId"], created["admin"]) == (None, None, False)


async def test_the_dev_key_is_an_admin_key(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """`durachat dev` makes its key with ensure_key_with_secret; it must manage keys, even if
    the same secret was once stored as a user key."""
    secret = api_keys.generate_secret()
    async with sessions.begin() as session:
        organization_id = await api_keys.ensure_organization(session, f"dev-{uuid.uuid4().hex[:8]}")
        await api_keys.create_key(session, organization_id, user_id="ada", secret=secret)
    assert_problem(await client.get("/v1/keys", headers=bearer(secret)), 403)

    async with sessions.begin() as session:
        key_id = await api_keys.ensure_key_with_secret(session, organization_id, secret, name="dev")

    response = await client.get(f"/v1/keys/{key_id}", headers=bearer(secret))
    assert response.status_code == 200, response.text
    assert (response.json()["admin"], response.json()["userId"]) == (True, None)


async def test_openapi_documents_every_key_endpoint_response(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    # 400 and 413 are every body's: an undecodable body, and one over the size limit.
    assert statuses("/v1/keys", "post") == {"201", "400", "401", "403", "413", "422", "503"}
    assert statuses("/v1/keys", "get") == {"200", "401", "403", "422", "503"}
    assert statuses("/v1/keys/{key_id}", "get") == {"200", "401", "403", "404", "422", "503"}
    assert statuses("/v1/keys/{key_id}", "delete") == {"204", "401", "403", "404", "422", "503"}
    created = paths["/v1/keys"]["post"]["responses"]["201"]["content"]["application/json"]
    assert created["schema"]["$ref"].endswith("/KeyCreatedOut")
    listed = spec["components"]["schemas"]["KeyOut"]["properties"]
    assert "secret" not in listed
    for method, path in [("get", "/v1/keys"), ("delete", "/v1/keys/{key_id}")]:
        forbidden = paths[path][method]["responses"]["403"]
        assert "application/problem+json" in forbidden["content"]
