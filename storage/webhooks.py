"""Webhooks: the endpoints an organization's admins registered, their signing secrets sealed at rest, and
every delivery to them with its attempts. Must never import api, workflows or activities.

Every query is scoped by organization: another organization's endpoint or delivery is
indistinguishable from one that does not exist. Secrets (`whsec_...`, Standard Webhooks) are
sealed with the SecretBox on the way in; a new one is handed back once, to show once, and opened
again only for `delivery_target`, the delivering activity's way to sign. What admins read
(`EndpointRecord`, `DeliveryRecord`) never holds one.

A delivery's id is derived from its event and its target (`delivery_id_for`), so announcing an
event again creates nothing twice.
"""

from __future__ import annotations

import base64
import hashlib
import secrets as random_secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.contracts import DeliveryStatus
from core.secrets import SecretBox
from storage.models import WebhookDelivery, WebhookEndpoint, WebhookOneOffSecret

ENDPOINT_ID_PREFIX: Final = "we_"
DELIVERY_ID_PREFIX: Final = "wd_"
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the prefix, not a secret
# The spec asks for 24 to 64 random bytes.
SECRET_BYTES: Final = 32
# A delivery keeps its latest attempts; days of retries make a few dozen.
MAX_ATTEMPTS_KEPT: Final = 100


def new_endpoint_id() -> str:
    return ENDPOINT_ID_PREFIX + random_secrets.token_urlsafe(12)


def new_signing_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(SECRET_BYTES)).decode()


def delivery_id_for(organization_id: str, event_key: str, target: str) -> str:
    """The delivery of one event to one target (`endpoint:<id>` or `url:<url>`): the same id every
    time it is asked for. Hex, so it carries no `.` (the spec forbids one in `webhook-id`)."""
    digest = hashlib.sha256(f"{organization_id}\n{event_key}\n{target}".encode()).hexdigest()
    return DELIVERY_ID_PREFIX + digest[:32]


@dataclass(frozen=True)
class SigningSecrets:
    """An endpoint's secret, and the one it replaced while the rotation's overlap lasts."""

    current: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)

    def sealed(self, box: SecretBox) -> str:
        return box.seal({"current": self.current, "previous": self.previous})

    @classmethod
    def opened(cls, box: SecretBox, sealed: str) -> SigningSecrets:
        value = box.open(sealed)
        previous = value.get("previous")
        return cls(current=str(value["current"]), previous=str(previous) if previous else None)

    def signing(self, previous_expires_at: datetime | None, now: datetime) -> list[str]:
        """The secrets that sign now: the current one, and the previous one until it expires."""
        if self.previous and previous_expires_at is not None and now < previous_expires_at:
            return [self.current, self.previous]
        return [self.current]


def _rotated(box: SecretBox, sealed: str, overlap: timedelta) -> tuple[str, str, datetime | None]:
    """(the new secret, the sealed pair, when the previous one stops signing)."""
    secret = new_signing_secret()
    if overlap <= timedelta(0):
        return secret, SigningSecrets(secret).sealed(box), None
    kept = SigningSecrets.opened(box, sealed)
    pair = SigningSecrets(current=secret, previous=kept.current)
    return secret, pair.sealed(box), datetime.now(UTC) + overlap


def _still_ahead(moment: datetime | None) -> datetime | None:
    return moment if moment is not None and moment > datetime.now(UTC) else None


# --- endpoints --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointRecord:
    """An endpoint as admins read it: no secret in it."""

    id: str
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    # While a rotation's overlap lasts: when the previous secret stops signing.
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class EndpointChanges:
    """An update; None leaves a field as it is. `enabled=True` also forgets past failures."""

    url: str | None = None
    description: str | None = None
    events: list[str] | None = None
    enabled: bool | None = None


