"""Redis client factories: the bounded shared pool and the dedicated connection of a blocking reader.
Must never import api, workflows or activities."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError, MaxConnectionsError, TimeoutError

# The longest a blocking stream read may wait; readers block for at most this long at a time.
BLOCKING_READ_LIMIT_SECONDS = 5
# Retries of a command whose connection failed: enough to replace every pooled connection a Redis
# restart broke and to ride out a restart of a second or so.
COMMAND_RETRIES = 4
# A command (and a blocking read) that takes longer than this has lost its server.
SOCKET_TIMEOUT_SECONDS = BLOCKING_READ_LIMIT_SECONDS + 10


class RedisPoolExhaustedError(MaxConnectionsError):
    """Every pooled connection stayed busy for the whole pool timeout: the process is overloaded.

    A subclass of redis-py's own `MaxConnectionsError` (a `ConnectionError`), so code that treats
    connection trouble as transient keeps doing so, and the api can answer it with a 503.
    """


class BoundedConnectionPool(BlockingConnectionPool):
    """A pool of at most `max_connections` that waits up to `timeout` for a free connection.

    redis-py's plain pool raises `MaxConnectionsError` the instant it is full, and its blocking pool
    raises a bare `ConnectionError` once the wait runs out, indistinguishable from a refused
    connection. This one raises `RedisPoolExhaustedError` for the wait, whatever the text says.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise RedisPoolExhaustedError(
                    f"no Redis connection became free within {self.timeout} s "
                    f"(all {self.max_connections} in use)"
                ) from exc
            raise


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


def create_redis(
    url: str, *, max_connections: int, pool_timeout_seconds: float, client_name: str | None = None
) -> Redis:
    """The process's shared client: at most `max_connections` connections, however busy it gets.

    Nothing holds a pooled connection for long (blocking stream reads have dedicated connections,
    see `create_blocking_reader_connection`), so a small pool serves many streams; a command that
    finds every connection busy for `pool_timeout_seconds` fails fast with
    `RedisPoolExhaustedError` instead of opening connections without bound. Health checks find
    connections that a Redis restart broke, and the retry replaces them. `client_name` names every
    connection (`CLIENT LIST` shows which process holds what).
    """
    pool = BoundedConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_seconds,
        client_name=client_name,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=connection_retry(),
    )
    return Redis.from_pool(pool)


def create_blocking_reader_connection(url: str, *, client_name: str | None = None) -> Redis:
    """A client of exactly one connection for a loop of blocking reads (`XREAD BLOCK`).

    No command retries: the loop that owns it sees every connection error, because a reconnect gives
    the connection a new `CLIENT ID`, which the loop must learn again to be woken by `CLIENT UNBLOCK`.
    """
    return Redis.from_url(
        url,
        single_connection_client=True,
        client_name=client_name,
        decode_responses=True,
        socket_connect_timeout=5,
        # Longer than any blocking read, so a quiet read is never a timeout.
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )
