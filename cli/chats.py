"""`durachat chats purge`: purge deleted chats now, without waiting for the scheduled job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
from sqlalchemy.ext.asyncio import AsyncSession

from cli.keys import in_transaction
from storage import api_keys, chats


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
    """Delete soft-deleted chats for good, with their messages and turns."""

    async def work(session: AsyncSession) -> int:
        organization_id = None
        if organization is not None:
            organization_id = await api_keys.find_organization(session, organization)
            if organization_id is None:
                raise click.ClickException(f"no organization named {organization!r}")
        cutoff = datetime.now(UTC) - timedelta(hours=older_than_hours)
        return await chats.purge_deleted_chats(session, cutoff, organization_id=organization_id)

    click.echo(f"purged {in_transaction(work)} deleted chats")