def _endpoint_record(row: WebhookEndpoint) -> EndpointRecord:
    return EndpointRecord(
        id=row.id,
        url=row.url,
        description=row.description,
        events=list(row.events),
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        consecutive_failures=row.consecutive_failures,
        previous_secret_expires_at=_still_ahead(row.previous_secret_expires_at),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def create_endpoint(
    session: AsyncSession,
    box: SecretBox,
    organization_id: str,
    *,
    url: str,
    description: str,
    events: Sequence[str],
) -> tuple[EndpointRecord, str]:
    """A new endpoint, and its secret: the only time the secret leaves storage."""
    secret = new_signing_secret()
    row = (
        await session.execute(
            insert(WebhookEndpoint)
            .values(
                organization_id=organization_id,
                id=new_endpoint_id(),
                url=url,
                description=description,
                events=list(events),
                secrets=SigningSecrets(secret).sealed(box),
            )
            .returning(WebhookEndpoint)
        )
    ).scalar_one()
    return _endpoint_record(row), secret


async def list_endpoints(session: AsyncSession, organization_id: str) -> list[EndpointRecord]:
    """The organization's endpoints, oldest first (an organization has a handful)."""
    rows = await session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.organization_id == organization_id)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
    return [_endpoint_record(row) for row in rows]


async def has_endpoints(session: AsyncSession, organization_id: str) -> bool:
    """Whether the organization has registered any endpoint, enabled or not: one that has none
    has no event to deliver and no earlier delivery left to finish."""
    found = await session.scalar(
        select(WebhookEndpoint.id)
        .where(WebhookEndpoint.organization_id == organization_id)
        .limit(1)
    )
    return found is not None


async def get_endpoint(
    session: AsyncSession, organization_id: str, endpoint_id: str
) -> EndpointRecord | None:
    row = await _endpoint_row(session, organization_id, endpoint_id)
    return None if row is None else _endpoint_record(row)


async def update_endpoint(
    session: AsyncSession, organization_id: str, endpoint_id: str, changes: EndpointChanges
) -> EndpointRecord | None:
    """Apply `changes`; None when the organization has no such endpoint."""
    values: dict[str, Any] = {
        name: value
        for name in ("url", "description", "events", "enabled")
        if (value := getattr(changes, name)) is not None
    }
    if changes.enabled is not None:
        # Enabled again: counting starts afresh. Disabled by an admin: no automatic reason.
        values["disabled_reason"] = None
        if changes.enabled:
            values["consecutive_failures"] = 0
    row = (
        await session.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.organization_id == organization_id,
                WebhookEndpoint.id == endpoint_id,
            )
            .values(**values, updated_at=func.now())
            .returning(WebhookEndpoint)
        )
    ).scalar_one_or_none()
    return None if row is None else _endpoint_record(row)


async def delete_endpoint(session: AsyncSession, organization_id: str, endpoint_id: str) -> bool:
    """Delete the endpoint, its secrets and its deliveries; False when there is no such endpoint.
    A delivery still retrying finds itself gone and stops."""
    # The deliveries first, then the endpoint: the order a delivery's attempt locks them in when it
    # records its outcome (a cascade from the endpoint would lock the other way and deadlock with it).
    await session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.organization_id == organization_id,
            WebhookDelivery.endpoint_id == endpoint_id,
        )
    )
    deleted = await session.execute(
        delete(WebhookEndpoint)
        .where(
            WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.id == endpoint_id
        )
        .returning(WebhookEndpoint.id)
    )
    return deleted.first() is not None


async def rotate_endpoint_secret(
    session: AsyncSession,
    box: SecretBox,
    organization_id: str,
    endpoint_id: str,
    *,
    overlap: timedelta,
) -> tuple[EndpointRecord, str] | None:
    """A new secret for the endpoint, returned once; the one it replaces keeps signing (a second
    signature) for `overlap`. None when the organization has no such endpoint."""
    row = await _endpoint_row(session, organization_id, endpoint_id, for_update=True)
    if row is None:
        return None
    secret, sealed, expires_at = _rotated(box, row.secrets, overlap)
    updated = (
        await session.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.organization_id == organization_id,
                WebhookEndpoint.id == endpoint_id,
            )
            .values(secrets=sealed, previous_secret_expires_at=expires_at, updated_at=func.now())
            .returning(WebhookEndpoint)
        )
    ).scalar_one()
    return _endpoint_record(updated), secret


async def _endpoint_row(
    session: AsyncSession, organization_id: str, endpoint_id: str, *, for_update: bool = False
) -> WebhookEndpoint | None:
    query = select(WebhookEndpoint).where(
        WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.id == endpoint_id
    )
    if for_update:
        query = query.with_for_update()
    row: WebhookEndpoint | None = await session.scalar(query)
    return row


# --- the secret of one-off URLs -----------------------------------------------------------------------


