"""The Redis Stream to SSE relay: replays a turn's chunks from a cursor, then follows them live.

Concurrency: sse-starlette runs this generator beside a ping task and a disconnect watcher; when the
client goes away it cancels the generator, which only stops reading. The turn itself runs in
Temporal and never depends on a reader.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from core.errors import BadRequestError
from storage.redis import BLOCKING_READ_LIMIT_SECONDS
from storage.streams import StreamEntry, TurnStreams, encode_chunk

# How long one XREAD blocks before the relay loops; pings keep the connection alive meanwhile.
READ_BLOCK_MS = BLOCKING_READ_LIMIT_SECONDS * 1000
FROM_START = "0-0"
UI_MESSAGE_STREAM_HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
    "cache-control": "no-cache",
}


def format_cursor(turn_id: str, entry_id: str) -> str:
    return f"{turn_id}:{entry_id}"


def parse_cursor(cursor: str) -> tuple[str, str]:
    """(turn id, entry id) from a `Last-Event-ID`; a malformed one is a 400, never a guess."""
    turn_id, _, entry_id = cursor.rpartition(":")
    milliseconds, _, sequence = entry_id.partition("-")
    if not turn_id or not milliseconds.isdigit() or not sequence.isdigit():
        raise BadRequestError("Last-Event-ID is not a cursor this service issued")
    return turn_id, entry_id


# Given whether the client already holds part of the message: the stored message as chunks once the
# turn has ended, or None while it still runs.
StoredAnswer = Callable[[bool], Awaitable[list[dict[str, Any]] | None]]


async def relay_turn(
    streams: TurnStreams,
    organization_id: str,
    turn_id: str,
    after_entry_id: str = FROM_START,
    *,
    stored_answer: StoredAnswer,
) -> AsyncIterator[ServerSentEvent]:
    cursor = after_entry_id
    entries: list[StreamEntry] = []
    while True:
        if not entries and not await streams.exists(organization_id, turn_id):
            # The stream expired, or Redis lost it. A finished turn is served from Postgres; a
            # running one will write a new stream (its next attempt reopens it), so keep waiting.
            chunks = await stored_answer(cursor != FROM_START)
            if chunks is not None:
                for chunk in chunks:
                    yield ServerSentEvent(data=encode_chunk(chunk))
                yield ServerSentEvent(data="[DONE]")
                return
        entries = await streams.read_after(organization_id, turn_id, cursor, block_ms=READ_BLOCK_MS)
        for entry in entries:
            cursor = entry.entry_id
            yield ServerSentEvent(data=entry.chunk_json, id=format_cursor(turn_id, entry.entry_id))
            if entry.ends_stream:
                yield ServerSentEvent(data="[DONE]")
                return


def ui_message_stream_response(
    events: AsyncIterator[ServerSentEvent],
    *,
    chat_id: str,
    ping_seconds: float,
    extra: dict[str, Any] | None = None,
) -> EventSourceResponse:
    headers = {**UI_MESSAGE_STREAM_HEADERS, "X-Chat-Id": chat_id, **(extra or {})}
    return EventSourceResponse(events, headers=headers, ping=int(max(1, ping_seconds)))
