"""Organizations and API keys: creation, listing, revocation and secret lookup. Must never import api or workflows."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.ids import new_id
from storage.models import ApiKey, Organization

SECRET_PREFIX = "dck_"  # noqa: S105 - a marker that makes leaked keys recognisable, not a secret


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, resolved from its API key."""

    organization_id: str
    api_key_id: str
    user_id: str | None
    is_admin: bool


class KeyScopeError(ValueError):
    """A key asked to be both bound to one user and an organization admin."""


def check_key_scope(*, user_id: str | None, is_admin: bool) -> None:
    """The rule on a key's scope, kept here for the api, the CLI and storage alike."""
    if user_id is not None and is_admin:
        # A user's key acts for that user only; admin rights would let it manage everyone's keys.
        raise KeyScopeError("a key bound to a user cannot be an admin key")


@dataclass(frozen=True)
class KeySummary:
    """A key as it may be shown: never its secret or the secret's hash."""

    id: str
    name: str | None
    display_prefix: str
    user_id: str | None
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class CreatedKey(KeySummary):
    """A new key and its secret, which exists only here: it is never stored and never shown again."""

    organization_id: str
    secret: str = field(repr=False)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


async def ensure_organization(session: AsyncSession, name: str) -> str:
    """The id of the organization called `name`, created if new (safe under concurrent calls)."""
    await session.execute(
        insert(Organization)
        .values(id=new_id(), name=name)
        .on_conflict_do_nothing(index_elements=[Organization.name])
    )
    return (
        await session.execute(select(Organization.id).where(Organization.name == name))
    ).scalar_one()


async def find_organization(session: AsyncSession, name: str) -> str | None:
    return (
        await session.execute(select(Organization.id).where(Organization.name == name))
    ).scalar_one_or_none()


async def create_key(
    session: AsyncSession,
    organization_id: str,
    *,
    user_id: str | None = None,
    is_admin: bool = False,
    name: str | None = None,
    secret: str | None = None,
) -> CreatedKey:
    """Store a new key; the secret is returned here once and never stored."""
    check_key_scope(user_id=user_id, is_admin=is_admin)
    secret = secret or generate_secret()
    key_id = new_id()
    display_prefix = secret[:10]
    created_at = (
        await session.execute(
            insert(ApiKey)
            .values(
                id=key_id,
                organization_id=organization_id,
                user_id=user_id,
                is_admin=is_admin,
                name=name,
                display_prefix=display_prefix,
                secret_sha256=hash_secret(secret),
            )
            .returning(ApiKey.created_at)
        )
    ).scalar_one()
    return CreatedKey(
        id=key_id,
        name=name,
        display_prefix=display_prefix,
        user_id=user_id,
        is_admin=is_admin,
        created_at=created_at,
        revoked_at=None,
        organization_id=organization_id,
        secret=secret,
    )


async def ensure_key_with_secret(
    session: AsyncSession, organization_id: str, secret: str, *, name: str
) -> str:
    """Make `secret` a live admin key of the organization, so a dev script can know its key in advance."""
    digest = hash_secret(secret)
    existing = (
        await session.execute(select(ApiKey).where(ApiKey.secret_sha256 == digest))
    ).scalar_one_or_none()
    if existing is None:
        created = await create_key(
            session, organization_id, is_admin=True, name=name, secret=secret
        )
        return created.id
    if existing.organization_id != organization_id:
        raise ValueError("that secret already belongs to another organization's key")
    existing.revoked_at = None
    existing.is_admin = True
    existing.user_id = None
    return existing.id


def _keys_of(organization_id: str, *, include_revoked: bool) -> Any:
    query = select(ApiKey).where(ApiKey.organization_id == organization_id)
    return query if include_revoked else query.where(ApiKey.revoked_at.is_(None))


def _summary(row: ApiKey) -> KeySummary:
    return KeySummary(
        id=row.id,
        name=row.name,
        display_prefix=row.display_prefix,
        user_id=row.user_id,
        is_admin=row.is_admin,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


async def list_keys(
    session: AsyncSession,
    organization_id: str,
    *,
    include_revoked: bool = True,
    limit: int | None = None,
    offset: int = 0,
) -> list[KeySummary]:
    """An organization's keys, oldest first, so new keys land on the last page and offsets hold."""
    query = (
        _keys_of(organization_id, include_revoked=include_revoked)
        .order_by(ApiKey.created_at, ApiKey.id)
        .limit(limit)
        .offset(offset)
    )
    return [_summary(row) for row in (await session.execute(query)).scalars()]


async def count_keys(
    session: AsyncSession, organization_id: str, *, include_revoked: bool = True
) -> int:
    query = _keys_of(organization_id, include_revoked=include_revoked).subquery()
    return (await session.execute(select(func.count()).select_from(query))).scalar_one()


async def get_key(session: AsyncSession, organization_id: str, key_id: str) -> KeySummary | None:
    """One of the organization's keys, revoked or not; None for another organization's key."""
    row = (
        await session.execute(
            select(ApiKey).where(ApiKey.id == key_id, ApiKey.organization_id == organization_id)
        )
    ).scalar_one_or_none()
    return None if row is None else _summary(row)


async def revoke_key(
    session: AsyncSession, key_id: str, *, organization_id: str | None = None
) -> bool:
    """Revoke a key at once; False when no live key has that id (within the organization, if given)."""
    statement = (
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    if organization_id is not None:
        statement = statement.where(ApiKey.organization_id == organization_id)
    result = await session.execute(statement)
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def authenticate(session: AsyncSession, secret: str) -> Principal | None:
    row = (
        await session.execute(
            select(ApiKey.id, ApiKey.organization_id, ApiKey.user_id, ApiKey.is_admin).where(
                ApiKey.secret_sha256 == hash_secret(secret), ApiKey.revoked_at.is_(None)
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return Principal(
        organization_id=row.organization_id,
        api_key_id=row.id,
        user_id=row.user_id,
        is_admin=row.is_admin,
    )
