"""Redis client factory. Must never import api, workflows or activities."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(url: str) -> Redis:
    # Relays hold a connection per open stream while blocked in XREAD, so the pool is not capped low;
    # health checks replace connections that a Redis restart broke.
    return Redis.from_url(url, decode_responses=True, health_check_interval=10)
