"""The Alembic migrations on a fresh database of the session Postgres: up to head, down to base, up again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, make_url

from core.settings import Settings
from storage.db import create_engine
from storage.migrations import alembic_config, downgrade_database, upgrade_database
from storage.models import Base

SCHEMA_TABLES = {
    "organization",
    "api_key",
    "chat",
    "message",
    "turn",
    "attachment",
    "user_preference",
    "budget",
    "usage_ledger",
    "tool_approval",
    "toolkit",
    "webhook_endpoint",
    "webhook_delivery",
    "webhook_one_off_secret",
    "integration",
}


def asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def fresh_database_url(settings: Settings) -> AsyncIterator[str]:
    """The SQLAlchemy URL of a new, empty database, dropped after the test."""
    session_url = make_url(settings.resolved_database_url)
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    maintenance = await asyncpg.connect(asyncpg_dsn(session_url.set(database="postgres")))
    try:
        await maintenance.execute(f'CREATE DATABASE "{name}"')
        try:
            yield session_url.set(database=name).render_as_string(hide_password=False)
        finally:
            await maintenance.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await maintenance.close()


async def connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(make_url(database_url)))


async def public_tables(database_url: str) -> set[str]:
    connection = await connect(database_url)
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {row["tablename"] for row in rows}


async def test_upgrade_to_head_creates_the_schema(fresh_database_url: str) -> None:
    upgrade_database(fresh_database_url)

    assert await public_tables(fresh_database_url) == {*SCHEMA_TABLES, "alembic_version"}
    connection = await connect(fresh_database_url)
    try:
        index = await connection.fetchrow(
            "SELECT tablename, indexdef FROM pg_indexes WHERE indexname = $1",
            "uq_chat_live_external_channel",
        )
        version = await connection.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await connection.close()
    assert index is not None
    assert index["tablename"] == "chat"
    assert index["indexdef"].startswith("CREATE UNIQUE INDEX")
    assert "(organization_id, external_source, external_id)" in index["indexdef"]
    assert "WHERE ((deleted_at IS NULL) AND (external_id IS NOT NULL))" in index["indexdef"]
    head = ScriptDirectory.from_config(alembic_config(fresh_database_url)).get_current_head()
    assert version == head


async def test_upgrade_to_head_matches_the_models(fresh_database_url: str) -> None:
    upgrade_database(fresh_database_url)

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    engine = create_engine(fresh_database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert diff == []


async def test_upgrade_twice_is_a_no_op(fresh_database_url: str) -> None:
    upgrade_database(fresh_database_url)
    upgrade_database(fresh_database_url)

    assert await public_tables(fresh_database_url) == {*SCHEMA_TABLES, "alembic_version"}


async def test_live_external_channel_is_unique_until_soft_deleted(
    fresh_database_url: str,
) -> None:
    upgrade_database(fresh_database_url)
    connection = await connect(fresh_database_url)
    insert_chat = (
        "INSERT INTO chat (organization_id, id, external_source, external_id)"
        " VALUES ('org', $1, 'discord', 'channel-1')"
    )
    try:
        await connection.execute("INSERT INTO organization (id, name) VALUES ('org', 'org')")
        await connection.execute(insert_chat, "first")

        with pytest.raises(asyncpg.UniqueViolationError, match="uq_chat_live_external_channel"):
            await connection.execute(insert_chat, "second")

        await connection.execute("UPDATE chat SET deleted_at = now() WHERE id = 'first'")
        await connection.execute(insert_chat, "second")

        with pytest.raises(asyncpg.UniqueViolationError, match="uq_chat_live_external_channel"):
            await connection.execute(insert_chat, "third")
        # Chats without a channel never collide, and the same channel id is free on another source.
        await connection.execute(
            "INSERT INTO chat (organization_id, id) VALUES ('org', 'plain-1'), ('org', 'plain-2')"
        )
        await connection.execute(
            "INSERT INTO chat (organization_id, id, external_source, external_id)"
            " VALUES ('org', 'slack', 'slack', 'channel-1')"
        )
        live = await connection.fetchval(
            "SELECT count(*) FROM chat WHERE external_id = 'channel-1' AND deleted_at IS NULL"
        )
    finally:
        await connection.close()
    assert live == 2


async def test_downgrade_to_base_then_upgrade_again(fresh_database_url: str) -> None:
    upgrade_database(fresh_database_url)

    downgrade_database(fresh_database_url)

    assert await public_tables(fresh_database_url) == {"alembic_version"}
    connection = await connect(fresh_database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM alembic_version") == 0
    finally:
        await connection.close()

    upgrade_database(fresh_database_url)

    assert await public_tables(fresh_database_url) == {*SCHEMA_TABLES, "alembic_version"}
