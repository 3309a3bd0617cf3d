"""The walls between tenants and users: every endpoint answers 404 with no data for another
organization's or another user's chat, and changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import api_keys
from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import get_chat
from tests.support.sse import collect_sse


async def user_key(
    sessions: async_sessionmaker[AsyncSession], organization_id: str, user_id: str
) -> Tenant:
    async with sessions.begin() as session:
        created = await api_keys.create_key(session, organization_id, user_id=user_id)
    return Tenant(organization_id=organization_id, key_id=created.id, secret=created.secret)


async def test_another_tenants_or_users_chat_is_404_on_every_endpoint(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    admin = await make_tenant(sessions)
    owner = await user_key(sessions, admin.organization_id, "alice")
    same_org_user = await user_key(sessions, admin.organization_id, "bob")
    other_org = await make_tenant(sessions)

    channel = {"source": "discord", "id": f"chan-{uuid.uuid4().hex[:8]}"}
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "secret plans", "model": "local/echo", "externalChannelId": channel},
        headers=owner.headers,
    ) as response:
        chat_id = response.headers["x-chat-id"]
        events = await collect_sse(response)
    cursor = events[1].id
    assert cursor
    before = await get_chat(client, owner.headers, chat_id)
    for _ in range(100):  # the turn titles its new chat after the stream has ended
        if before["title"] is not None:
            break
        await asyncio.sleep(0.05)
        before = await get_chat(client, owner.headers, chat_id)
    user_message, answer = before["messages"]
    # The organization's admin key sees its users' chats.
    assert (await get_chat(client, admin.headers, chat_id))["id"] == chat_id

    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/v1/chats/{chat_id}", {}),
        ("POST", f"/v1/chats/{chat_id}", {"json": {"message": "hi", "model": "local/echo"}}),
        (
            "POST",
            f"/v1/chats/{chat_id}",
            {"json": {"message": "hi"}, "params": {"stream": "false"}},
        ),
        ("GET", f"/v1/chats/{chat_id}/stream", {"headers": {"Last-Event-ID": cursor}}),
        ("POST", f"/v1/chats/{chat_id}/stop", {}),
        ("POST", f"/v1/chats/{chat_id}/messages/{answer['id']}/regenerate", {}),
        (
            "POST",
            f"/v1/chats/{chat_id}/messages/{user_message['id']}/edit",
            {"json": {"content": "x"}},
        ),
        ("POST", f"/v1/chats/{chat_id}/branch", {"json": {"messageId": user_message["id"]}}),
        ("POST", f"/v1/chats/{chat_id}/truncate", {"json": {"keep": 0}}),
        ("PATCH", f"/v1/chats/{chat_id}", {"json": {"title": "mine now"}}),
        ("GET", f"/v1/chats/{chat_id}/messages", {}),
        ("GET", f"/v1/chats/{chat_id}/turns", {}),
        ("GET", "/v1/chats/by-external", {"params": channel}),
        ("DELETE", f"/v1/chats/{chat_id}", {}),
    ]
    for intruder in (same_org_user, other_org):
        for method, path, options in requests:
            headers = {**intruder.headers, **options.get("headers", {})}
            response = await client.request(
                method,
                path,
                json=options.get("json"),
                params=options.get("params"),
                headers=headers,
            )
            assert response.status_code == 404, (method, path, response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert "secret plans" not in response.text
        # Without a cursor a resume is a 204 whether the chat is someone else's or does not exist.
        resumed = await client.get(f"/v1/chats/{chat_id}/stream", headers=intruder.headers)
        assert (resumed.status_code, resumed.content) == (204, b"")
        listed = (await client.get("/v1/chats", headers=intruder.headers)).json()
        assert chat_id not in [item["id"] for item in listed["items"]]

    # Sends naming the chat's id or channel never reach it: in the same organization they are
    # refused; another organization gets a chat of its own (ids and channels are per organization).
    same_id = await client.post(
        "/v1/chats", json={"id": chat_id, "message": "hi"}, headers=same_org_user.headers
    )
    assert same_id.status_code == 404
    same_channel = await client.post(
        "/v1/chats",
        json={"message": "hi", "externalChannelId": channel},
        headers=same_org_user.headers,
    )
    assert same_channel.status_code == 404
    own = await client.post(
        "/v1/chats",
        json={"id": chat_id, "message": "mine", "model": "local/echo"},
        params={"stream": "false"},
        headers=other_org.headers,
    )
    assert own.status_code == 200, own.text
    other_messages = (await get_chat(client, other_org.headers, chat_id))["messages"]
    assert other_messages[0]["parts"] == [{"type": "text", "text": "mine"}]

    assert await get_chat(client, owner.headers, chat_id) == before, "nothing changed"


@pytest.mark.parametrize("cursor_turn", ["unknown", "other-tenant"])
async def test_a_cursor_never_reaches_another_chats_stream(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], cursor_turn: str
) -> None:
    victim = await make_tenant(sessions)
    attacker = await make_tenant(sessions)
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "private", "model": "local/echo"},
        headers=victim.headers,
    ) as response:
        events = await collect_sse(response)
    victim_cursor = events[1].id
    assert victim_cursor
    attacker_chat = (
        await client.post(
            "/v1/chats",
            json={"message": "mine", "model": "local/echo"},
            params={"stream": "false"},
            headers=attacker.headers,
        )
    ).json()["chatId"]
    cursor = victim_cursor if cursor_turn == "other-tenant" else f"{uuid.uuid4()}:1-0"
    response = await client.get(
        f"/v1/chats/{attacker_chat}/stream",
        headers={**attacker.headers, "Last-Event-ID": cursor},
    )
    assert response.status_code == 404
    assert "private" not in response.text
