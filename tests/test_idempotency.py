"""Idempotent sends: a repeated send attaches to the first one's turn and stream, never a second
turn; and a stream Redis no longer holds is served from the stored message."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import Message
from storage.streams import TurnStreams
from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import (
    assert_problem,
    get_chat,
    send_and_collect,
    stored_text,
    wait_for_settled_answer,
)
from tests.support.sse import chunks_of, iter_sse, text_of

PACED = {"model": "local/lorem", "providerOptions": {"local": {"words": 30, "delayMs": 30}}}


async def message_count(
    sessions: async_sessionmaker[AsyncSession], chat_id: str, organization_id: str
) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.chat_id == chat_id, Message.organization_id == organization_id)
        )
    return int(count or 0)


async def test_repeated_send_with_idempotency_key_attaches_to_the_same_turn(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    headers = {**tenant.headers, "Idempotency-Key": f"key-{uuid.uuid4()}"}
    body = {"message": "only once please", **PACED}
    (first, first_events), (second, second_events) = await asyncio.gather(
        send_and_collect(client, headers, body), send_and_collect(client, headers, body)
    )
    assert first.status_code == second.status_code == 200
    assert first.headers["x-chat-id"] == second.headers["x-chat-id"]
    first_chunks, second_chunks = chunks_of(first_events), chunks_of(second_events)
    assert first_chunks[0]["messageId"] == second_chunks[0]["messageId"]
    assert text_of(first_chunks) == text_of(second_chunks)
    chat_id = first.headers["x-chat-id"]
    assert await message_count(sessions, chat_id, tenant.organization_id) == 2

    # Repeated again after the turn finished: the same answer, still no new turn.
    third, third_events = await send_and_collect(client, headers, body)
    assert third.headers["x-chat-id"] == chat_id
    assert chunks_of(third_events)[0]["messageId"] == first_chunks[0]["messageId"]
    assert text_of(chunks_of(third_events)) == text_of(first_chunks)
    as_json = await client.post("/v1/chats?stream=false", json=body, headers=headers)
    assert as_json.status_code == 200
    assert as_json.json()["message"]["id"] == first_chunks[0]["messageId"]
    assert await message_count(sessions, chat_id, tenant.organization_id) == 2


async def test_ai_sdk_retry_of_the_same_user_message_is_the_same_turn(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    body = {
        "id": chat_id,
        "messages": [
            {"id": "client-msg-1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        ],
        "trigger": "submit-message",
        "providerOptions": {"local": {"delayMs": 0}},
    }
    _, first = await send_and_collect(client, tenant.headers, body)
    _, again = await send_and_collect(client, tenant.headers, body)
    assert chunks_of(first)[0]["messageId"] == chunks_of(again)[0]["messageId"]
    assert await message_count(sessions, chat_id, tenant.organization_id) == 2


async def test_idempotency_keys_are_per_organization(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    key = f"shared-{uuid.uuid4()}"
    other = await make_tenant(sessions)
    body = {"message": "mine", "providerOptions": {"local": {"delayMs": 0}}}
    mine, _ = await send_and_collect(client, {**tenant.headers, "Idempotency-Key": key}, body)
    theirs, _ = await send_and_collect(client, {**other.headers, "Idempotency-Key": key}, body)
    assert mine.status_code == theirs.status_code == 200
    assert mine.headers["x-chat-id"] != theirs.headers["x-chat-id"]


async def test_stream_lost_by_redis_is_served_from_the_stored_message(
    client: httpx.AsyncClient, tenant: Tenant, redis: Redis
) -> None:
    headers = {**tenant.headers, "Idempotency-Key": f"key-{uuid.uuid4()}"}
    body = {"message": "keep this safe", "providerOptions": {"local": {"delayMs": 0}}}
    response, events = await send_and_collect(client, headers, body)
    chat_id = response.headers["x-chat-id"]
    start = chunks_of(events)[0]
    await redis.delete(
        TurnStreams.stream_key(tenant.organization_id, start["messageMetadata"]["turnId"])
    )

    # A repeated send replays the whole stored message, from `start`.
    _, replayed = await send_and_collect(client, headers, body)
    chunks = chunks_of(replayed)
    assert chunks[0] == {
        "type": "start",
        "messageId": start["messageId"],
        "messageMetadata": chunks[0]["messageMetadata"],
    }
    assert chunks[-1]["type"] == "finish"
    assert text_of(chunks) == "keep this safe"

    # A resume whose cursor is gone does not hang: it gets the stored message, replacing the step.
    cursor = {**tenant.headers, "Last-Event-ID": events[3].id or ""}
    async with client.stream(
        "GET", f"/v1/chats/{chat_id}/stream", headers=cursor, timeout=20
    ) as resumed:
        assert resumed.status_code == 200
        resumed_chunks = chunks_of([event async for event in iter_sse(resumed)])
    assert resumed_chunks[0]["type"] == "reset-step"
    assert resumed_chunks[-1]["type"] == "finish"
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert text_of(resumed_chunks) == stored_text(answer)
    assert (await get_chat(client, tenant.headers, chat_id))["messages"][-1]["id"] == start[
        "messageId"
    ]


async def test_an_idempotency_key_reused_for_another_request_is_refused(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    key = f"key-{uuid.uuid4()}"
    headers = {**tenant.headers, "Idempotency-Key": key}
    fast = {"providerOptions": {"local": {"delayMs": 0}}}
    chat_a = (
        await client.post(
            "/v1/chats?stream=false", json={"message": "a", **fast}, headers=tenant.headers
        )
    ).json()["chatId"]
    chat_b = (
        await client.post(
            "/v1/chats?stream=false", json={"message": "b", **fast}, headers=tenant.headers
        )
    ).json()["chatId"]

    async def reuse_refused(path: str, body: dict[str, object], first_turn_id: str) -> None:
        response = await client.post(path, json=body, headers=headers)
        problem = assert_problem(response, 422)
        assert problem["type"] == "/problems/idempotency-key-reused"
        assert problem["chatId"] == chat_a
        assert problem["turnId"] == first_turn_id

    # While the first request's turn runs, and after it has finished.
    paced = {"model": "local/lorem", "providerOptions": {"local": {"words": 40, "delayMs": 50}}}
    async with client.stream(
        "POST", f"/v1/chats/{chat_a}", json={"message": "first", **paced}, headers=headers
    ) as first:
        assert first.status_code == 200
        turn_id = first.headers["x-turn-id"]
        await reuse_refused(f"/v1/chats/{chat_b}", {"message": "first", **paced}, turn_id)
        await reuse_refused(f"/v1/chats/{chat_a}", {"message": "changed", **paced}, turn_id)
        await first.aread()
    await wait_for_settled_answer(client, tenant.headers, chat_a)
    for path, body in (
        (f"/v1/chats/{chat_b}", {"message": "first", **paced}),
        (f"/v1/chats/{chat_a}", {"message": "changed", **paced}),
        ("/v1/chats", {"message": "first", **paced}),
    ):
        await reuse_refused(path, body, turn_id)
    # Nothing was stored for the refused requests.
    assert await message_count(sessions, chat_b, tenant.organization_id) == 2
    assert await message_count(sessions, chat_a, tenant.organization_id) == 4

    # The identical request, however its JSON is laid out, still gets the first answer.
    reordered = '{"providerOptions": {"local": {"delayMs": 50, "words": 40}},\n "model": "local/lorem", "message": "first"}'
    again = await client.post(
        f"/v1/chats/{chat_a}?stream=false",
        content=reordered,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["turnId"] == turn_id
    assert again.headers["x-turn-id"] == turn_id
