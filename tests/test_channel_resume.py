"""A bot that restarts finds its channel's running turn by the channel alone and reads it again."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import wait_for_settled_answer
from tests.support.sse import assembled_text, collect_sse


async def test_a_channels_active_stream_resumes_by_source_and_id(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    channel = {"source": "api", "id": f"bot-channel-{uuid.uuid4().hex[:8]}"}
    async with client.stream(
        "POST",
        "/v1/chats",
        json={
            "message": "count slowly",
            "model": "local/lorem",
            "providerOptions": {"local": {"words": 60, "delayMs": 30}},
            "externalChannelId": channel,
        },
        headers=tenant.headers,
    ) as response:
        chat_id = response.headers["x-chat-id"]
    # The bot went away after the send; back again, it knows only the channel.
    path = "/v1/chats/by-external/stream"
    async with client.stream(
        "GET", path, params=channel, headers=tenant.headers, timeout=60
    ) as resumed:
        assert resumed.status_code == 200
        assert resumed.headers["x-chat-id"] == chat_id
        events = await collect_sse(resumed)
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    chunks = [event.chunk for event in events if event.data != "[DONE]"]
    assert chunks[0]["type"] == "start"
    assert assembled_text(chunks) == "".join(
        part["text"] for part in answer["parts"] if part["type"] == "text"
    )
    stranger = await make_tenant(sessions)
    response = await client.get(path, params=channel, headers=stranger.headers)
    assert response.status_code == 204, "another organization's channel shows nothing"
    idle = await client.get(path, params=channel, headers=tenant.headers)
    assert idle.status_code == 204, "no turn is active any more"