@dataclass(frozen=True)
class OneOffSecretRecord:
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


async def ensure_one_off_secret(
    session: AsyncSession, box: SecretBox, organization_id: str
) -> None:
    """Give the organization a secret for one-off URLs if it has none, so every delivery is signed
    (admins learn it by rotating it)."""
    await session.execute(
        insert(WebhookOneOffSecret)
        .values(
            organization_id=organization_id,
            secrets=SigningSecrets(new_signing_secret()).sealed(box),
        )
        .on_conflict_do_nothing(index_elements=[WebhookOneOffSecret.organization_id])
    )


async def rotate_one_off_secret(
    session: AsyncSession, box: SecretBox, organization_id: str, *, overlap: timedelta
) -> tuple[OneOffSecretRecord, str]:
    """A new secret for the organization's one-off URLs (its first, or one replacing the last,
    which keeps signing for `overlap`), returned once."""
    first = new_signing_secret()
    created = (
        await session.execute(
            insert(WebhookOneOffSecret)
            .values(organization_id=organization_id, secrets=SigningSecrets(first).sealed(box))
            .on_conflict_do_nothing(index_elements=[WebhookOneOffSecret.organization_id])
            .returning(WebhookOneOffSecret)
        )
    ).scalar_one_or_none()
    if created is not None:
        return _one_off_record(created), first
    row = (
        await session.execute(
            select(WebhookOneOffSecret)
            .where(WebhookOneOffSecret.organization_id == organization_id)
            .with_for_update()
        )
    ).scalar_one()
    secret, sealed, expires_at = _rotated(box, row.secrets, overlap)
    updated = (
        await session.execute(
            update(WebhookOneOffSecret)
            .where(WebhookOneOffSecret.organization_id == organization_id)
            .values(secrets=sealed, previous_secret_expires_at=expires_at, updated_at=func.now())
            .returning(WebhookOneOffSecret)
        )
    ).scalar_one()
    return _one_off_record(updated), secret


def _one_off_record(row: WebhookOneOffSecret) -> OneOffSecretRecord:
    return OneOffSecretRecord(
        previous_secret_expires_at=_still_ahead(row.previous_secret_expires_at),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# --- deliveries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventDeliveries:
    """An announced event's deliveries: all of them, and those still to be attempted."""

    ids: list[str]
    pending_ids: list[str]


async def create_deliveries(
    session: AsyncSession,
    organization_id: str,
    *,
    event_type: str,
    event_key: str,
    payload: dict[str, Any],
    one_off_url: str | None,
) -> EventDeliveries:
    """One delivery per enabled endpoint subscribed to `event_type`, and one to `one_off_url`;
    deliveries made by an earlier announcement of `event_key` are kept as they are.

    The pending ones are looked up among the event's possible deliveries to every endpoint, not
    only those subscribed now: a delivery created before its endpoint was disabled or changed its
    events still needs its workflow (which then ends it)."""
    endpoints = (
        await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.enabled, WebhookEndpoint.events).where(
                WebhookEndpoint.organization_id == organization_id
            )
        )
    ).all()
    rows: list[dict[str, Any]] = []
    candidates: list[str] = []
    for endpoint_id, enabled, events in sorted(endpoints):
        delivery_id = delivery_id_for(organization_id, event_key, f"endpoint:{endpoint_id}")
        candidates.append(delivery_id)
        if enabled and event_type in events:
            rows.append({"id": delivery_id, "endpoint_id": endpoint_id, "url": None})
    if one_off_url is not None:
        delivery_id = delivery_id_for(organization_id, event_key, f"url:{one_off_url}")
        candidates.append(delivery_id)
        rows.append({"id": delivery_id, "endpoint_id": None, "url": one_off_url})
    if rows:
        await session.execute(
            insert(WebhookDelivery)
            .values(
                [
                    {
                        **row,
                        "organization_id": organization_id,
                        "event_type": event_type,
                        "payload": payload,
                        "status": DeliveryStatus.PENDING,
                    }
                    for row in rows
                ]
            )
            .on_conflict_do_nothing(
                index_elements=[WebhookDelivery.organization_id, WebhookDelivery.id]
            )
        )
    existing = (
        await session.execute(
            select(WebhookDelivery.id, WebhookDelivery.status)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.id.in_(candidates),
            )
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        )
    ).all()
    return EventDeliveries(
        ids=[delivery_id for delivery_id, _ in existing],
        pending_ids=[
            delivery_id for delivery_id, status in existing if status == DeliveryStatus.PENDING
        ],
    )


