"""Stopping a turn: a durable message to its workflow plus a Redis fast path. Generation ends
promptly, the partial answer is stored as `aborted`, and every open stream gets `abort` then `finish`."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.contracts import StopTurnRequest
from core.settings import Settings
from storage.models import Turn
from tests.conftest import Tenant, make_tenant
from tests.support.ai_client import run_ai_client
from tests.support.chat_api import get_chat, send_and_collect, stored_text, wait_for_settled_answer
from tests.support.sse import SseEvent, chunks_of, iter_sse, text_of

# 200 words, 30 ms apart: six seconds of answer, plenty of room to stop it midway.
LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 200, "delayMs": 30}}}


async def read_until_deltas(stream: AsyncIterator[SseEvent], count: int) -> list[SseEvent]:
    """Events up to the count-th text delta, leaving the rest of `stream` unread."""
    events: list[SseEvent] = []
    deltas = 0
    while deltas < count:
        event = await anext(stream)
        events.append(event)
        deltas += event.data != "[DONE]" and event.chunk["type"] == "text-delta"
    return events


async def test_stop_keeps_the_partial_answer_and_ends_every_open_stream(
    client: httpx.AsyncClient,
    tenant: Tenant,
    api_url: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    body = {"message": "talk for a while", **LONG}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        chat_id = response.headers["x-chat-id"]
        stream = iter_sse(response)
        head = await read_until_deltas(stream, 5)
        # A second reader (another device) follows the same turn.
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=30) as other_device,
            other_device.stream(
                "GET", f"/v1/chats/{chat_id}/stream", headers=tenant.headers
            ) as follower,
        ):
            follower_stream = iter_sse(follower)
            follower_head = await read_until_deltas(follower_stream, 5)
            stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
            assert stop.status_code == 200, stop.text
            assert stop.json()["stopped"] is True
            turn_id = stop.json()["turnId"]
            follower_rest = [event async for event in follower_stream]
        rest = [event async for event in stream]

    for events in (head + rest, follower_head + follower_rest):
        chunks = chunks_of(events)
        kinds = [chunk["type"] for chunk in chunks]
        assert kinds[-2:] == ["abort", "finish"]
        assert events[-1].data == "[DONE]"
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted"
    partial = stored_text(answer)
    assert 5 <= len(partial.split()) < 200, "stopped midway, the partial answer kept"
    assert text_of(chunks_of(head + rest)) == partial
    assert all(part.get("state", "done") == "done" for part in answer["parts"])
    async with sessions() as session:
        turn = await session.get(Turn, turn_id)
    assert turn is not None
    assert turn.status == "aborted"
    # The chat is free again.
    assert (await get_chat(client, tenant.headers, chat_id))["activeTurnId"] is None


async def test_stop_without_an_active_turn_answers_stopped_false(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response, _ = await send_and_collect(
        client, tenant.headers, {"message": "quick", "providerOptions": {"local": {"delayMs": 0}}}
    )
    chat_id = response.headers["x-chat-id"]
    for body in (None, {"turnId": "no-such-turn"}):
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers, json=body)
        assert stop.status_code == 200
        assert stop.json() == {"stopped": False, "turnId": None}


async def test_stop_is_idempotent_and_the_turn_ends_once(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "x", **LONG}, headers=tenant.headers
    ) as response:
        chat_id = response.headers["x-chat-id"]
        stream = iter_sse(response)
        await read_until_deltas(stream, 3)
        stops = await asyncio.gather(
            *(client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers) for _ in range(3))
        )
        rest = [event async for event in stream]
    assert all(stop.status_code == 200 for stop in stops)
    assert [chunk["type"] for chunk in chunks_of(rest)].count("abort") == 1
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted"


async def test_only_the_chats_organization_can_stop_it(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "x", **LONG}, headers=tenant.headers
    ) as response:
        chat_id = response.headers["x-chat-id"]
        stream = iter_sse(response)
        await read_until_deltas(stream, 2)
        intruder = await make_tenant(sessions)
        denied = await client.post(f"/v1/chats/{chat_id}/stop", headers=intruder.headers)
        assert denied.status_code == 404
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        assert stop.json()["stopped"] is True
        [event async for event in stream]


async def test_stop_shows_in_the_workflow_history_and_status(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "x", **LONG}, headers=tenant.headers
    ) as response:
        chat_id = response.headers["x-chat-id"]
        stream = iter_sse(response)
        head = await read_until_deltas(stream, 2)
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        [event async for event in stream]
    turn_id = head[0].chunk["messageMetadata"]["turnId"]
    handle = (await Client.connect(settings.resolved_temporal_address)).get_workflow_handle(
        f"turn-{turn_id}"
    )
    result = await handle.result()
    assert result["status"] == "aborted", result
    history = await handle.fetch_history()
    signals = [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.HasField("workflow_execution_signaled_event_attributes")
    ]
    assert signals == ["stop_turn"]
    description = await handle.describe()
    status = {key.name: value for key, value in description.typed_search_attributes}[
        "DurachatStatus"
    ]
    assert status == "aborted"


async def test_ai_client_assembles_the_stopped_message_as_stored(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    command = {
        "mode": "send",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": chat_id,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "go"}]}],
        "trigger": "submit-message",
        "body": LONG,
    }
    sending = asyncio.create_task(run_ai_client(command))
    while True:  # wait until the turn is streaming
        response = await client.get(f"/v1/chats/{chat_id}", headers=tenant.headers)
        if response.status_code == 200 and response.json()["activeTurnId"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
    result = await sending
    assert result["error"] is None, result
    assert [chunk["type"] for chunk in result["chunks"]][-2:] == ["abort", "finish"]
    stored = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert stored["status"] == "aborted"
    assert {key: stored[key] for key in ("id", "role", "parts", "metadata")} == result["message"]


async def test_busy_chat_rejects_by_default_and_interrupt_takes_over(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "x", **LONG}, headers=tenant.headers
    ) as response:
        chat_id = response.headers["x-chat-id"]
        stream = iter_sse(response)
        head = await read_until_deltas(stream, 3)
        busy = await client.post(
            f"/v1/chats/{chat_id}", json={"message": "me too"}, headers=tenant.headers
        )
        assert busy.status_code == 409
        assert busy.headers["content-type"] == "application/problem+json"
        assert busy.json()["turnId"] == head[0].chunk["messageMetadata"]["turnId"]

        body = {
            "message": "now me",
            "model": "local/echo",
            "ifBusy": "interrupt",
            "providerOptions": {"local": {"delayMs": 0}},
        }
        taking_over, events = await send_and_collect(
            client, tenant.headers, body, f"/v1/chats/{chat_id}"
        )
        assert taking_over.status_code == 200, taking_over.text
        rest = [event async for event in stream]
    assert [chunk["type"] for chunk in chunks_of(rest)][-2:] == ["abort", "finish"]
    assert text_of(chunks_of(events)) == "now me"
    messages = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [m["status"] for m in messages] == ["complete", "aborted", "complete", "complete"]
    assert stored_text(messages[-1]) == "now me"


async def stopped_turn_usage(
    client: httpx.AsyncClient, tenant: Tenant, chat_id: str, finish: dict[str, object]
) -> dict[str, object]:
    """The stopped turn's usage as `/turns` lists it, checked against its `finish` chunk."""
    turns = await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)
    [turn] = turns.json()["items"]
    assert turn["status"] == "aborted"
    usage: dict[str, object] = turn["usage"]
    metadata = finish["messageMetadata"]
    assert isinstance(metadata, dict)
    assert metadata["usage"] == {
        key: usage[key] for key in ("inputTokens", "outputTokens", "totalTokens", "estimated")
    }
    return usage


