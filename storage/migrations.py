"""Applies the Alembic migrations under migrations/ to a database URL. Must never import api, workflows or activities."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def _in_fresh_thread(fn: object) -> None:
    # env.py drives its own event loop with asyncio.run, which cannot nest inside a running loop
    # (the api and the test suite call this from async code), so migrations run on a thread.
    assert callable(fn)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    import threading

    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="alembic")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def upgrade_database(database_url: str, revision: str = "head") -> None:
    _in_fresh_thread(lambda: command.upgrade(alembic_config(database_url), revision))


def downgrade_database(database_url: str, revision: str = "base") -> None:
    _in_fresh_thread(lambda: command.downgrade(alembic_config(database_url), revision))
