"""Per-turn Redis Streams: the chunk log that generation appends to and every SSE relay reads from.

Keys start with the organization id. Entry ids double as SSE cursors. Appends are fenced by attempt
number so a generation attempt that was superseded (a worker presumed dead, still running) can no
longer write into the stream its successor owns. Every write is idempotent, so the Redis client may
send it again after a connection error without a chunk appearing twice. Must never import api,
workflows or activities.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

# A stream ends with `finish` (also after `abort`) or `error`.
STREAM_END_PREFIXES = ('{"type":"finish"', '{"type":"error"')
CHUNK_FIELD = "c"
# A cursor before the first entry of every stream.
FROM_STREAM_START = "0-0"
# In the metadata of a pausing `finish` (see StreamEntry.pauses_turn).
PAUSE_METADATA_KEY = "awaiting"
PAUSE_MARK = f'"{PAUSE_METADATA_KEY}":'

# `abort` is written with the last batch of a stopped attempt: it is among the newest entries.
ABORT_LOOKBACK = 4
# The opening chunks get the smallest possible explicit ids, so writing them twice is a no-op.
OPENING_ENTRY_IDS = ("0-1", "0-2")

# The fence is a hash: the attempt that owns the stream, how many batches it has appended, and the
# id of its last entry. Batches are numbered from 1 per attempt, so a batch sent again (the reply to
# the first send was lost) is recognised and not appended twice.

# KEYS: stream, fence, abort flag. ARGV: attempt, batch number, chunk json... Appends only while
# `attempt` is the current one; returns {last id, 1 if a stop was requested}, so the writer learns
# of a stop at once.
_FENCED_APPEND = """
local fence = redis.call('HMGET', KEYS[2], 'attempt', 'batches', 'last')
if tonumber(fence[1] or '0') ~= tonumber(ARGV[1]) then return false end
local batch = tonumber(ARGV[2])
local appended = tonumber(fence[2] or '0')
local last = fence[3]
if batch == appended + 1 then
  for i = 3, #ARGV do last = redis.call('XADD', KEYS[1], '*', 'c', ARGV[i]) end
  redis.call('HSET', KEYS[2], 'batches', batch, 'last', last)
elseif batch > appended + 1 then
  return redis.error_reply('batch ' .. batch .. ' follows batch ' .. appended)
end
return {last, redis.call('EXISTS', KEYS[3])}
"""

# ARGV: attempt, lifetime seconds. Raises the fence to `attempt` unless a later attempt holds it;
# claiming the current attempt again keeps its batch count.
_CLAIM_ATTEMPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local wanted = tonumber(ARGV[1])
if wanted < current then return 0 end
if wanted > current then
  redis.call('HSET', KEYS[1], 'attempt', wanted, 'batches', 0, 'last', '')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# ARGV: retention seconds, chunk json... Appends the terminal chunks once, then starts the retention clock.
_APPEND_TERMINAL = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #ARGV do redis.call('XADD', KEYS[1], '*', 'c', ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 1
"""


# KEYS: stream, markers hash. ARGV: lifetime seconds, marker, chunk json... Appends the chunks only
# the first time `marker` is seen for the turn: steps opened, tool outcomes, approval requests and
# pauses are published by activities that may run again, and each must reach clients once. These
# writes are not fenced: they come between generation attempts, never beside one.
_APPEND_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[2], '1') == 0 then return 0 end
for i = 3, #ARGV do redis.call('XADD', KEYS[1], '*', 'c', ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


def encode_chunk(chunk: dict[str, Any]) -> str:
    return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StreamEntry:
    entry_id: str
    chunk_json: str

    @property
    def ends_stream(self) -> bool:
        # Every chunk is encoded with "type" first, so a prefix test avoids parsing each delta.
        return self.chunk_json.startswith(STREAM_END_PREFIXES)

    @property
    def pauses_turn(self) -> bool:
        """A `finish` that ends the client's response while the turn waits for it (an approval,
        client-side tool outputs); the turn's stream goes on after the client answers."""
        return self.chunk_json.startswith(STREAM_END_PREFIXES[0]) and PAUSE_MARK in self.chunk_json


@dataclass(frozen=True)
class AppendResult:
    last_entry_id: str
    stop_requested: bool


# An entry id is two unsigned 64-bit decimals, `<milliseconds>-<sequence>`; Redis refuses anything else.
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_UINT64_MAX = 2**64 - 1
EntryId = tuple[int, int]


