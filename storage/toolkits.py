"""Toolkits: the MCP servers an organization's admins registered, their secrets sealed at rest. Must
never import api, workflows or activities.

Every query is scoped by organization: another organization's toolkit is indistinguishable from
one that does not exist. Secrets (header values and the bearer token) are sealed with the SecretBox
on the way in and opened only for `toolkit_connections`, the tool activity's way to reach a
server; what admins read (`ToolkitRecord`) carries header names and whether a token is set, never a
value.
"""

from __future__ import annotations

import secrets as random_secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from agent_tools.mcp import ToolkitConnection
from core.secrets import SecretBox
from storage.models import Toolkit

TOOLKIT_ID_PREFIX: Final = "tk_"


def new_toolkit_id() -> str:
    return TOOLKIT_ID_PREFIX + random_secrets.token_urlsafe(12)


class ToolkitNameTaken(Exception):
    """The organization has a toolkit of that name already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a toolkit named {name!r} exists already")
        self.name = name


@dataclass(frozen=True)
class ToolkitSecrets:
    """What a server's requests carry: extra headers and a bearer token."""

    headers: dict[str, str] = field(default_factory=dict, repr=False)
    token: str | None = field(default=None, repr=False)

    def sealed(self, box: SecretBox) -> str:
        return box.seal({"headers": self.headers, "token": self.token})

    @classmethod
    def opened(cls, box: SecretBox, sealed: str) -> ToolkitSecrets:
        value = box.open(sealed)
        headers = value.get("headers") or {}
        token = value.get("token")
        return cls(headers={str(k): str(v) for k, v in headers.items()}, token=token)


@dataclass(frozen=True)
class ToolkitRecord:
    """A toolkit as admins read it: no secret value in it."""

    id: str
    name: str
    description: str
    url: str
    header_names: list[str]
    has_token: bool
    allowed_tools: list[str] | None
    approval_tools: list[str]
    enabled: bool
    created_at: datetime
    updated_at: datetime


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


# An update field left as it is.
KEEP: Final = _Keep()


@dataclass(frozen=True)
class ToolkitChanges:
    """An update: each field KEEP, or its new value (None clears `allowed_tools`, which then
    offers every tool, and `token`)."""

    name: str | _Keep = KEEP
    description: str | _Keep = KEEP
    url: str | _Keep = KEEP
    headers: dict[str, str] | _Keep = field(default=KEEP, repr=False)
    token: str | _Keep | None = field(default=KEEP, repr=False)
    allowed_tools: list[str] | _Keep | None = KEEP
    approval_tools: list[str] | _Keep = KEEP
    enabled: bool | _Keep = KEEP

    @property
    def touches_secrets(self) -> bool:
        return not (isinstance(self.headers, _Keep) and isinstance(self.token, _Keep))


