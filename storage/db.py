"""Async SQLAlchemy engine and session factories, and what counts as Postgres being unavailable.
Nothing is built at import time (engines cannot cross event loops); never imports api, workflows or activities."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from core.settings import Settings

# SQLSTATEs that mean the server cannot serve anyone right now, not that the statement is wrong.
UNAVAILABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: a fast or smart shutdown, or pg_terminate_backend, ended the session
        "57P02",  # crash_shutdown: another backend crashed and the server is resetting
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
        "57014",  # query_canceled: the statement timeout fired (an overloaded or stuck server)
        "53300",  # too_many_connections
    }
)
# Class 08 is "connection exception" (cannot connect, connection failure, ...), except 08P01: a
# protocol violation is a client bug, and waiting it out would only hide it.
CONNECTION_EXCEPTION_CLASS = "08"
PROTOCOL_VIOLATION = "08P01"
# The client-side timeout of a statement is this much longer than the server's statement timeout,
# so the server's own (clearer) error usually wins; the client's only fires for a server that
# stopped answering at all (frozen, or cut off by the network).
CLIENT_TIMEOUT_MARGIN_SECONDS = 1.0


@dataclass(frozen=True)
class DatabaseTimeouts:
    connect_seconds: float
    statement_seconds: float  # 0: none

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseTimeouts:
        return cls(
            connect_seconds=settings.database_connect_timeout_seconds,
            statement_seconds=settings.database_statement_timeout_seconds,
        )


def create_engine(
    database_url: str, *, pool_size: int = 10, timeouts: DatabaseTimeouts | None = None
) -> AsyncEngine:
    """An engine whose pool replaces connections a Postgres restart killed; with `timeouts`, a
    connection attempt or a statement against an unreachable server fails within them, instead of
    asyncpg's 60 s connect timeout and no statement timeout at all."""
    connect_args: dict[str, Any] = {}
    if timeouts is not None:
        connect_args["timeout"] = timeouts.connect_seconds
        if timeouts.statement_seconds > 0:
            statement_ms = round(timeouts.statement_seconds * 1000)
            connect_args["server_settings"] = {"statement_timeout": str(statement_ms)}
            connect_args["command_timeout"] = (
                timeouts.statement_seconds + CLIENT_TIMEOUT_MARGIN_SECONDS
            )
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection that died with a Postgres restart is replaced instead of failing a request.
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def is_database_unavailable(error: BaseException) -> bool:
    """True when `error` means Postgres cannot be reached or cannot serve right now, not that the
    statement is wrong: worth waiting out (and a 503 for the api); a constraint or a bug is not.

    The asyncpg dialect wraps most server errors in a plain `DBAPIError` (only a few classes map
    to SQLAlchemy's finer ones), with the driver's error, and its SQLSTATE, underneath; errors
    raised while connecting (refused, reset, timed out) arrive unwrapped. So the whole chain is
    judged, by exception class and SQLSTATE, never by message text.
    """
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True  # SQLAlchemy saw the connection die under the statement
    # The pool had no connection to give within its timeout: every one is busy or being opened.
    if isinstance(error, PoolTimeoutError | OperationalError):
        return True
    return any(_means_unavailable(cause) for cause in _error_chain(error))


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, the driver error a SQLAlchemy error wraps, and what each was raised from."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        original = getattr(current, "orig", None)
        if isinstance(original, BaseException):
            pending.append(original)
        if current.__cause__ is not None:
            pending.append(current.__cause__)


def _means_unavailable(error: BaseException) -> bool:
    # Refused, reset, unreachable, a name that does not resolve, and a timeout (TimeoutError is an
    # OSError) while connecting or waiting for an answer.
    if isinstance(error, OSError):
        return True
    # asyncpg's own errors and the dialect's wrappers of them both carry the SQLSTATE.
    sqlstate = getattr(error, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    if sqlstate in UNAVAILABLE_SQLSTATES:
        return True
    return sqlstate.startswith(CONNECTION_EXCEPTION_CLASS) and sqlstate != PROTOCOL_VIOLATION