async def test_a_stopped_turn_records_estimated_usage_of_what_it_streamed(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    temporal = await Client.connect(settings.resolved_temporal_address)
    # Stopped through the api (the Redis fast path), and through the workflow signal alone (the
    # generation activity is cancelled and reports nothing back to the workflow).
    for stop_through_api in (True, False):
        async with client.stream(
            "POST", "/v1/chats", json={"message": "count my words", **LONG}, headers=tenant.headers
        ) as response:
            chat_id = response.headers["x-chat-id"]
            turn_id = response.headers["x-turn-id"]
            stream = iter_sse(response)
            head = await read_until_deltas(stream, 20)
            if stop_through_api:
                await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
            else:
                await temporal.get_workflow_handle(f"turn-{turn_id}").signal(
                    "stop_turn", StopTurnRequest(reason="operator")
                )
            rest = [event async for event in stream]
        chunks = chunks_of(head + rest)
        assert [chunk["type"] for chunk in chunks][-2:] == ["abort", "finish"]
        streamed = text_of(chunks)
        usage = await stopped_turn_usage(client, tenant, chat_id, chunks[-1])
        # local/lorem reports usage only with its last chunk, which a stopped turn never sends.
        assert usage["estimated"] is True
        assert usage["outputTokens"] == math.ceil(len(streamed) / 4)
        assert isinstance(usage["inputTokens"], int)
        assert usage["inputTokens"] >= math.ceil(len("count my words") / 4)
        assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
        answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
        assert answer["metadata"]["usage"]["estimated"] is True


async def test_a_completed_turn_reports_the_providers_usage_not_an_estimate(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "a b c", "providerOptions": {"local": {"delayMs": 0}}}
    )
    finish = chunks_of(events)[-1]
    assert "estimated" not in finish["messageMetadata"]["usage"]
    turns = await client.get(
        f"/v1/chats/{response.headers['x-chat-id']}/turns", headers=tenant.headers
    )
    assert turns.json()["items"][0]["usage"]["estimated"] is False
