"""Default models: the organization's and each user's. Must never import api or workflows."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Organization, UserPreference


async def organization_default_model(session: AsyncSession, organization_id: str) -> str | None:
    return await session.scalar(
        select(Organization.default_model).where(Organization.id == organization_id)
    )


async def set_organization_default_model(
    session: AsyncSession, organization_id: str, model: str | None
) -> None:
    await session.execute(
        update(Organization).where(Organization.id == organization_id).values(default_model=model)
    )


async def user_default_model(
    session: AsyncSession, organization_id: str, user_id: str
) -> str | None:
    return await session.scalar(
        select(UserPreference.default_model).where(
            UserPreference.organization_id == organization_id, UserPreference.user_id == user_id
        )
    )


async def set_user_default_model(
    session: AsyncSession, organization_id: str, user_id: str, model: str | None
) -> None:
    statement = insert(UserPreference).values(
        organization_id=organization_id, user_id=user_id, default_model=model
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[UserPreference.organization_id, UserPreference.user_id],
            set_={"default_model": model, "updated_at": func.now()},
        )
    )


async def default_models(
    session: AsyncSession, organization_id: str, user_id: str | None
) -> tuple[str | None, str | None]:
    """The user's and the organization's default models, in one round trip (a key bound to no
    user has no user default)."""
    user_default = (
        select(UserPreference.default_model)
        .where(UserPreference.organization_id == organization_id, UserPreference.user_id == user_id)
        .scalar_subquery()
    )
    row = (
        await session.execute(
            select(user_default, Organization.default_model).where(
                Organization.id == organization_id
            )
        )
    ).one_or_none()
    if row is None:
        return None, None
    return row[0], row[1]
