"""Redis client factory. Must never import api, workflows or activities."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

# The longest a blocking stream read may wait; readers block for at most this long at a time.
BLOCKING_READ_LIMIT_SECONDS = 5
# Retries of a command whose connection failed: enough to replace every pooled connection a Redis
# restart broke and to ride out a restart of a second or so.
COMMAND_RETRIES = 4


def connection_retry() -> Retry:
    """The retry policy for every command: reconnect and send again after a connection error.

    Without an explicit policy redis-py (8.1) gives pooled connections none, so the first command on
    each connection a Redis restart closed fails, even though its health check noticed. Every
    command this service sends is safe to send twice: reads, SET/EXPIRE, scripts written to be
    idempotent (see `storage.streams`), and rate-limit hits, where a double count only errs strict.
    """
    return Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=1.0),
        COMMAND_RETRIES,
        supported_errors=(ConnectionError, TimeoutError),
    )


def create_redis(url: str) -> Redis:
    # Relays hold a connection per open stream while blocked in XREAD, so the pool is not capped low;
    # health checks find connections that a Redis restart broke, and the retry replaces them.
    return Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=5,
        # Longer than any blocking XREAD the relay issues, so a quiet stream is never a timeout.
        socket_timeout=BLOCKING_READ_LIMIT_SECONDS + 10,
        retry=connection_retry(),
    )
