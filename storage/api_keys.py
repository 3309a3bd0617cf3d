"""Organizations and API keys: creation, listing, revocation and secret lookup. Must never import api or workflows."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

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


@dataclass(frozen=True)
class CreatedKey:
    id: str
    organization_id: str
    secret: str


@dataclass(frozen=True)
class KeySummary:
    id: str
    name: str | None
    display_prefix: str
    user_id: str | None
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None


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
    secret = secret or generate_secret()
    key_id = new_id()
    session.add(
        ApiKey(
            id=key_id,
            organization_id=organization_id,
            user_id=user_id,
            is_admin=is_admin,
            name=name,
            display_prefix=secret[:10],
            secret_sha256=hash_secret(secret),
        )
    )
    await session.flush()
    return CreatedKey(id=key_id, organization_id=organization_id, secret=secret)


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
    return existing.id


async def list_keys(session: AsyncSession, organization_id: str) -> list[KeySummary]:
    rows = (
        await session.execute(
            select(ApiKey)
            .where(ApiKey.organization_id == organization_id)
            .order_by(ApiKey.created_at)
        )
    ).scalars()
    return [
        KeySummary(
            id=row.id,
            name=row.name,
            display_prefix=row.display_prefix,
            user_id=row.user_id,
            is_admin=row.is_admin,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]


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
