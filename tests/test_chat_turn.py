"""A chat turn end to end: the api, a real worker, Temporal, Postgres, Redis and the stream on the wire."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import Chat, Turn
from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import get_chat, send_and_collect, stored_text, wait_for_settled_answer
from tests.support.sse import chunks_of, iter_sse, text_of

FAST = {"local": {"delayMs": 0}}
# Slow enough to act mid-turn: 60 words, 40 ms apart.
PACED = {"local": {"words": 60, "delayMs": 40}}


async def test_send_streams_answer_and_stores_it(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = {"message": "hello durable world", "providerOptions": FAST}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert response.headers["cache-control"] == "no-cache"
        chat_id = response.headers["x-chat-id"]
        events = [event async for event in iter_sse(response)]

    assert events[-1].data == "[DONE]"
    chunks = chunks_of(events)
    assert [chunk["type"] for chunk in chunks[:3]] == ["start", "start-step", "text-start"]
    assert chunks[0]["messageMetadata"]["chatId"] == chat_id
    assert chunks[0]["messageMetadata"]["model"] == "local/echo"
    assert [chunk["type"] for chunk in chunks[-3:]] == ["text-end", "finish-step", "finish"]
    finish = chunks[-1]
    assert finish["finishReason"] == "stop"
    assert finish["messageMetadata"]["usage"]["outputTokens"] == 3
    assert isinstance(finish["messageMetadata"]["ttftMs"], int)
    assert text_of(chunks) == "hello durable world"
    assert all(event.id for event in events[:-1])

    chat = await get_chat(client, tenant.headers, chat_id)
    user, assistant = chat["messages"]
    assert user["parts"] == [{"type": "text", "text": "hello durable world"}]
    assert assistant["id"] == chunks[0]["messageId"]
    assert assistant["status"] == "complete"
    assert stored_text(assistant) == "hello durable world"
    assert assistant["metadata"]["usage"] == finish["messageMetadata"]["usage"]
    assert chat["activeTurnId"] is None


async def test_follow_up_message_sees_the_history(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    first, _ = await send_and_collect(
        client, tenant.headers, {"message": "one", "providerOptions": FAST}
    )
    chat_id = first.headers["x-chat-id"]
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "two", "providerOptions": FAST}, f"/v1/chats/{chat_id}"
    )
    assert response.status_code == 200
    assert text_of(chunks_of(events)) == "two"
    chat = await get_chat(client, tenant.headers, chat_id)
    assert [(m["role"], stored_text(m)) for m in chat["messages"]] == [
        ("user", "one"),
        ("assistant", "one"),
        ("user", "two"),
        ("assistant", "two"),
    ]


async def test_disconnect_after_first_chunk_still_stores_the_complete_answer(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {"message": "x", "model": "local/lorem", "providerOptions": PACED}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        chat_id = response.headers["x-chat-id"]
        async for event in iter_sse(response):
            if event.chunk["type"] == "text-delta":
                break  # the client goes away mid-answer

    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "complete"
    assert len(stored_text(answer).split()) == 60


async def test_resume_without_cursor_replays_the_whole_message_then_follows_live(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {"message": "x", "model": "local/lorem", "providerOptions": PACED}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        chat_id = response.headers["x-chat-id"]
        seen = 0
        async for event in iter_sse(response):
            seen += event.chunk["type"] == "text-delta"
            if seen == 5:
                break

    async with client.stream(
        "GET", f"/v1/chats/{chat_id}/stream", headers=tenant.headers
    ) as resumed:
        assert resumed.status_code == 200
        assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
        events = [event async for event in iter_sse(resumed)]
    chunks = chunks_of(events)
    assert chunks[0]["type"] == "start"
    assert chunks[-1]["type"] == "finish"
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert text_of(chunks) == stored_text(answer)
    assert len(stored_text(answer).split()) == 60


async def test_resume_with_last_event_id_continues_exactly_after_it(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {"message": "x", "model": "local/lorem", "providerOptions": PACED}
    first_part = []
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        chat_id = response.headers["x-chat-id"]
        async for event in iter_sse(response):
            first_part.append(event)
            if len(first_part) == 12:
                break

    headers = {**tenant.headers, "Last-Event-ID": first_part[-1].id or ""}
    async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers=headers) as resumed:
        assert resumed.status_code == 200
        rest = [event async for event in iter_sse(resumed)]

    combined = first_part + rest[:-1]
    ids = [event.id for event in combined]
    assert len(ids) == len(set(ids)), "no event twice"
    chunks = chunks_of(combined)
    assert chunks[0]["type"] == "start"
    assert chunks[-1]["type"] == "finish"
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert text_of(chunks) == stored_text(answer), "no gap"

    # A finished turn's stream stays replayable by cursor.
    async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers=headers) as again:
        replay = [event async for event in iter_sse(again)]
    assert [event.id for event in replay] == [event.id for event in rest]


async def test_resume_with_no_active_turn_is_204(client: httpx.AsyncClient, tenant: Tenant) -> None:
    response, _ = await send_and_collect(
        client, tenant.headers, {"message": "done", "providerOptions": FAST}
    )
    resumed = await client.get(
        f"/v1/chats/{response.headers['x-chat-id']}/stream", headers=tenant.headers
    )
    assert resumed.status_code == 204


async def test_malformed_cursor_is_400(client: httpx.AsyncClient, tenant: Tenant) -> None:
    response, _ = await send_and_collect(
        client, tenant.headers, {"message": "a", "providerOptions": FAST}
    )
    headers = {**tenant.headers, "Last-Event-ID": "not-a-cursor"}
    resumed = await client.get(f"/v1/chats/{response.headers['x-chat-id']}/stream", headers=headers)
    assert resumed.status_code == 400
    assert resumed.headers["content-type"] == "application/problem+json"


async def test_concurrent_first_messages_on_one_channel_make_one_chat(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    channel = {"source": "discord", "id": f"channel-{uuid.uuid4().hex[:8]}"}
    body = {"message": "first!", "externalChannelId": channel, "providerOptions": FAST}
    results = await asyncio.gather(
        *(send_and_collect(client, tenant.headers, body) for _ in range(4))
    )

    async with sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Chat)
            .where(
                Chat.organization_id == tenant.organization_id, Chat.external_id == channel["id"]
            )
        )
    assert count == 1
    chat_ids = set()
    for response, _events in results:
        # A send that finds the channel's chat mid-turn is told so (409), with the chat's id.
        assert response.status_code in (200, 409), response.text
        chat_ids.add(
            response.headers["x-chat-id"]
            if response.status_code == 200
            else response.json()["chatId"]
        )
    assert len(chat_ids) == 1
    assert any(response.status_code == 200 for response, _ in results)

    # Coming back later to the same channel continues the same chat.
    again, _ = await send_and_collect(client, tenant.headers, body)
    assert again.headers["x-chat-id"] in chat_ids


async def test_json_mode_waits_for_the_finished_turn(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {"message": "answer me plainly", "providerOptions": FAST}
    by_query = await client.post("/v1/chats?stream=false", json=body, headers=tenant.headers)
    by_accept = await client.post(
        "/v1/chats", json=body, headers={**tenant.headers, "Accept": "application/json"}
    )
    for response in (by_query, by_accept):
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["status"] == "completed"
        assert payload["chatId"] == response.headers["x-chat-id"]
        assert stored_text(payload["message"]) == "answer me plainly"
        assert payload["usage"]["outputTokens"] == 3


async def test_history_seeds_a_new_chat_from_messages(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "parts": [{"type": "text", "text": "Hello Ada"}]},
            {"role": "user", "content": "what is my name?"},
        ],
        "model": "mock/echo",
    }
    response, _events = await send_and_collect(client, tenant.headers, body)
    assert response.status_code == 200
    chat = await get_chat(client, tenant.headers, response.headers["x-chat-id"])
    assert [stored_text(m) for m in chat["messages"]][:3] == [
        "my name is Ada",
        "Hello Ada",
        "what is my name?",
    ]


async def test_unknown_model_is_400_and_starts_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    for model in ("nope/model", "local/nope", "no-slash"):
        response = await client.post(
            "/v1/chats", json={"message": "hi", "model": model}, headers=tenant.headers
        )
        assert response.status_code == 400, response.text
        problem = response.json()
        assert problem["status"] == 400
        assert problem["title"]
        assert problem["detail"]
        assert "local/echo" in problem["availableModels"]
    async with sessions() as session:
        assert (
            await session.scalar(
                select(func.count())
                .select_from(Chat)
                .where(Chat.organization_id == tenant.organization_id)
            )
            == 0
        )


async def test_bad_bodies_are_problems_and_change_nothing(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    bad_bodies = [
        {},
        {"message": ""},
        {"message": "   "},
        {"message": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": "I speak last"}]},
        {"message": "hi", "externalChannelId": {"source": "irc", "id": "x"}},
        {"message": "hi", "unknownField": 1},
        {"message": "hi", "id": "has spaces"},
        {"message": "x" * 100_001},
    ]
    for body in bad_bodies:
        response = await client.post("/v1/chats", json=body, headers=tenant.headers)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    missing = await client.post(
        "/v1/chats/does-not-exist", json={"message": "hi"}, headers=tenant.headers
    )
    assert missing.status_code == 404
    async with sessions() as session:
        assert (
            await session.scalar(
                select(func.count())
                .select_from(Chat)
                .where(Chat.organization_id == tenant.organization_id)
            )
            == 0
        )


async def test_another_tenants_chat_and_stream_are_404(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    body = {"message": "secret plans", "model": "local/lorem", "providerOptions": PACED}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        chat_id = response.headers["x-chat-id"]
        first = None
        async for event in iter_sse(response):
            first = event
            break
    assert first is not None
    assert first.id
    intruder = await make_tenant(sessions)
    # A resume without a cursor answers as for a chat that does not exist (204, nothing to
    # resume): that is what `useChat` asks on a new chat's first load.
    resumed = await client.get(f"/v1/chats/{chat_id}/stream", headers=intruder.headers)
    assert (resumed.status_code, resumed.content) == (204, b"")
    for method, path, extra in [
        ("GET", f"/v1/chats/{chat_id}", {}),
        ("GET", f"/v1/chats/{chat_id}/stream", {"Last-Event-ID": first.id}),
        ("POST", f"/v1/chats/{chat_id}", {}),
    ]:
        kwargs = {"json": {"message": "let me in"}} if method == "POST" else {}
        response = await client.request(
            method, path, headers={**intruder.headers, **extra}, **kwargs
        )
        assert response.status_code == 404, (path, response.text)
        assert "secret" not in response.text
    # The intruder's own chat with the same client-chosen id is a different chat.
    own, _events = await send_and_collect(
        client,
        intruder.headers,
        {"id": chat_id, "messages": [{"role": "user", "content": "mine"}], "providerOptions": FAST},
    )
    assert own.status_code == 200
    assert [
        stored_text(m) for m in (await get_chat(client, intruder.headers, chat_id))["messages"]
    ] == ["mine", "mine"]
    await wait_for_settled_answer(client, tenant.headers, chat_id)


async def test_turn_row_records_model_attempts_usage_and_timings(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    _response, events = await send_and_collect(
        client, tenant.headers, {"message": "count me", "providerOptions": FAST}
    )
    turn_id = chunks_of(events)[0]["messageMetadata"]["turnId"]
    async with sessions() as session:
        turn = await session.get(Turn, turn_id)
    assert turn is not None
    assert (turn.status, turn.model, turn.attempts) == ("completed", "local/echo", 1)
    assert (turn.input_tokens, turn.output_tokens) == (2, 2)
    assert turn.ttft_ms is not None
    assert turn.duration_ms is not None
    assert turn.workflow_id == f"turn-{turn_id}"
    assert turn.run_id
