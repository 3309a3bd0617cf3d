"""What the api's limits count: rate-limit windows and open-stream leases in Redis, running turns in Postgres.

Redis holds everything that several api replicas must agree on. Must never import api, workflows or
activities.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from datetime import timedelta

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.contracts import TurnStatus
from storage.models import Chat, Turn

RATE_LIMIT_KEY_PREFIX = "durachat:limits"

# KEYS: the lease set. ARGV: cap, lease ms, lease id. Drops expired leases, then adds this one if the
# set has room. Expiry uses the Redis clock, so replicas with skewed clocks still agree.
_ACQUIRE_LEASE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the lease set. ARGV: lease ms, lease id. Pushes a held lease's expiry out again. A released
# lease stays released, even when a renewal was already on its way as the stream ended.
_RENEW_LEASE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


@functools.cache
def parse_rate_limit(value: str) -> tuple[RateLimitItem, ...]:
    """The rate limits a setting names ("60/minute", "10/second;300/hour"); none for an empty one."""
    return tuple(parse_many(value)) if value else ()


class RateLimiter:
    """Moving-window rate limits, counted in Redis by the `limits` package so every replica shares them."""

    def __init__(self, redis: Redis, redis_url: str) -> None:
        # The `limits` storage borrows the api's own connection pool instead of opening another.
        storage = RedisStorage(
            f"async+{redis_url}",
            implementation="redispy",
            key_prefix=RATE_LIMIT_KEY_PREFIX,
            # Documented by `limits`, though its annotation of the options is narrower.
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(storage)

    async def hit(self, items: Sequence[RateLimitItem], *identifiers: str) -> int | None:
        """Count one request against each limit; None when all allow it, else whole seconds to wait.

        A refused request uses up nothing in the limit that refused it.
        """
        for item in items:
            if not await self._limiter.hit(item, *identifiers):
                stats = await self._limiter.get_window_stats(item, *identifiers)
                return max(1, math.ceil(stats.reset_time - time.time()))
        return None


class StreamLeases:
    """Slots for open streams, capped per API key: one expiring lease per open stream in a sorted set.

    A stream renews its lease while it is open and releases it when it ends; a lease whose process
    died expires on its own, so no slot leaks.
    """

    def __init__(self, redis: Redis, *, lease_seconds: int) -> None:
        self._redis = redis
        self._lease_ms = lease_seconds * 1000
        self._acquire = redis.register_script(_ACQUIRE_LEASE)
        self._renew = redis.register_script(_RENEW_LEASE)

    @property
    def renew_every_seconds(self) -> float:
        return self._lease_ms / 1000 / 3

    @staticmethod
    def key(organization_id: str, api_key_id: str) -> str:
        return f"{organization_id}:key:{api_key_id}:streams"

    async def acquire(self, key: str, lease_id: str, cap: int) -> bool:
        return bool(await self._acquire(keys=[key], args=[cap, self._lease_ms, lease_id]))

    async def renew(self, key: str, lease_id: str) -> None:
        await self._renew(keys=[key], args=[self._lease_ms, lease_id])

    async def release(self, key: str, lease_id: str) -> None:
        await self._redis.zrem(key, lease_id)


async def count_running_turns(
    session: AsyncSession, organization_id: str, *, presumed_lost_after: timedelta
) -> int:
    """How many of the organization's chats hold the lease of a running turn.

    A turn still marked running after `presumed_lost_after` (its stream's longest lifetime) is
    taken for lost, so a workflow that was terminated from outside cannot hold a slot forever.
    """
    result = await session.execute(
        select(func.count())
        .select_from(Chat)
        .join(
            Turn, (Turn.organization_id == Chat.organization_id) & (Turn.id == Chat.active_turn_id)
        )
        .where(
            Chat.organization_id == organization_id,
            Chat.active_turn_id.is_not(None),
            Turn.status == TurnStatus.RUNNING,
            Turn.created_at > func.now() - presumed_lost_after,
        )
    )
    return int(result.scalar_one())