def parse_entry_id(text: str) -> EntryId:
    """An entry id as a comparable pair; ValueError when it is not one Redis could have issued."""
    match = _ENTRY_ID.fullmatch(text)
    if match is None:
        raise ValueError(f"{text[:60]!r} is not a stream entry id")
    milliseconds, sequence = int(match[1]), int(match[2])
    if milliseconds > _UINT64_MAX or sequence > _UINT64_MAX:
        raise ValueError(f"{text[:60]!r} does not fit a stream entry id")
    return milliseconds, sequence


class CursorPlace(Enum):
    """Where a reader's cursor stands in a turn's stream."""

    # Entries follow it now, or may follow later.
    INSIDE = "inside"
    # It is the turn's terminal entry: nothing will ever follow.
    AT_END = "at-end"
    # Past everything the stream holds or could hold: no cursor this service issued.
    BEYOND = "beyond"
    # Redis holds no stream for the turn (expired, or lost).
    STREAM_GONE = "stream-gone"


class StaleAttemptError(Exception):
    """A later generation attempt owns the turn's stream now; this one must stop writing."""


class TurnStreams:
    def __init__(self, redis: Redis, *, max_lifetime_seconds: int, retention_seconds: int) -> None:
        self._redis = redis
        self._max_lifetime = max_lifetime_seconds
        self._retention = retention_seconds
        self._fenced_append = redis.register_script(_FENCED_APPEND)
        self._claim_attempt = redis.register_script(_CLAIM_ATTEMPT)
        self._append_terminal = redis.register_script(_APPEND_TERMINAL)
        self._append_once = redis.register_script(_APPEND_ONCE)

    @staticmethod
    def stream_key(organization_id: str, turn_id: str) -> str:
        return f"{organization_id}:turn:{turn_id}:chunks"

    @staticmethod
    def _fence_key(organization_id: str, turn_id: str) -> str:
        return f"{organization_id}:turn:{turn_id}:fence"

    @staticmethod
    def _markers_key(organization_id: str, turn_id: str) -> str:
        return f"{organization_id}:turn:{turn_id}:once"

    @staticmethod
    def _abort_key(organization_id: str, turn_id: str) -> str:
        return f"{organization_id}:turn:{turn_id}:stop"

    @staticmethod
    def _terminal_key(organization_id: str, turn_id: str) -> str:
        return f"{organization_id}:turn:{turn_id}:ended"

    async def publish_opening(
        self, organization_id: str, turn_id: str, chunks: tuple[dict[str, Any], dict[str, Any]]
    ) -> None:
        """Write the stream's first two chunks (`start`, `start-step`) once, however often called."""
        key = self.stream_key(organization_id, turn_id)
        for entry_id, chunk in zip(OPENING_ENTRY_IDS, chunks, strict=True):
            try:
                await self._redis.xadd(key, {CHUNK_FIELD: encode_chunk(chunk)}, id=entry_id)
            except ResponseError as exc:
                # "equal or smaller than the target stream top item": written by an earlier try.
                if "equal or smaller" not in str(exc):
                    raise
        await self._redis.expire(key, self._max_lifetime)

    async def begin_attempt(self, organization_id: str, turn_id: str, attempt: int) -> None:
        owned = await self._claim_attempt(
            keys=[self._fence_key(organization_id, turn_id)], args=[attempt, self._max_lifetime]
        )
        if not owned:
            raise StaleAttemptError(f"attempt {attempt} of turn {turn_id} was superseded")

    async def append(
        self,
        organization_id: str,
        turn_id: str,
        attempt: int,
        batch: int,
        chunks: Sequence[dict[str, Any]],
    ) -> AppendResult:
        """Append batch number `batch` (1, 2, ... per attempt); sending a batch again is a no-op."""
        result = await self._fenced_append(
            keys=[
                self.stream_key(organization_id, turn_id),
                self._fence_key(organization_id, turn_id),
                self._abort_key(organization_id, turn_id),
            ],
            args=[attempt, batch, *(encode_chunk(chunk) for chunk in chunks)],
        )
        if result is None:
            raise StaleAttemptError(f"attempt {attempt} of turn {turn_id} was superseded")
        last_id, stop_requested = result
        return AppendResult(last_entry_id=str(last_id), stop_requested=bool(stop_requested))

    async def append_once(
        self, organization_id: str, turn_id: str, marker: str, chunks: Sequence[dict[str, Any]]
    ) -> bool:
        """Append `chunks` unless chunks under `marker` were appended for this turn before;
        False when they were."""
        appended = await self._append_once(
            keys=[
                self.stream_key(organization_id, turn_id),
                self._markers_key(organization_id, turn_id),
            ],
            args=[self._max_lifetime, marker, *(encode_chunk(chunk) for chunk in chunks)],
        )
        return bool(appended)

    async def append_transient(
        self, organization_id: str, turn_id: str, chunk: dict[str, Any]
    ) -> None:
        """Append a chunk clients show but never store (a running tool's status): written as it
        comes, since one that repeats after a retry only says the same thing again."""
        await self._redis.xadd(
            self.stream_key(organization_id, turn_id), {CHUNK_FIELD: encode_chunk(chunk)}
        )

    async def request_stop(self, organization_id: str, turn_id: str) -> None:
        """The fast path of a stop: generation sees this flag at its next write or poll."""
        await self._redis.set(self._abort_key(organization_id, turn_id), "1", ex=self._max_lifetime)

    async def append_terminal(
        self, organization_id: str, turn_id: str, chunks: Sequence[dict[str, Any]]
    ) -> bool:
        """Append the closing chunks exactly once per turn; False when they were already appended."""
        appended = await self._append_terminal(
            keys=[
                self.stream_key(organization_id, turn_id),
                self._terminal_key(organization_id, turn_id),
                self._fence_key(organization_id, turn_id),
            ],
            args=[self._retention, *(encode_chunk(chunk) for chunk in chunks)],
        )
        return bool(appended)

    async def read_range(
        self,
        organization_id: str,
        turn_id: str,
        after_entry_id: str,
        until_entry_id: str = "+",
        *,
        count: int,
    ) -> list[StreamEntry]:
        """Up to `count` entries after `after_entry_id`, up to and including `until_entry_id`; never blocks."""
        entries: list[tuple[str, dict[str, str]]] = await self._redis.xrange(
            self.stream_key(organization_id, turn_id),
            min=f"({after_entry_id}",
            max=until_entry_id,
            count=count,
        )  # type: ignore[assignment]
        return [StreamEntry(entry_id, fields[CHUNK_FIELD]) for entry_id, fields in entries]

    async def last_entry(self, organization_id: str, turn_id: str) -> StreamEntry | None:
        """The stream's newest entry; None when Redis holds no stream for the turn."""
        entries: list[tuple[str, dict[str, str]]] = await self._redis.xrevrange(
            self.stream_key(organization_id, turn_id), count=1
        )  # type: ignore[assignment]
        return StreamEntry(entries[0][0], entries[0][1][CHUNK_FIELD]) if entries else None

    async def locate_cursor(
        self, organization_id: str, turn_id: str, after_entry_id: str
    ) -> CursorPlace:
        """Where a reader's cursor stands in the turn's stream (see `CursorPlace`)."""
        tail = await self.last_entry(organization_id, turn_id)
        if tail is None:
            return CursorPlace.STREAM_GONE
        cursor, last = parse_entry_id(after_entry_id), parse_entry_id(tail.entry_id)
        if cursor < last:
            return CursorPlace.INSIDE
        # A paused turn's stream goes on once its client answers.
        ended = tail.ends_stream and not tail.pauses_turn
        if cursor == last:
            return CursorPlace.AT_END if ended else CursorPlace.INSIDE
        if ended:
            return CursorPlace.BEYOND
        # Past the last entry of a running turn: a stream Redis lost and the turn wrote again starts
        # over at the current time, so a cursor up to the server's clock may still be reached.
        seconds, microseconds = await self._redis.time()
        now_ms = seconds * 1000 + microseconds // 1000
        return CursorPlace.BEYOND if cursor[0] > now_ms else CursorPlace.INSIDE

    async def abort_streamed(self, organization_id: str, turn_id: str) -> bool:
        """Whether the turn's stream already ends in `abort` (generation sends it as soon as it
        sees a stop): the terminal chunks must not repeat it."""
        entries: list[tuple[str, dict[str, str]]] = await self._redis.xrevrange(
            self.stream_key(organization_id, turn_id), count=ABORT_LOOKBACK
        )  # type: ignore[assignment]
        return any(
            json.loads(fields[CHUNK_FIELD]).get("type") == "abort" for _entry_id, fields in entries
        )

    async def stops_requested(self, turns: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (organization id, turn id) pairs have a stop requested: one round trip."""
        if not turns:
            return set()
        flags = await self._redis.mget([self._abort_key(org, turn) for org, turn in turns])
        return {pair for pair, flag in zip(turns, flags, strict=True) if flag is not None}

    async def all_chunks(self, organization_id: str, turn_id: str) -> list[dict[str, Any]]:
        """Every chunk the turn's stream holds, oldest first (none if Redis no longer has it)."""
        entries: list[tuple[str, dict[str, str]]] = await self._redis.xrange(
            self.stream_key(organization_id, turn_id)
        )  # type: ignore[assignment]
        return [json.loads(fields[CHUNK_FIELD]) for _entry_id, fields in entries]
