"""The multiplexed stream reader: a few blocking XREADs over every turn stream a process follows,
fanned out to each open stream's bounded buffer. Must never import api, workflows or activities.

A reader per open stream would hold a Redis connection per stream while it blocks, so connections
(and blocked clients on the server) would grow with the streams. Here each of a fixed number of
shards owns one dedicated connection and one task, which issues `XREAD BLOCK` over all the keys its
subscribers follow, from the position it has read each key up to, and hands every entry to each
subscriber of that key.

Concurrency, all on one event loop:
- `subscribe` and `unsubscribe` are synchronous, so a subscriber is added between two fan-outs and
  the position it is told is exactly where its buffer starts: entries up to that position it reads
  itself (`XRANGE` over the shared pool), entries after it arrive in the buffer. No gap, no repeat.
- A key new to the shard must be in the very next read: the shard wakes its blocked read with
  `CLIENT UNBLOCK` (the pattern the Redis docs give for many streams on few connections), and the
  read's block is short enough to bound the wait if a wake-up is lost.
- A buffer that would grow past its bound (a client that reads slower than the turn writes) stops
  receiving; its follower drains it, then subscribes again and catches up from Redis at its own
  pace. Redis keeps the stream, so nothing is lost and memory stays bounded.
- A read's results are applied to a key only if the key is still read from the position the read
  asked for; a key dropped and subscribed again meanwhile starts over from its new position.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis import create_blocking_reader_connection
from storage.streams import CHUNK_FIELD, EntryId, StreamEntry, TurnStreams, parse_entry_id

log = structlog.get_logger(__name__)

# The name of each shard's connection in `CLIENT LIST`.
READER_CLIENT_NAME = "durachat-stream-reader"
# How long one shard read blocks at most. Only a lost wake-up ever waits this long for a new key;
# otherwise a quiet read just loops.
READ_BLOCK_MS = 1000
# Entries one read takes per key at most; never more than half a subscriber's buffer, so that one
# read can always be delivered to a follower that has caught up.
MAX_ENTRIES_PER_KEY_READ = 128
# How many times, and how far apart, a shard retries waking a read that had not reached Redis yet.
WAKE_TRIES = 20
WAKE_RETRY_SECONDS = 0.005
# Pause after a failed read (Redis restarting) before trying again; positions are kept meanwhile.
READ_RETRY_SECONDS = 0.5


# What `XREAD` answers (RESP2, decoded): per key, its entries as (entry id, fields).
XReadResponse = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None


def _format_entry_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


class Subscription:
    """One follower's buffer of entries of one key, filled by its shard, bounded in size."""

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self._limit = limit
        self._entries: deque[StreamEntry] = deque()
        self._arrived = asyncio.Event()
        # The shard stopped filling the buffer: it would have overflowed, or the read failed.
        self.detached = False
        self.error: RedisError | None = None

    @property
    def buffered(self) -> int:
        return len(self._entries)

    def deliver(self, entries: list[StreamEntry]) -> bool:
        """Buffer `entries`; False (and detached) when they do not fit."""
        if len(self._entries) + len(entries) > self._limit:
            self.detached = True
        else:
            self._entries.extend(entries)
        self._arrived.set()
        return not self.detached

    def fail(self, error: RedisError) -> None:
        self.detached = True
        self.error = error
        self._arrived.set()

    async def take(self, timeout_seconds: float) -> list[StreamEntry]:
        """What the buffer holds, waiting up to `timeout_seconds` for something; [] if nothing came."""
        if not self._entries and not self.detached:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_seconds):
                    await self._arrived.wait()
        batch = list(self._entries)
        self._entries.clear()
        return batch


@dataclass
class _KeyState:
    position: EntryId
    subscribers: set[Subscription] = field(default_factory=set)


