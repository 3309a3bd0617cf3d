"""The multiplexed stream reader against real Redis: followers that join late, lag behind their buffer
or follow many streams at once each get every entry once, in order, on the reader's one connection."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import psutil
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from storage.stream_reader import READER_CLIENT_NAME, MultiplexedStreamReader
from storage.streams import CHUNK_FIELD, TurnStreams

# Generous bound on waiting for entries that are already in Redis; never expected to be reached.
GUARD_SECONDS = 30
BUFFER_ENTRIES = 16


@pytest.fixture
async def reader(settings: Settings, redis: Redis) -> AsyncIterator[MultiplexedStreamReader]:
    streams = TurnStreams(redis, max_lifetime_seconds=600, retention_seconds=600)
    async with MultiplexedStreamReader(
        streams,
        settings.resolved_redis_url,
        redis,
        connections=1,
        buffer_entries=BUFFER_ENTRIES,
    ) as multiplexed:
        yield multiplexed


async def append(redis: Redis, organization_id: str, turn_id: str, texts: list[str]) -> list[str]:
    key = TurnStreams.stream_key(organization_id, turn_id)
    async with redis.pipeline(transaction=False) as pipe:
        for text in texts:
            pipe.xadd(key, {CHUNK_FIELD: text})
        return [str(entry_id) for entry_id in await pipe.execute()]


async def take(
    reader: MultiplexedStreamReader, organization_id: str, turn_id: str, after: str, count: int
) -> list[tuple[str, str]]:
    """The first `count` entries a follower from `after` gets, as (entry id, chunk)."""
    got: list[tuple[str, str]] = []
    async with asyncio.timeout(GUARD_SECONDS):
        async with aclosing(
            reader.follow(organization_id, turn_id, after, idle_seconds=0.5)
        ) as batches:
            async for batch in batches:
                got.extend((entry.entry_id, entry.chunk_json) for entry in batch)
                if len(got) >= count:
                    return got
    raise AssertionError("unreachable: follow never ends on its own")


async def test_followers_joining_a_live_stream_late_miss_nothing_and_repeat_nothing(
    reader: MultiplexedStreamReader, redis: Redis
) -> None:
    organization_id, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    total = 50
    ids = await append(redis, organization_id, turn_id, [f"early-{i}" for i in range(10)])
    live = asyncio.create_task(take(reader, organization_id, turn_id, "0-0", total))

    late: list[asyncio.Task[list[tuple[str, str]]]] = []
    for round_number in range(3):
        ids += await append(
            redis, organization_id, turn_id, [f"r{round_number}-{i}" for i in range(10)]
        )
        # One follower from the start, one from the newest entry: each joins a key already read.
        late.append(asyncio.create_task(take(reader, organization_id, turn_id, "0-0", total)))
        late.append(
            asyncio.create_task(take(reader, organization_id, turn_id, ids[-1], total - len(ids)))
        )
        await asyncio.sleep(0)
    ids += await append(redis, organization_id, turn_id, [f"last-{i}" for i in range(10)])

    assert [entry_id for entry_id, _ in await live] == ids
    for follower in late:
        got = await follower
        assert [entry_id for entry_id, _ in got] == ids[-len(got) :]


async def test_a_follower_far_behind_its_buffer_catches_up_with_every_entry_once(
    reader: MultiplexedStreamReader, redis: Redis
) -> None:
    organization_id, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    ids = await append(redis, organization_id, turn_id, ["first"])
    got: list[str] = []
    async with aclosing(
        reader.follow(organization_id, turn_id, "0-0", idle_seconds=0.5)
    ) as batches:
        async with asyncio.timeout(GUARD_SECONDS):
            got += [entry.entry_id for entry in await anext(batches)]
            # The follower stops reading while far more than its buffer holds is written.
            for start in range(0, 600, 50):
                ids += await append(
                    redis, organization_id, turn_id, [f"{start + i}" for i in range(50)]
                )
                await asyncio.sleep(0.01)  # let the reader fan each batch out
                assert reader.buffered_entries <= BUFFER_ENTRIES
            async for batch in batches:
                got += [entry.entry_id for entry in batch]
                if len(got) >= len(ids):
                    break
    assert got == ids


async def test_many_streams_share_one_reader_connection(
    reader: MultiplexedStreamReader, redis: Redis
) -> None:
    organization_id = str(uuid.uuid4())
    turns = [str(uuid.uuid4()) for _ in range(50)]
    followers = [
        asyncio.create_task(take(reader, organization_id, turn, "0-0", 3)) for turn in turns
    ]
    expected = {turn: await append(redis, organization_id, turn, ["a", "b", "c"]) for turn in turns}

    results = await asyncio.gather(*followers)

    for turn, got in zip(turns, results, strict=True):
        assert [entry_id for entry_id, _ in got] == expected[turn]
    own_ports = {
        connection.laddr.port
        for connection in psutil.Process(os.getpid()).net_connections("tcp")
        if connection.raddr
    }
    reader_connections = [
        client
        for client in await redis.client_list()
        if client["name"].startswith(READER_CLIENT_NAME)
        and int(client["addr"].rpartition(":")[2]) in own_ports
    ]
    assert len(reader_connections) == 1
    assert reader.followed_streams == 0, "a follower that stops leaves nothing behind"
