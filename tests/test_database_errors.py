"""`is_database_unavailable` judged on real errors: each one raised by SQLAlchemy and asyncpg against
a real Postgres that is refusing, starting up, shutting down, terminating sessions or timing out a
statement, and against one that answers but finds the statement wrong."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from devstack.embedded import EmbeddedPostgres
from devstack.ports import free_port_block
from storage.db import DatabaseTimeouts, create_engine, is_database_unavailable

FAST = DatabaseTimeouts(connect_seconds=1.0, statement_seconds=0.2)


def engine_for(postgres: EmbeddedPostgres, timeouts: DatabaseTimeouts = FAST) -> AsyncEngine:
    url = postgres.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    return create_engine(url, pool_size=1, timeouts=timeouts)


async def error_of(engine: AsyncEngine, statement: str = "SELECT 1") -> BaseException:
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    except Exception as error:
        return error
    raise AssertionError(f"{statement!r} succeeded")


class StartingUpPostgres(EmbeddedPostgres):
    """A server held in its start-up phase: archive recovery runs a `restore_command` that sleeps
    before the server has even begun to replay, so every connection hears "starting up"."""

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", "restore_command=sleep 60"]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A server for the tests that leave it running."""
    with EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), free_port_block()) as server:
        yield server


@pytest.fixture(scope="module")
async def engine(postgres: EmbeddedPostgres) -> AsyncIterator[AsyncEngine]:
    engine = engine_for(postgres)
    yield engine
    await engine.dispose()


async def test_a_refused_connection_is_unavailable() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port_block()}/durachat"
    engine = create_engine(url, timeouts=FAST)
    try:
        error = await error_of(engine)
    finally:
        await engine.dispose()
    assert isinstance(error, ConnectionRefusedError), repr(error)
    assert is_database_unavailable(error)


async def test_a_server_that_never_answers_is_unavailable_within_the_connect_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{silent.getsockname()[1]}/durachat"
        engine = create_engine(url, timeouts=FAST)
        try:
            error = await asyncio.wait_for(error_of(engine), timeout=15)
        finally:
            await engine.dispose()
    assert isinstance(error, TimeoutError), repr(error)
    assert is_database_unavailable(error)


async def test_a_server_starting_up_is_unavailable(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedPostgres(data_dir, free_port_block()):
        pass  # a cluster to start again, in recovery
    starting = StartingUpPostgres(data_dir, free_port_block())
    signal_file = starting.pgdata / "recovery.signal"
    signal_file.touch()
    if os.geteuid() == 0:  # the server runs as its own user, who must be able to remove it
        shutil.chown(signal_file, starting.system_user, starting.system_user)
    starting.start()
    engine = engine_for(starting)
    try:
        deadline = time.monotonic() + 30
        while True:
            error = await error_of(engine)
            if not isinstance(error, OSError) or time.monotonic() > deadline:
                break  # refused until it listens
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
        starting.stop(timeout=5)
    assert "the database system is starting up" in str(error), repr(error)
    assert getattr(getattr(error, "orig", None), "sqlstate", None) == "57P03"
    assert is_database_unavailable(error)


async def test_a_server_shutting_down_is_unavailable(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "data", free_port_block()) as postgres:
        engine = engine_for(postgres)
        try:
            await _shut_down_under(postgres, engine)
        finally:
            await engine.dispose()


async def _shut_down_under(postgres: EmbeddedPostgres, engine: AsyncEngine) -> None:
    async with engine.connect() as open_session:
        await open_session.execute(text("SELECT 1"))
        assert postgres.pid is not None
        # A smart shutdown waits for open sessions and turns new ones away meanwhile.
        os.kill(postgres.pid, signal.SIGTERM)
        other = engine_for(postgres)
        try:
            deadline = time.monotonic() + 10
            while "shutting down" not in str(error := await error_of(other)):
                assert time.monotonic() < deadline, repr(error)
                await asyncio.sleep(0.05)
        finally:
            await other.dispose()
        assert getattr(getattr(error, "orig", None), "sqlstate", None) == "57P03"
        assert is_database_unavailable(error)

        # A fast shutdown then ends the open session under its next statement.
        os.kill(postgres.pid, signal.SIGINT)
        await asyncio.to_thread(postgres.stop)
        with pytest.raises(DBAPIError) as ended:
            await open_session.execute(text("SELECT 1"))
        assert is_database_unavailable(ended.value), repr(ended.value)


async def test_a_terminated_session_is_unavailable(engine: AsyncEngine) -> None:
    async with engine.connect() as victim:
        backend = (await victim.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as operator:
            await operator.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        with pytest.raises(DBAPIError) as ended:
            await victim.execute(text("SELECT 1"))
    assert is_database_unavailable(ended.value), repr(ended.value)


async def test_a_statement_timeout_is_unavailable(engine: AsyncEngine) -> None:
    error = await error_of(engine, "SELECT pg_sleep(5)")

    assert "statement timeout" in str(error), repr(error)
    assert getattr(getattr(error, "orig", None), "sqlstate", None) == "57014"
    assert is_database_unavailable(error)


@pytest.mark.parametrize(
    "statement",
    [
        "SELEC 1",  # syntax error
        "SELECT 1 / 0",  # division by zero
        "SELECT * FROM no_such_table",  # undefined table
        "SELECT 'x'::integer",  # invalid input
    ],
)
async def test_a_wrong_statement_is_not_unavailable(engine: AsyncEngine, statement: str) -> None:
    error = await error_of(engine, statement)

    assert not is_database_unavailable(error), repr(error)


async def test_a_constraint_violation_is_not_unavailable(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("CREATE TEMPORARY TABLE once (id int PRIMARY KEY)"))
        await connection.execute(text("INSERT INTO once VALUES (1)"))
        with pytest.raises(IntegrityError) as duplicate:
            await connection.execute(text("INSERT INTO once VALUES (1)"))
    assert not is_database_unavailable(duplicate.value), repr(duplicate.value)
