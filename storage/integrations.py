"""Connected chat platforms (Slack, Discord): their secrets sealed at rest. Must never import api, workflows or activities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.secrets import SecretBox, SecretsUnreadable
from storage.models import Integration

log = structlog.get_logger(__name__)


class IntegrationTaken(Exception):
    """The workspace or application is connected to another organization."""


@dataclass(frozen=True)
class IntegrationRecord:
    organization_id: str
    platform: str
    external_id: str
    # Opened secrets: never logged, never in a response (the repr leaves them out).
    secrets: dict[str, str] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)


def _record(row: Integration, box: SecretBox) -> IntegrationRecord:
    return IntegrationRecord(
        organization_id=row.organization_id,
        platform=row.platform,
        external_id=row.external_id,
        secrets={key: str(value) for key, value in box.open(row.secrets).items()},
        settings=dict(row.settings or {}),
    )


async def put_integration(
    session: AsyncSession,
    box: SecretBox,
    *,
    organization_id: str,
    platform: str,
    external_id: str,
    secrets: dict[str, str],
    settings: dict[str, Any],
) -> IntegrationRecord:
    """Connect (or reconnect) the organization's workspace or application."""
    taken = (
        await session.execute(
            select(Integration.organization_id).where(
                Integration.platform == platform,
                Integration.external_id == external_id,
                Integration.organization_id != organization_id,
            )
        )
    ).scalar_one_or_none()
    if taken is not None:
        raise IntegrationTaken(external_id)
    values = {
        "external_id": external_id,
        "secrets": box.seal(dict(secrets)),
        "settings": settings,
        "updated_at": func.now(),
    }
    try:
        row = (
            await session.execute(
                insert(Integration)
                .values(organization_id=organization_id, platform=platform, **values)
                .on_conflict_do_update(index_elements=["organization_id", "platform"], set_=values)
                .returning(Integration)
            )
        ).scalar_one()
    except IntegrityError:
        # Another organization connected the same workspace or application at the same moment.
        raise IntegrationTaken(external_id) from None
    return _record(row, box)


async def get_integration(
    session: AsyncSession, box: SecretBox, organization_id: str, platform: str
) -> IntegrationRecord | None:
    row = (
        await session.execute(
            select(Integration).where(
                Integration.organization_id == organization_id, Integration.platform == platform
            )
        )
    ).scalar_one_or_none()
    return _record(row, box) if row is not None else None


async def find_integration(
    session: AsyncSession, box: SecretBox, platform: str, external_id: str
) -> IntegrationRecord | None:
    """The integration an incoming event names (before its signature is checked with it)."""
    row = (
        await session.execute(
            select(Integration).where(
                Integration.platform == platform, Integration.external_id == external_id
            )
        )
    ).scalar_one_or_none()
    return _record(row, box) if row is not None else None


async def list_integrations(
    session: AsyncSession, box: SecretBox, platform: str
) -> list[IntegrationRecord]:
    """Every organization's integration of one platform, secrets opened; one whose secrets
    cannot be opened (sealed with another key) is left out and logged by the caller's absence
    of it, never raised: the others keep working."""
    rows = (
        await session.execute(select(Integration).where(Integration.platform == platform))
    ).scalars()
    records: list[IntegrationRecord] = []
    for row in rows:
        try:
            records.append(_record(row, box))
        except SecretsUnreadable:
            log.error(
                "integrations.secrets_unreadable",
                organization_id=row.organization_id,
                platform=platform,
            )
    return records


async def delete_integration(session: AsyncSession, organization_id: str, platform: str) -> bool:
    deleted = await session.execute(
        delete(Integration)
        .where(Integration.organization_id == organization_id, Integration.platform == platform)
        .returning(Integration.platform)
    )
    return deleted.first() is not None
