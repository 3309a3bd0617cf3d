"""`durachat keys`: create, list and revoke API keys from the command line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from core.settings import get_settings
from storage import api_keys
from storage.db import create_engine, create_session_factory

T = TypeVar("T")


def in_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(get_settings().resolved_database_url, pool_size=1)
        try:
            async with create_session_factory(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@click.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--org", "organization", required=True, help="Organization name (created if new).")
@click.option(
    "--user", "user_id", default=None, help="Bind the key to one user of the organization."
)
@click.option("--name", default=None, help="A label to tell keys apart.")
@click.option(
    "--admin/--no-admin",
    default=None,
    help="Organization admin key (default: admin unless --user; never with --user).",
)
def create(organization: str, user_id: str | None, name: str | None, admin: bool | None) -> None:
    """Create an API key and print its secret (shown only this once)."""
    is_admin = admin if admin is not None else user_id is None
    try:
        api_keys.check_key_scope(user_id=user_id, is_admin=is_admin)
    except api_keys.KeyScopeError as exc:
        raise click.UsageError(str(exc)) from exc

    async def work(session: AsyncSession) -> api_keys.CreatedKey:
        organization_id = await api_keys.ensure_organization(session, organization)
        return await api_keys.create_key(
            session, organization_id, user_id=user_id, is_admin=is_admin, name=name
        )

    created = in_transaction(work)
    click.echo(f"key id:  {created.id}")
    click.echo(f"secret:  {created.secret}")
    click.echo("Store the secret now: it is not shown again.", err=True)


@keys.command("list")
@click.option("--org", "organization", required=True, help="Organization name.")
def list_(organization: str) -> None:
    """List an organization's keys (never their secrets)."""

    async def work(session: AsyncSession) -> list[api_keys.KeySummary] | None:
        organization_id = await api_keys.find_organization(session, organization)
        return (
            None if organization_id is None else await api_keys.list_keys(session, organization_id)
        )

    summaries = in_transaction(work)
    if summaries is None:
        raise click.ClickException(f"no organization named {organization!r}")
    for key in summaries:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        scope = (
            f"user {key.user_id}" if key.user_id else ("admin" if key.is_admin else "organization")
        )
        click.echo(
            f"{key.id}  {key.display_prefix}…  {scope:<20} {state:<24} {key.name or ''}".rstrip()
        )


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key; it stops working at once."""

    async def work(session: AsyncSession) -> bool:
        return await api_keys.revoke_key(session, key_id)

    if not in_transaction(work):
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"revoked {key_id}")