class _Shard:
    """One dedicated connection and one task reading every key of its subscribers."""

    def __init__(self, index: int, redis_url: str, control: Redis, buffer_entries: int) -> None:
        self._index = index
        self._connection = create_blocking_reader_connection(
            redis_url, client_name=f"{READER_CLIENT_NAME}-{index}"
        )
        # Wake-ups go over the shared pool: the dedicated connection is busy blocking.
        self._control = control
        self._buffer_entries = buffer_entries
        self._entries_per_read = max(1, min(MAX_ENTRIES_PER_KEY_READ, buffer_entries // 2))
        self._keys: dict[str, _KeyState] = {}
        # Keys added since the last read that succeeded: suspects if Redis refuses a read.
        self._unproven: set[str] = set()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        # Bumped when a key is added; a read in flight covers the keys of `_read_version`.
        self._version = 0
        self._read_version: int | None = None
        self._client_id: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_forever(), name=f"stream-reader-{self._index}"),
            asyncio.create_task(self._wake_reads(), name=f"stream-reader-{self._index}-wake"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._connection.aclose()

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def buffered_entries(self) -> int:
        return sum(
            subscription.buffered
            for state in self._keys.values()
            for subscription in state.subscribers
        )

    def subscribe(self, key: str, after: EntryId) -> tuple[Subscription, EntryId]:
        """A buffer for entries of `key` after the returned position (at least `after`)."""
        subscription = Subscription(key, self._buffer_entries)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(position=after)
            self._unproven.add(key)
            self._version += 1
            self._changed.set()
            self._wake.set()
        state.subscribers.add(subscription)
        return subscription, state.position

    def unsubscribe(self, subscription: Subscription) -> None:
        state = self._keys.get(subscription.key)
        if state is None:
            return
        state.subscribers.discard(subscription)
        if not state.subscribers:
            # A read in flight may still return entries of the key; they are dropped.
            del self._keys[subscription.key]
            self._unproven.discard(subscription.key)

    async def _read_forever(self) -> None:
        while True:
            if not self._keys:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                await self._read_once()
            except (ConnectionError, RedisTimeoutError):
                # The next connection gets a new id; positions stay, so no entry is lost.
                self._client_id = None
                log.warning("stream_reader.read_failed", shard=self._index, exc_info=True)
                await asyncio.sleep(READ_RETRY_SECONDS)
            except Exception:
                # Never let the task die: every open stream of the process depends on it.
                self._client_id = None
                log.exception("stream_reader.unexpected_error", shard=self._index)
                await asyncio.sleep(READ_RETRY_SECONDS)

    async def _read_once(self) -> None:
        if self._client_id is None:
            self._client_id = await self._connection.client_id()
        # Taken together, with no await between: the read covers exactly these keys.
        requested = {key: state.position for key, state in self._keys.items()}
        self._read_version = self._version
        try:
            response: XReadResponse = await self._connection.xread(  # type: ignore[assignment]
                {key: _format_entry_id(position) for key, position in requested.items()},
                count=self._entries_per_read,
                block=READ_BLOCK_MS,
            )
        except ResponseError as exc:
            self._refuse_suspects(exc)
            return
        finally:
            self._read_version = None
        self._unproven.difference_update(requested)
        self._fan_out(requested, response)

    def _fan_out(self, requested: dict[str, EntryId], response: XReadResponse) -> None:
        for key, raw_entries in response or ():
            state = self._keys.get(key)
            if state is None or state.position != requested.get(key) or not raw_entries:
                continue  # dropped, or subscribed again from elsewhere while the read was out
            entries = [
                StreamEntry(entry_id, fields[CHUNK_FIELD]) for entry_id, fields in raw_entries
            ]
            state.position = parse_entry_id(entries[-1].entry_id)
            for subscription in list(state.subscribers):
                if not subscription.deliver(entries):
                    self.unsubscribe(subscription)

    def _refuse_suspects(self, error: ResponseError) -> None:
        """Redis refused the whole read: end the subscriptions of the keys that joined since the last
        good read (all of them if none did), so one bad key cannot stop every other stream."""
        suspects = self._unproven or set(self._keys)
        log.error(
            "stream_reader.read_refused", shard=self._index, keys=len(suspects), error=str(error)
        )
        for key in suspects:
            state = self._keys.pop(key, None)
            for subscription in state.subscribers if state else ():
                subscription.fail(error)
        self._unproven.clear()

    async def _wake_reads(self) -> None:
        """Unblock a read in flight that does not cover the newest keys, so they are read at once."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            for _ in range(WAKE_TRIES):
                read_version, client_id = self._read_version, self._client_id
                if read_version is None or read_version >= self._version or client_id is None:
                    break  # no read is out, or the one out already covers every key
                try:
                    if await self._control.client_unblock(client_id):
                        break
                except RedisError:
                    break  # the read's block bounds the wait instead
                # The read had not reached Redis yet (or just returned): look again shortly.
                await asyncio.sleep(WAKE_RETRY_SECONDS)


class MultiplexedStreamReader:
    """Follows turn streams for a whole api process over a fixed number of Redis connections."""

    def __init__(
        self,
        streams: TurnStreams,
        redis_url: str,
        control: Redis,
        *,
        connections: int,
        buffer_entries: int,
    ) -> None:
        self.streams = streams
        self._buffer_entries = buffer_entries
        self._shards = [
            _Shard(index, redis_url, control, buffer_entries) for index in range(connections)
        ]

    async def __aenter__(self) -> Self:
        for shard in self._shards:
            shard.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.gather(*(shard.aclose() for shard in self._shards))

    @property
    def followed_streams(self) -> int:
        return sum(shard.key_count for shard in self._shards)

    @property
    def buffered_entries(self) -> int:
        """Entries waiting in followers' buffers: at most the buffer bound per follower."""
        return sum(shard.buffered_entries for shard in self._shards)

    def _shard_for(self, key: str) -> _Shard:
        return self._shards[zlib.crc32(key.encode()) % len(self._shards)]

    async def follow(
        self, organization_id: str, turn_id: str, after_entry_id: str, *, idle_seconds: float
    ) -> AsyncGenerator[list[StreamEntry]]:
        """Batches of the turn's entries after `after_entry_id`, in order, each exactly once, without
        end; an empty batch whenever `idle_seconds` pass without one. Close it (`aclosing`) to stop."""
        key = self.streams.stream_key(organization_id, turn_id)
        shard = self._shard_for(key)
        cursor = parse_entry_id(after_entry_id)
        while True:
            subscription, buffered_after = shard.subscribe(key, cursor)
            try:
                # Entries up to where the buffer starts come from Redis, page by page.
                while cursor < buffered_after:
                    page = await self.streams.read_range(
                        organization_id,
                        turn_id,
                        _format_entry_id(cursor),
                        _format_entry_id(buffered_after),
                        count=self._buffer_entries,
                    )
                    if not page:
                        break  # trimmed or lost meanwhile: the buffer carries on after it
                    cursor = parse_entry_id(page[-1].entry_id)
                    yield page
                cursor = max(cursor, buffered_after)
                while True:
                    batch = await subscription.take(idle_seconds)
                    if batch and parse_entry_id(batch[0].entry_id) <= cursor:
                        # Subscribed ahead of the shard's position: skip what was handed out.
                        batch = [e for e in batch if parse_entry_id(e.entry_id) > cursor]
                        if not batch:
                            continue
                    if batch:
                        cursor = parse_entry_id(batch[-1].entry_id)
                        yield batch
                    elif subscription.detached:
                        break
                    else:
                        yield []
                if subscription.error is not None:
                    raise subscription.error
            finally:
                shard.unsubscribe(subscription)
            # The buffer overflowed: subscribe again from the last entry handed out.