def _record(row: Toolkit, box: SecretBox) -> ToolkitRecord:
    secrets = ToolkitSecrets.opened(box, row.secrets)
    return ToolkitRecord(
        id=row.id,
        name=row.name,
        description=row.description,
        url=row.url,
        header_names=sorted(secrets.headers),
        has_token=bool(secrets.token),
        allowed_tools=None if row.allowed_tools is None else list(row.allowed_tools),
        approval_tools=list(row.approval_tools),
        enabled=row.enabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def create_toolkit(
    session: AsyncSession,
    box: SecretBox,
    organization_id: str,
    *,
    name: str,
    description: str,
    url: str,
    secrets: ToolkitSecrets,
    allowed_tools: list[str] | None,
    approval_tools: list[str],
    enabled: bool = True,
) -> ToolkitRecord:
    """A new toolkit; raises ToolkitNameTaken when the organization has one of that name."""
    row = (
        await session.execute(
            insert(Toolkit)
            .values(
                organization_id=organization_id,
                id=new_toolkit_id(),
                name=name,
                description=description,
                url=url,
                secrets=secrets.sealed(box),
                allowed_tools=allowed_tools,
                approval_tools=approval_tools,
                enabled=enabled,
            )
            .on_conflict_do_nothing(index_elements=[Toolkit.organization_id, Toolkit.name])
            .returning(Toolkit)
        )
    ).scalar_one_or_none()
    if row is None:
        raise ToolkitNameTaken(name)
    return _record(row, box)


async def list_toolkits(
    session: AsyncSession, box: SecretBox, organization_id: str
) -> list[ToolkitRecord]:
    """The organization's toolkits by name (an organization has a handful, never pages of them)."""
    rows = await session.scalars(
        select(Toolkit).where(Toolkit.organization_id == organization_id).order_by(Toolkit.name)
    )
    return [_record(row, box) for row in rows]


async def get_toolkit(
    session: AsyncSession, box: SecretBox, organization_id: str, toolkit_id: str
) -> ToolkitRecord | None:
    row = await _row(session, organization_id, toolkit_id)
    return None if row is None else _record(row, box)


async def update_toolkit(
    session: AsyncSession,
    box: SecretBox,
    organization_id: str,
    toolkit_id: str,
    changes: ToolkitChanges,
) -> ToolkitRecord | None:
    """Apply `changes`; None when the organization has no such toolkit. Raises ToolkitNameTaken
    for a new name another of its toolkits has (the caller's transaction is then unusable)."""
    values: dict[str, Any] = {
        column: value
        for column in (
            "name",
            "description",
            "url",
            "allowed_tools",
            "approval_tools",
            "enabled",
        )
        if not isinstance(value := getattr(changes, column), _Keep)
    }
    moves = not isinstance(changes.url, _Keep)
    if changes.touches_secrets or moves:
        current = await _row(session, organization_id, toolkit_id, for_update=True)
        if current is None:
            return None
        kept = ToolkitSecrets.opened(box, current.secrets)
        if moves and changes.url != current.url:
            # Credentials meant for one server never travel to another: a toolkit that moves
            # keeps only the secrets given with the move.
            kept = ToolkitSecrets(headers={}, token=None)
        values["secrets"] = ToolkitSecrets(
            headers=kept.headers if isinstance(changes.headers, _Keep) else changes.headers,
            token=kept.token if isinstance(changes.token, _Keep) else changes.token,
        ).sealed(box)
    try:
        row = (
            await session.execute(
                update(Toolkit)
                .where(Toolkit.organization_id == organization_id, Toolkit.id == toolkit_id)
                .values(**values, updated_at=func.now())
                .returning(Toolkit)
            )
        ).scalar_one_or_none()
    except IntegrityError:
        # The only constraint an update can break is the name's uniqueness.
        raise ToolkitNameTaken(str(changes.name)) from None
    return None if row is None else _record(row, box)


async def delete_toolkit(session: AsyncSession, organization_id: str, toolkit_id: str) -> bool:
    """Delete the toolkit and its secrets; False when the organization has no such toolkit."""
    deleted = await session.execute(
        delete(Toolkit)
        .where(Toolkit.organization_id == organization_id, Toolkit.id == toolkit_id)
        .returning(Toolkit.id)
    )
    return deleted.first() is not None


async def enabled_toolkit_ids(
    session: AsyncSession, organization_id: str, toolkit_ids: Sequence[str]
) -> set[str]:
    """Which of `toolkit_ids` the organization has, enabled (secrets left sealed)."""
    found = await session.scalars(
        select(Toolkit.id).where(
            Toolkit.organization_id == organization_id,
            Toolkit.id.in_(list(toolkit_ids)),
            Toolkit.enabled,
        )
    )
    return set(found)


async def toolkit_connections(
    session: AsyncSession,
    box: SecretBox,
    organization_id: str,
    toolkit_ids: Sequence[str],
    *,
    enabled_only: bool = True,
) -> list[ToolkitConnection]:
    """What reaching each of `toolkit_ids` takes, secrets opened, in the order asked; ids the
    organization has no (enabled) toolkit for are left out, for the caller to notice."""
    query = select(Toolkit).where(
        Toolkit.organization_id == organization_id, Toolkit.id.in_(list(toolkit_ids))
    )
    if enabled_only:
        query = query.where(Toolkit.enabled)
    rows = {row.id: row for row in await session.scalars(query)}
    connections: list[ToolkitConnection] = []
    for toolkit_id in dict.fromkeys(toolkit_ids):
        row = rows.get(toolkit_id)
        if row is None:
            continue
        secrets = ToolkitSecrets.opened(box, row.secrets)
        connections.append(
            ToolkitConnection(
                id=row.id,
                name=row.name,
                url=row.url,
                headers=secrets.headers,
                token=secrets.token,
                allowed_tools=None if row.allowed_tools is None else list(row.allowed_tools),
                approval_tools=list(row.approval_tools),
            )
        )
    return connections


async def _row(
    session: AsyncSession, organization_id: str, toolkit_id: str, *, for_update: bool = False
) -> Toolkit | None:
    query = select(Toolkit).where(
        Toolkit.organization_id == organization_id, Toolkit.id == toolkit_id
    )
    if for_update:
        query = query.with_for_update()
    row: Toolkit | None = await session.scalar(query)
    return row