@dataclass(frozen=True)
class DeliveryTarget:
    """What one attempt needs: where to, what, and the secrets that sign it now."""

    delivery_id: str
    status: DeliveryStatus
    url: str
    payload: dict[str, Any]
    endpoint_id: str | None
    # False when the endpoint was disabled after the delivery was created.
    endpoint_enabled: bool
    secrets: list[str] = field(repr=False)


async def delivery_target(
    session: AsyncSession, box: SecretBox, organization_id: str, delivery_id: str
) -> DeliveryTarget | None:
    """The delivery with its secrets opened; None when it is gone (its endpoint was deleted).

    An endpoint's deliveries go to its URL as it is now, so a corrected URL gets the retries."""
    delivery = await _delivery_row(session, organization_id, delivery_id)
    if delivery is None:
        return None
    now = datetime.now(UTC)
    if delivery.endpoint_id is not None:
        endpoint = await _endpoint_row(session, organization_id, delivery.endpoint_id)
        if endpoint is None:
            return None
        url, enabled = endpoint.url, endpoint.enabled
        sealed, expires_at = endpoint.secrets, endpoint.previous_secret_expires_at
    else:
        one_off = await session.scalar(
            select(WebhookOneOffSecret).where(
                WebhookOneOffSecret.organization_id == organization_id
            )
        )
        # Never None in practice: the secret is ensured with the delivery, and goes only with
        # its organization (deliveries included).
        if one_off is None or delivery.url is None:
            return None
        url, enabled = delivery.url, True
        sealed, expires_at = one_off.secrets, one_off.previous_secret_expires_at
    return DeliveryTarget(
        delivery_id=delivery.id,
        status=DeliveryStatus(delivery.status),
        url=url,
        payload=delivery.payload,
        endpoint_id=delivery.endpoint_id,
        endpoint_enabled=enabled,
        secrets=SigningSecrets.opened(box, sealed).signing(expires_at, now),
    )


async def append_attempt(
    session: AsyncSession, organization_id: str, delivery_id: str, attempt: dict[str, Any]
) -> None:
    """Record one attempt (`at`, `statusCode`, `durationMs`, `error`), keeping the latest ones."""
    row = await _delivery_row(session, organization_id, delivery_id, for_update=True)
    if row is None:
        return
    attempts = [*row.attempts, attempt][-MAX_ATTEMPTS_KEPT:]
    await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.organization_id == organization_id, WebhookDelivery.id == delivery_id
        )
        .values(attempts=attempts)
    )


async def mark_delivered(session: AsyncSession, organization_id: str, delivery_id: str) -> None:
    """The delivery arrived; its endpoint's run of failures, if any, is over."""
    endpoint_id = (
        await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.id == delivery_id,
            )
            .values(status=DeliveryStatus.DELIVERED, delivered_at=func.now())
            .returning(WebhookDelivery.endpoint_id)
        )
    ).scalar_one_or_none()
    if endpoint_id is not None:
        await session.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.organization_id == organization_id,
                WebhookEndpoint.id == endpoint_id,
                WebhookEndpoint.consecutive_failures != 0,
            )
            .values(consecutive_failures=0)
        )


@dataclass(frozen=True)
class FailedDelivery:
    endpoint_id: str | None
    # The last attempt's error ("HTTP 500", "no answer within 15 s", ...).
    last_error: str | None


async def mark_failed(
    session: AsyncSession, organization_id: str, delivery_id: str
) -> FailedDelivery | None:
    """End a pending delivery as failed; None when it was not pending (so a repeated call counts
    nothing twice)."""
    row = (
        await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
            .values(status=DeliveryStatus.FAILED)
            .returning(WebhookDelivery.endpoint_id, WebhookDelivery.attempts)
        )
    ).first()
    if row is None:
        return None
    endpoint_id, attempts = row
    last_error = attempts[-1].get("error") if attempts else None
    return FailedDelivery(endpoint_id=endpoint_id, last_error=last_error)


