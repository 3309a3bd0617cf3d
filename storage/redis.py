"""Redis client factory. Must never import api, workflows or activities."""

from __future__ import annotations

from redis.asyncio import Redis

# The longest a blocking stream read may wait; readers block for at most this long at a time.
BLOCKING_READ_LIMIT_SECONDS = 5


def create_redis(url: str) -> Redis:
    # Relays hold a connection per open stream while blocked in XREAD, so the pool is not capped low;
    # health checks replace connections that a Redis restart broke.
    return Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=5,
        # Longer than any blocking XREAD the relay issues, so a quiet stream is never a timeout.
        socket_timeout=BLOCKING_READ_LIMIT_SECONDS + 10,
    )
