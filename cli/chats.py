"""`durachat chats purge`: purge deleted chats now, without waiting for the scheduled job."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import click

from core.settings import get_settings
from storage import api_keys
from storage.db import create_engine, create_session_factory
from storage.objects import ObjectStore
from storage.purge import Purger


@click.group("chats")
def chats_group() -> None:
    """Administer chats."""


@chats_group.command("purge")
@click.option("--org", "organization", default=None, help="Only this organization's chats.")
@click.option(
    "--older-than-hours",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Only chats deleted at least this long ago (0: every deleted chat).",
)
def purge(organization: str | None, older_than_hours: float) -> None:
    """Delete soft-deleted chats for good, with their messages, turns and files."""

    async def work() -> int:
        settings = get_settings()
        engine = create_engine(settings.resolved_database_url, pool_size=1)
        try:
            sessions = create_session_factory(engine)
            organization_id = None
            if organization is not None:
                async with sessions() as session:
                    organization_id = await api_keys.find_organization(session, organization)
                if organization_id is None:
                    raise click.ClickException(f"no organization named {organization!r}")
            async with ObjectStore.from_settings(settings) as objects:
                cutoff = datetime.now(UTC) - timedelta(hours=older_than_hours)
                return await Purger(sessions, objects).purge_deleted_chats(
                    cutoff, organization_id=organization_id
                )
        finally:
            await engine.dispose()

    click.echo(f"purged {asyncio.run(work())} deleted chats")
