"""What the chat platforms' admin endpoints (Slack, Discord) share: connect, show and disconnect
the organization's one workspace or application. Secrets go in sealed and never come back out;
each platform's router keeps its own request and response shapes and its wording."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from api.state import AppState
from core.errors import ConflictError, NotFoundError
from core.secrets import SecretBox
from storage import integrations
from storage.api_keys import Principal
from storage.integrations import IntegrationRecord, IntegrationTaken

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Platform:
    name: str  # as stored: "slack", "discord"
    connected_thing: str  # as problems name it: "Slack workspace", "Discord application"


async def connect(
    session: AsyncSession,
    state: AppState,
    principal: Principal,
    platform: Platform,
    *,
    external_id: str,
    secrets: dict[str, str],
    settings: dict[str, Any],
) -> IntegrationRecord:
    """Connect the organization's workspace or application, or replace its credentials; 409 when
    another organization has it."""
    try:
        record = await integrations.put_integration(
            session,
            SecretBox.from_settings(state.settings),
            organization_id=principal.organization_id,
            platform=platform.name,
            external_id=external_id,
            secrets=secrets,
            settings=settings,
        )
    except IntegrationTaken:
        raise ConflictError(
            f"that {platform.connected_thing} is connected to another organization"
        ) from None
    await session.commit()
    log.info(
        "integration.connected",
        platform=platform.name,
        organization_id=principal.organization_id,
        external_id=external_id,
        by_key_id=principal.api_key_id,
    )
    return record


async def connected(
    session: AsyncSession, state: AppState, principal: Principal, platform: Platform
) -> IntegrationRecord:
    """The organization's connected workspace or application; 404 when there is none."""
    record = await integrations.get_integration(
        session,
        SecretBox.from_settings(state.settings),
        principal.organization_id,
        platform.name,
    )
    if record is None:
        raise NotFoundError(f"no {platform.connected_thing} is connected")
    return record


async def disconnect(session: AsyncSession, principal: Principal, platform: Platform) -> None:
    """Forget the workspace or application and its secrets; 404 when there is none."""
    if not await integrations.delete_integration(session, principal.organization_id, platform.name):
        raise NotFoundError(f"no {platform.connected_thing} is connected")
    await session.commit()
    log.info(
        "integration.disconnected",
        platform=platform.name,
        organization_id=principal.organization_id,
        by_key_id=principal.api_key_id,
    )
