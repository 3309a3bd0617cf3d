"""Async SQLAlchemy engine and session factories. Nothing is built at import time: engines cannot cross event loops."""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection that died with a Postgres restart is replaced instead of failing a request.
        pool_pre_ping=True,
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def is_database_unavailable(error: BaseException) -> bool:
    """True when `error` means Postgres cannot be reached right now, not that the statement is wrong.

    Such failures are worth waiting out; anything else (a constraint, a bug) is not.
    """
    if isinstance(error, OperationalError | InterfaceError):
        return True
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    # Refused or reset connections surface unwrapped from the asyncpg driver, as does a server
    # that is still starting up or shutting down.
    return isinstance(
        error,
        OSError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    )
