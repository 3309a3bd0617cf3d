"""Busy chats with `ifBusy: queue`: sends wait durably behind the running turn and run in order.

Restarts of the api and the worker while turns wait are in tests/test_crash_recovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from temporalio.client import Client

from core.settings import Settings
from tests.conftest import Tenant
from tests.support.ai_client import run_ai_client
from tests.support.chat_api import get_chat, stored_text, wait_for_settled_answer
from tests.support.sse import SseEvent, chunks_of, iter_sse, text_of

# About six seconds of answer: the queue builds up behind it.
LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 200, "delayMs": 30}}}


def queued_send(text: str) -> dict[str, Any]:
    return {"message": text, "model": "local/echo", "ifBusy": "queue"}


async def first_deltas(stream: AsyncIterator[SseEvent], count: int) -> str:
    """Read up to the count-th text delta; the turn id from its `start`."""
    turn_id = ""
    deltas = 0
    while deltas < count:
        event = await anext(stream)
        if event.chunk["type"] == "start":
            turn_id = event.chunk["messageMetadata"]["turnId"]
        deltas += event.chunk["type"] == "text-delta"
    return turn_id


async def signal_names(settings: Settings, turn_id: str) -> list[str]:
    client = await Client.connect(settings.resolved_temporal_address)
    history = await client.get_workflow_handle(f"turn-{turn_id}").fetch_history()
    return [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.HasField("workflow_execution_signaled_event_attributes")
    ]


async def test_queued_sends_run_in_order_after_the_active_turn(
    client: httpx.AsyncClient, api_url: str, tenant: Tenant, settings: Settings
) -> None:
    async with contextlib.AsyncExitStack() as exits:
        running = await exits.enter_async_context(
            client.stream(
                "POST", "/v1/chats", json={"message": "go", **LONG}, headers=tenant.headers
            )
        )
        chat_id = running.headers["x-chat-id"]
        running_turn = await first_deltas(iter_sse(running), 2)

        # Each queued send answers at once with its place in line; its stream starts when it runs.
        queued: list[tuple[str, httpx.Response]] = []
        for position, text in enumerate(["first", "second", "third"], start=1):
            follower = await exits.enter_async_context(
                httpx.AsyncClient(base_url=api_url, timeout=60)
            )
            response = await exits.enter_async_context(
                follower.stream(
                    "POST", f"/v1/chats/{chat_id}", json=queued_send(text), headers=tenant.headers
                )
            )
            assert response.status_code == 200
            assert response.headers["x-queue-position"] == str(position)
            queued.append((response.headers["x-turn-id"], response))

        chat = await get_chat(client, tenant.headers, chat_id)
        assert chat["activeTurnId"] == running_turn
        assert chat["queuedTurnIds"] == [turn_id for turn_id, _ in queued]

        # While turns wait, a send that does not queue is refused: it must not overtake them.
        busy = await client.post(
            f"/v1/chats/{chat_id}", json={"message": "me now"}, headers=tenant.headers
        )
        assert busy.status_code == 409
        assert busy.json()["turnId"] == running_turn

        streams = [[event async for event in iter_sse(response)] for _, response in queued]

    for (turn_id, _), events, text in zip(
        queued, streams, ["first", "second", "third"], strict=True
    ):
        chunks = chunks_of(events)
        assert chunks[0]["type"] == "start"
        assert chunks[0]["messageMetadata"]["turnId"] == turn_id
        assert chunks[-1]["type"] == "finish"
        assert text_of(chunks) == text

    chat = await get_chat(client, tenant.headers, chat_id)
    assert chat["activeTurnId"] is None
    assert chat["queuedTurnIds"] == []
    texts = [(message["role"], stored_text(message)) for message in chat["messages"][2:]]
    assert texts == [
        ("user", "first"),
        ("assistant", "first"),
        ("user", "second"),
        ("assistant", "second"),
        ("user", "third"),
        ("assistant", "third"),
    ]
    # Each queued turn was woken by the turn before it, by name in its history.
    for turn_id, _ in queued:
        assert await signal_names(settings, turn_id) == ["chat_released"]


async def test_a_queued_turn_can_be_stopped_before_it_runs(
    client: httpx.AsyncClient, api_url: str, tenant: Tenant
) -> None:
    async with (
        client.stream(
            "POST", "/v1/chats", json={"message": "go", **LONG}, headers=tenant.headers
        ) as running,
        httpx.AsyncClient(base_url=api_url, timeout=60) as follower,
    ):
        chat_id = running.headers["x-chat-id"]
        await first_deltas(iter_sse(running), 2)
        async with follower.stream(
            "POST", f"/v1/chats/{chat_id}", json=queued_send("never"), headers=tenant.headers
        ) as waiting:
            turn_id = waiting.headers["x-turn-id"]
            stop = await client.post(
                f"/v1/chats/{chat_id}/stop", json={"turnId": turn_id}, headers=tenant.headers
            )
            assert stop.json() == {"stopped": True, "turnId": turn_id}
            ending = chunks_of([event async for event in iter_sse(waiting)])
        assert [chunk["type"] for chunk in ending] == ["abort", "finish"]
        # The running turn goes on.
        chat = await get_chat(client, tenant.headers, chat_id)
        assert chat["activeTurnId"] is not None
        assert chat["queuedTurnIds"] == []
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)

    await wait_for_settled_answer(client, tenant.headers, chat_id)
    messages = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert len(messages) == 2, "the stopped queued turn never stored a message"
    # A resume of the dropped turn's stream ends the same way.
    cursor_free = await client.post(
        f"/v1/chats/{chat_id}",
        json=queued_send("later"),
        params={"stream": "false"},
        headers=tenant.headers,
    )
    assert cursor_free.status_code == 200, cursor_free.text
    assert stored_text(cursor_free.json()["message"]) == "later"


async def test_queue_on_a_free_chat_runs_at_once(client: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await client.post(
        "/v1/chats", json=queued_send("hello"), params={"stream": "false"}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    assert "x-queue-position" not in response.headers
    assert stored_text(response.json()["message"]) == "hello"


async def test_a_queued_regenerate_of_a_missing_message_is_refused_at_once(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "go", **LONG}, headers=tenant.headers
    ) as running:
        chat_id = running.headers["x-chat-id"]
        await first_deltas(iter_sse(running), 1)
        missing = await client.post(
            f"/v1/chats/{chat_id}/messages/nope/regenerate",
            json={"ifBusy": "queue"},
            headers=tenant.headers,
        )
        assert missing.status_code == 404
        assert (await get_chat(client, tenant.headers, chat_id))["queuedTurnIds"] == []
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)


async def test_ai_client_assembles_a_queued_answer(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    async with client.stream(
        "POST", "/v1/chats", json={"id": chat_id, "message": "go", **LONG}, headers=tenant.headers
    ) as running:
        await first_deltas(iter_sse(running), 1)
        command = {
            "mode": "send",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
            "messages": [
                {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "queued hello"}]}
            ],
            "trigger": "submit-message",
            "body": {"model": "local/echo", "ifBusy": "queue"},
        }
        sending = asyncio.create_task(run_ai_client(command))
        await asyncio.sleep(0.5)
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        result = await sending
    assert result["error"] is None, result
    stored = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert stored_text(stored) == "queued hello"
    assert {key: stored[key] for key in ("id", "role", "parts", "metadata")} == result["message"]


async def test_a_chat_read_shows_the_user_messages_of_queued_turns(
    client: httpx.AsyncClient, api_url: str, tenant: Tenant
) -> None:
    async with contextlib.AsyncExitStack() as exits:
        running = await exits.enter_async_context(
            client.stream(
                "POST", "/v1/chats", json={"message": "go", **LONG}, headers=tenant.headers
            )
        )
        chat_id = running.headers["x-chat-id"]
        await first_deltas(iter_sse(running), 2)
        # Two sends queue behind it, each from its own client; each answer waits for its turn.
        turn_ids = []
        for text in ("second", "third"):
            follower = await exits.enter_async_context(
                httpx.AsyncClient(base_url=api_url, timeout=60)
            )
            waiting = await exits.enter_async_context(
                follower.stream(
                    "POST", f"/v1/chats/{chat_id}", json=queued_send(text), headers=tenant.headers
                )
            )
            turn_ids.append(waiting.headers["x-turn-id"])
        chat = await get_chat(client, tenant.headers, chat_id)
        assert chat["queuedTurnIds"] == turn_ids
        shown = chat["messages"][2:]
        assert [(m["role"], m["status"], stored_text(m)) for m in shown] == [
            ("user", "queued", "second"),
            ("user", "queued", "third"),
        ]
        assert [m["metadata"] for m in shown] == [
            {"turnId": turn_ids[0], "queuePosition": 1},
            {"turnId": turn_ids[1], "queuePosition": 2},
        ]
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)

    # Once they have run, the same messages are in the tree (same ids), no longer queued.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        chat = await get_chat(client, tenant.headers, chat_id)
        if not chat["queuedTurnIds"] and chat["activeTurnId"] is None:
            break
        assert asyncio.get_running_loop().time() < deadline, chat
        await asyncio.sleep(0.1)
    users = [m for m in chat["messages"] if m["role"] == "user"]
    assert [(stored_text(m), m["status"]) for m in users] == [
        ("go", "complete"),
        ("second", "complete"),
        ("third", "complete"),
    ]
    assert [m["id"] for m in users[1:]] == [m["id"] for m in shown]