async def count_failure(
    session: AsyncSession,
    organization_id: str,
    endpoint_id: str,
    *,
    disable_after: int,
    last_error: str | None,
) -> EndpointRecord | None:
    """One more delivery to the endpoint failed for good; the `disable_after`th in a row disables
    it, saying why. One statement, so deliveries failing at once are all counted."""
    failures = WebhookEndpoint.consecutive_failures + 1
    reason = func.concat(failures, " deliveries in a row failed; last: ", last_error or "no answer")
    reaches = (failures >= disable_after) & WebhookEndpoint.enabled
    row = (
        await session.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.organization_id == organization_id,
                WebhookEndpoint.id == endpoint_id,
            )
            .values(
                consecutive_failures=failures,
                disabled_reason=case((reaches, reason), else_=WebhookEndpoint.disabled_reason),
                enabled=case((reaches, False), else_=WebhookEndpoint.enabled),
                updated_at=case((reaches, func.now()), else_=WebhookEndpoint.updated_at),
            )
            .returning(WebhookEndpoint)
        )
    ).scalar_one_or_none()
    return None if row is None else _endpoint_record(row)


async def disable_endpoint(
    session: AsyncSession, organization_id: str, endpoint_id: str, reason: str
) -> None:
    await session.execute(
        update(WebhookEndpoint)
        .where(
            WebhookEndpoint.organization_id == organization_id,
            WebhookEndpoint.id == endpoint_id,
        )
        .values(enabled=False, disabled_reason=reason, updated_at=func.now())
    )


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery as admins read it."""

    id: str
    endpoint_id: str | None
    url: str | None
    event_type: str
    payload: dict[str, Any]
    status: str
    attempts: list[dict[str, Any]]
    created_at: datetime
    delivered_at: datetime | None


def _delivery_record(row: WebhookDelivery) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        endpoint_id=row.endpoint_id,
        url=row.url,
        event_type=row.event_type,
        payload=row.payload,
        status=row.status,
        attempts=list(row.attempts),
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def _of_target(endpoint_id: str | None) -> Any:
    """Deliveries to the endpoint, or (None) to one-off URLs."""
    if endpoint_id is None:
        return WebhookDelivery.endpoint_id.is_(None)
    return WebhookDelivery.endpoint_id == endpoint_id


async def list_deliveries(
    session: AsyncSession,
    organization_id: str,
    endpoint_id: str | None,
    *,
    limit: int,
    offset: int,
) -> tuple[list[DeliveryRecord], int]:
    """A page of an endpoint's deliveries (None: of one-off URLs), newest first, and their total."""
    where = (WebhookDelivery.organization_id == organization_id, _of_target(endpoint_id))
    total = (
        await session.execute(select(func.count()).select_from(WebhookDelivery).where(*where))
    ).scalar_one()
    rows = await session.scalars(
        select(WebhookDelivery)
        .where(*where)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit)
        .offset(offset)
    )
    return [_delivery_record(row) for row in rows], total


async def get_delivery(
    session: AsyncSession, organization_id: str, endpoint_id: str | None, delivery_id: str
) -> DeliveryRecord | None:
    row = await session.scalar(
        select(WebhookDelivery).where(
            WebhookDelivery.organization_id == organization_id,
            WebhookDelivery.id == delivery_id,
            _of_target(endpoint_id),
        )
    )
    return None if row is None else _delivery_record(row)


async def reopen_delivery(
    session: AsyncSession, organization_id: str, endpoint_id: str | None, delivery_id: str
) -> DeliveryRecord | None:
    """Make the delivery pending again, for a manual redelivery (same id, same payload; its
    attempts so far stay listed)."""
    row = (
        await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.organization_id == organization_id,
                WebhookDelivery.id == delivery_id,
                _of_target(endpoint_id),
            )
            .values(status=DeliveryStatus.PENDING, delivered_at=None)
            .returning(WebhookDelivery)
        )
    ).scalar_one_or_none()
    return None if row is None else _delivery_record(row)


async def _delivery_row(
    session: AsyncSession, organization_id: str, delivery_id: str, *, for_update: bool = False
) -> WebhookDelivery | None:
    query = select(WebhookDelivery).where(
        WebhookDelivery.organization_id == organization_id, WebhookDelivery.id == delivery_id
    )
    if for_update:
        query = query.with_for_update()
    row: WebhookDelivery | None = await session.scalar(query)
    return row
