"""The turn stream's writes against real Redis: fencing by attempt, appends that are safe to send
twice, and a client that keeps working when Redis restarts under it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from devstack.embedded import EmbeddedRedis
from devstack.ports import free_port_block
from storage.redis import create_redis
from storage.streams import StaleAttemptError, TurnStreams


@pytest.fixture
def streams(redis: Redis) -> TurnStreams:
    return TurnStreams(redis, max_lifetime_seconds=600, retention_seconds=600)


def delta(text: str) -> dict[str, str]:
    return {"type": "text-delta", "id": "t", "delta": text}


async def stored_deltas(redis: Redis, organization_id: str, turn_id: str) -> list[str]:
    entries = await redis.xrange(TurnStreams.stream_key(organization_id, turn_id))
    return [fields["c"] for _entry_id, fields in entries]


async def test_a_batch_sent_again_is_appended_once(streams: TurnStreams, redis: Redis) -> None:
    organization_id, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    await streams.begin_attempt(organization_id, turn_id, 1)

    first = await streams.append(organization_id, turn_id, 1, 1, [delta("a"), delta("b")])
    # The reply to the first send was lost, so the client sends the same batch again.
    again = await streams.append(organization_id, turn_id, 1, 1, [delta("a"), delta("b")])
    second = await streams.append(organization_id, turn_id, 1, 2, [delta("c")])

    assert again.last_entry_id == first.last_entry_id
    assert second.last_entry_id > first.last_entry_id
    assert len(await stored_deltas(redis, organization_id, turn_id)) == 3


async def test_a_batch_that_skips_one_is_refused(streams: TurnStreams, redis: Redis) -> None:
    organization_id, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    await streams.begin_attempt(organization_id, turn_id, 1)

    with pytest.raises(ResponseError, match="batch 2 follows batch 0"):
        await streams.append(organization_id, turn_id, 1, 2, [delta("a")])
    assert await stored_deltas(redis, organization_id, turn_id) == []


async def test_a_superseded_attempt_can_no_longer_append(
    streams: TurnStreams, redis: Redis
) -> None:
    organization_id, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    await streams.begin_attempt(organization_id, turn_id, 1)
    await streams.append(organization_id, turn_id, 1, 1, [delta("old")])

    await streams.begin_attempt(organization_id, turn_id, 2)
    # Claiming the current attempt again (a resent claim) keeps its batch count.
    await streams.append(organization_id, turn_id, 2, 1, [delta("new")])
    await streams.begin_attempt(organization_id, turn_id, 2)
    await streams.append(organization_id, turn_id, 2, 1, [delta("new")])

    with pytest.raises(StaleAttemptError):
        await streams.append(organization_id, turn_id, 1, 2, [delta("late")])
    with pytest.raises(StaleAttemptError):
        await streams.begin_attempt(organization_id, turn_id, 1)
    assert len(await stored_deltas(redis, organization_id, turn_id)) == 2


async def test_the_client_keeps_working_when_redis_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis-data", free_port_block(), persistent=False)
    with server:
        client = create_redis(server.url, max_connections=10, pool_timeout_seconds=5)
        try:
            # Several pooled connections, as a busy worker or api holds.
            await asyncio.gather(*(client.set(f"key-{i}", i) for i in range(6)))
            pooled = len(client.connection_pool._available_connections)
            assert pooled == 6

            server.stop()
            server.start()
            server.wait_ready()

            # Each pooled connection was closed by the restart; every command still succeeds.
            for _ in range(pooled + 2):
                assert await client.set("after-restart", "1")
            results = await asyncio.gather(*(client.get("after-restart") for _ in range(pooled)))
            assert results == ["1"] * pooled
        finally:
            await client.aclose()
