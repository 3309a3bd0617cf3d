"""Resume cursors (`Last-Event-ID`): one that is not a Redis stream entry id, or that points past
everything the turn's stream holds, is a 400 before any byte of the stream; one at the end of a
finished turn ends the response at once. None of them leaves a client waiting."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Tenant
from tests.support.chat_api import assert_problem, send_and_collect
from tests.support.sse import SseEvent, iter_sse

FAST = {"local": {"delayMs": 0}}
# A turn that runs for about twenty seconds unless stopped: 400 words, 50 ms apart.
LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 400, "delayMs": 50}}}
# A resume that should end at once is given this long before the test calls it a hang.
HANG_GUARD_SECONDS = 30
UINT64_MAX = 2**64 - 1


async def finished_turn(client: httpx.AsyncClient, tenant: Tenant) -> tuple[str, list[SseEvent]]:
    """A finished turn's chat id and the events of its stream (the last one `[DONE]`)."""
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "one two three", "providerOptions": FAST}
    )
    assert response.status_code == 200
    assert events[-1].data == "[DONE]"
    return response.headers["x-chat-id"], events


async def resume(
    client: httpx.AsyncClient, tenant: Tenant, chat_id: str, cursor: str
) -> tuple[httpx.Response, list[SseEvent]]:
    # As bytes: a header is Latin-1 on the wire, and some cursors here are not ASCII.
    headers = {
        **{name.encode(): value.encode() for name, value in tenant.headers.items()},
        b"Last-Event-ID": cursor.encode("latin-1"),
    }
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return response, []
            return response, [event async for event in iter_sse(response)]


def split_cursor(cursor: str | None) -> tuple[str, int, int]:
    assert cursor is not None
    turn_id, _, entry_id = cursor.rpartition(":")
    milliseconds, _, sequence = entry_id.partition("-")
    return turn_id, int(milliseconds), int(sequence)


async def test_cursors_that_are_not_redis_entry_ids_are_400(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id, events = await finished_turn(client, tenant)
    turn_id, _, _ = split_cursor(events[0].id)
    not_entry_ids = [
        "99999999999999999999999-0",  # past 64 bits: Redis refuses it
        f"{UINT64_MAX + 1}-0",
        f"0-{UINT64_MAX + 1}",
        "²-³",  # digits to `str.isdigit`, but not decimal ones
        "12",  # no sequence
        "-1-0",
        "1-2-3",
        "1-",
        "+",
        "$",
        "0x10-0",
        "1" * 150 + "-0",  # longer than any cursor this service issues
    ]
    for entry_id in not_entry_ids:
        response, _ = await resume(client, tenant, chat_id, f"{turn_id}:{entry_id}")
        problem = assert_problem(response, 400)
        assert problem["type"] == "/problems/bad-request", entry_id
    assert (await client.get("/healthz")).status_code == 200


async def test_resume_after_the_last_event_of_a_finished_turn_ends_at_once(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id, events = await finished_turn(client, tenant)
    last = events[-2]  # the `finish` chunk: the client lost only `[DONE]`
    assert last.chunk["type"] == "finish"

    response, rest = await resume(client, tenant, chat_id, last.id or "")

    assert response.status_code == 200
    assert [event.data for event in rest] == ["[DONE]"]


async def test_resume_after_an_earlier_event_of_a_finished_turn_gets_exactly_the_rest(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id, events = await finished_turn(client, tenant)

    response, rest = await resume(client, tenant, chat_id, events[-3].id or "")

    assert response.status_code == 200
    assert rest == events[-2:]


async def test_cursor_beyond_a_finished_turns_stream_is_400(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id, events = await finished_turn(client, tenant)
    turn_id, milliseconds, sequence = split_cursor(events[-2].id)
    beyond = [
        f"{milliseconds}-{sequence + 1}",  # the next id Redis would have given
        f"{milliseconds + 60_000}-0",
        f"{UINT64_MAX}-{UINT64_MAX}",  # the largest entry id there is
    ]
    for entry_id in beyond:
        response, _ = await resume(client, tenant, chat_id, f"{turn_id}:{entry_id}")
        problem = assert_problem(response, 400)
        assert "beyond" in problem["detail"], entry_id


async def test_cursor_in_the_future_of_a_running_turn_is_400(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "go", **LONG}, headers=tenant.headers
    ) as sent:
        chat_id = sent.headers["x-chat-id"]
        async for event in iter_sse(sent):
            if event.chunk["type"] == "text-delta":
                delta = event
                break
    turn_id, milliseconds, _ = split_cursor(delta.id)
    try:
        # A day ahead of every entry the turn could write now.
        response, _ = await resume(
            client, tenant, chat_id, f"{turn_id}:{milliseconds + 86_400_000}-0"
        )
        problem = assert_problem(response, 400)
        assert "beyond" in problem["detail"]
    finally:
        stopped = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        assert stopped.status_code == 200

    # A cursor inside the turn's stream still gets the rest of it, to the end.
    response, rest = await resume(client, tenant, chat_id, delta.id or "")
    assert response.status_code == 200
    assert [event.chunk["type"] for event in rest[-3:-1]] == ["abort", "finish"]
    assert rest[-1].data == "[DONE]"
