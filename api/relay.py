"""The Redis Stream to SSE relay: replays a turn's chunks from a cursor, then follows them live.

Concurrency: sse-starlette runs this generator beside a ping task and a disconnect watcher; when the
client goes away it cancels the generator, which only stops following (its subscription to the
process's multiplexed reader ends with it). The turn itself runs in Temporal and never depends on a
reader. The relay holds no Redis connection of its own: the reader's few connections serve every
open stream, and the relay borrows a pooled one only for short, non-blocking reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import structlog
from redis.exceptions import ConnectionError, TimeoutError
from sse_starlette import EventSourceResponse, ServerSentEvent

from core.errors import BadRequestError
from storage.redis import BLOCKING_READ_LIMIT_SECONDS
from storage.stream_reader import MultiplexedStreamReader
from storage.streams import (
    FROM_STREAM_START,
    CursorPlace,
    TurnStreams,
    encode_chunk,
    parse_entry_id,
)

log = structlog.get_logger(__name__)

# After this long without an entry the relay looks at the stream itself: it may have expired or
# been lost, or the turn may have ended before the cursor; pings keep the connection alive meanwhile.
IDLE_CHECK_SECONDS = float(BLOCKING_READ_LIMIT_SECONDS)
FROM_START = FROM_STREAM_START
START_PREFIX = '{"type":"start",'
# The longest cursor this service issues: a turn id (a UUID) and two 20-digit decimals.
MAX_CURSOR_CHARS = 100
UI_MESSAGE_STREAM_HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
    "cache-control": "no-cache",
}


def format_cursor(turn_id: str, entry_id: str) -> str:
    return f"{turn_id}:{entry_id}"


def parse_cursor(cursor: str) -> tuple[str, str]:
    """(turn id, entry id) from a `Last-Event-ID`; one that is not a cursor this service could have
    issued (each part of the entry id a decimal that fits 64 bits) is a 400, never a guess."""
    turn_id, _, entry_id = cursor.rpartition(":")
    if not turn_id or len(cursor) > MAX_CURSOR_CHARS:
        raise BadRequestError("Last-Event-ID is not a cursor this service issued")
    try:
        parse_entry_id(entry_id)
    except ValueError as exc:
        raise BadRequestError("Last-Event-ID is not a cursor this service issued") from exc
    return turn_id, entry_id


async def check_cursor(
    streams: TurnStreams, organization_id: str, turn_id: str, after_entry_id: str
) -> None:
    """Refuse (400, before any byte of the stream) a cursor past everything the turn's stream
    holds or will hold; such a resume could only wait forever."""
    if after_entry_id == FROM_START:
        return
    place = await streams.locate_cursor(organization_id, turn_id, after_entry_id)
    if place is CursorPlace.BEYOND:
        raise BadRequestError("Last-Event-ID is beyond the end of this turn's stream")


# Given whether the client already holds part of the message: the stored message as chunks once the
# turn has ended, or None while it still runs.
StoredAnswer = Callable[[bool], Awaitable[list[dict[str, Any]] | None]]


async def relay_turn(
    reader: MultiplexedStreamReader,
    organization_id: str,
    turn_id: str,
    after_entry_id: str = FROM_START,
    *,
    stored_answer: StoredAnswer,
) -> AsyncIterator[ServerSentEvent]:
    cursor = after_entry_id
    streams = reader.streams
    resumed_after_pause = False

    async def ending() -> list[ServerSentEvent] | None:
        """The events that end this response now, or None to keep following."""
        try:
            place = await streams.locate_cursor(organization_id, turn_id, cursor)
        except (ConnectionError, TimeoutError):
            log.warning("relay.check_failed", turn_id=turn_id, exc_info=True)
            return None  # Redis is busy or away: keep following, look again later
        if place is CursorPlace.AT_END or place is CursorPlace.BEYOND:
            # Everything up to the turn's last event was delivered (a client that lost `[DONE]`).
            return [ServerSentEvent(data="[DONE]")]
        if place is CursorPlace.STREAM_GONE:
            # The stream expired, or Redis lost it. A finished turn is served from Postgres; a
            # running one will write a new stream (its next attempt reopens it), so keep waiting.
            chunks = await stored_answer(cursor != FROM_START)
            if chunks is not None:
                return [
                    *(ServerSentEvent(data=encode_chunk(chunk)) for chunk in chunks),
                    ServerSentEvent(data="[DONE]"),
                ]
        return None

    if (events := await ending()) is not None:
        for event in events:
            yield event
        return
    async with aclosing(
        reader.follow(organization_id, turn_id, cursor, idle_seconds=IDLE_CHECK_SECONDS)
    ) as batches:
        async for batch in batches:
            if not batch:
                if (events := await ending()) is not None:
                    for event in events:
                        yield event
                    return
                continue
            for entry in batch:
                cursor = entry.entry_id
                if resumed_after_pause and entry.chunk_json.startswith(START_PREFIX):
                    # The continuation's `start` repeats what this response already opened with.
                    resumed_after_pause = False
                    continue
                if entry.pauses_turn and await _continued(
                    streams, organization_id, turn_id, cursor
                ):
                    # The client answered this pause already: the same response reads on, as one
                    # message, rather than ending where the turn waited.
                    resumed_after_pause = True
                    continue
                yield ServerSentEvent(
                    data=entry.chunk_json, id=format_cursor(turn_id, entry.entry_id)
                )
                if entry.ends_stream:
                    yield ServerSentEvent(data="[DONE]")
                    return


async def _continued(
    streams: TurnStreams, organization_id: str, turn_id: str, entry_id: str
) -> bool:
    """Whether the turn's stream goes on after this entry."""
    return bool(await streams.read_range(organization_id, turn_id, entry_id, count=1))


def ui_message_stream_response(
    events: AsyncIterator[ServerSentEvent],
    *,
    chat_id: str,
    ping_seconds: float,
    extra: dict[str, Any] | None = None,
) -> EventSourceResponse:
    headers = {**UI_MESSAGE_STREAM_HEADERS, "X-Chat-Id": chat_id, **(extra or {})}
    return EventSourceResponse(events, headers=headers, ping=int(max(1, ping_seconds)))
