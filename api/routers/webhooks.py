"""Webhook endpoints: organization admins register URLs for completion events (create, list, read,
update, delete), rotate their signing secrets, and read and redeliver their deliveries. A secret is
shown once, in the answer that creates it; no other answer or log line holds one.

`one-off` in place of an endpoint id stands for the deliveries to one-off URLs (given with a send
rather than registered): their secret is the organization's own, rotated at
`/v1/webhooks/one-off/rotate-secret`, and their deliveries are listed and redelivered there too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, get_args

import httpx
import structlog
from fastapi import APIRouter, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from activities.webhooks import delivery_retry_of, start_delivery_runs
from api.deps import AdminPrincipal, SessionDep, StateDep
from api.schemas import RequestBody, check_toolkit_url
from core.contracts import WebhookEvent
from core.errors import ConflictError, NotFoundError
from core.secrets import SecretBox
from outbound.guard import OutboundPolicy, OutboundRefused, check_outbound_url
from storage import webhooks
from storage.chats import iso
from storage.webhooks import DeliveryRecord, EndpointChanges, EndpointRecord

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
log = structlog.get_logger(__name__)

# The path segment that stands for one-off URLs where an endpoint id goes.
ONE_OFF: Final = "one-off"

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
NOT_FOUND: Responses = {404: {"description": "No such webhook in this organization", **PROBLEM}}
INVALID: Responses = {
    422: {
        "description": "Invalid parameters or body, or a URL the outbound guard refuses",
        **PROBLEM,
    }
}

WebhookId = Annotated[
    str, Path(max_length=64, description="The webhook's id (`we_...`), or `one-off`")
]
DeliveryId = Annotated[str, Path(max_length=64, description="The delivery's id (`wd_...`)")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1 to 100")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip")]

EventName = Literal["turn.completed", "turn.failed", "turn.aborted", "approval.requested"]
ALL_EVENTS: list[EventName] = list(get_args(EventName))
# The one list of events, spelt twice: as the wire's Literal and as the contract's enum.
assert set(ALL_EVENTS) == {event.value for event in WebhookEvent}
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2_048,
        description="Where events are POSTed: http or https, without credentials. It must answer "
        "2xx; redirects are not followed.",
    ),
]
Description = Annotated[str, Field(max_length=1_000, description="What the webhook is for.")]
Events = Annotated[
    list[EventName],
    Field(min_length=1, max_length=len(ALL_EVENTS), description="The events delivered."),
]


def _distinct(events: list[EventName] | None) -> list[EventName] | None:
    if events is not None and len(set(events)) != len(events):
        raise ValueError("names an event twice")
    return events


class WebhookCreate(RequestBody):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: Events = Field(default_factory=lambda: list(ALL_EVENTS))
    description: Description = ""

    _url = field_validator("url")(check_toolkit_url)
    _events = field_validator("events")(_distinct)


class WebhookUpdate(RequestBody):
    """Changes to a webhook: fields left out stay as they are. `enabled: true` re-enables a
    disabled webhook and forgets its failures."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl | None = None
    events: Events | None = None
    description: Description | None = None
    enabled: bool | None = Field(default=None, strict=True)

    _url = field_validator("url")(check_toolkit_url)
    _events = field_validator("events")(_distinct)

    @field_validator("url", "events", "description", "enabled", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may not be null (leave it out to keep it)")
        return value


class WebhookOut(BaseModel):
    """A webhook as admins read it: never its secret."""

    id: str
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabledReason: str | None = Field(  # noqa: N815 - wire names are camelCase
        description="Why it was disabled automatically (a 410, or failed deliveries in a row)."
    )
    consecutiveFailures: int = Field(  # noqa: N815
        description="Deliveries that failed for good since the last one delivered."
    )
    previousSecretExpiresAt: str | None = Field(  # noqa: N815
        description="After a rotation: until when the previous secret signs too."
    )
    createdAt: str  # noqa: N815
    updatedAt: str  # noqa: N815

    @classmethod
    def fields_of(cls, record: EndpointRecord) -> dict[str, Any]:
        return {
            "id": record.id,
            "url": record.url,
            "description": record.description,
            "events": record.events,
            "enabled": record.enabled,
            "disabledReason": record.disabled_reason,
            "consecutiveFailures": record.consecutive_failures,
            "previousSecretExpiresAt": _iso_or_none(record.previous_secret_expires_at),
            "createdAt": iso(record.created_at),
            "updatedAt": iso(record.updated_at),
        }

    @classmethod
    def of(cls, record: EndpointRecord) -> WebhookOut:
        return cls.model_validate(cls.fields_of(record))


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(
        description="The signing secret (`whsec_...`, Standard Webhooks). Shown this once: "
        "store it now."
    )


class WebhookListOut(BaseModel):
    items: list[WebhookOut] = Field(description="Oldest first.")


class WebhookSecretOut(BaseModel):
    id: str = Field(description="The webhook's id, or `one-off`.")
    secret: str = Field(description="The new signing secret, shown this once.")
    previousSecretExpiresAt: str | None = Field(  # noqa: N815
        description="Until then the previous secret signs too (a second `v1,` signature)."
    )


class DeliveryAttemptOut(BaseModel):
    at: str
    statusCode: int | None = Field(description="The receiver's status; null: no answer.")  # noqa: N815
    durationMs: int  # noqa: N815
    error: str | None


class DeliveryOut(BaseModel):
    id: str = Field(description="The `webhook-id` every attempt carries.")
    webhookId: str | None = Field(description="Null for a one-off URL.")  # noqa: N815
    url: str | None = Field(description="The one-off URL; null for a webhook's delivery.")
    eventType: str  # noqa: N815
    status: Literal["pending", "delivered", "failed"]
    attempts: list[DeliveryAttemptOut] = Field(description="Oldest first.")
    payload: dict[str, Any] = Field(description="The JSON body every attempt sends.")
    createdAt: str  # noqa: N815
    deliveredAt: str | None  # noqa: N815

    @classmethod
    def of(cls, record: DeliveryRecord) -> DeliveryOut:
        return cls.model_validate(
            {
                "id": record.id,
                "webhookId": record.endpoint_id,
                "url": record.url,
                "eventType": record.event_type,
                "status": record.status,
                "attempts": record.attempts,
                "payload": record.payload,
                "createdAt": iso(record.created_at),
                "deliveredAt": _iso_or_none(record.delivered_at),
            }
        )


class DeliveryPageOut(BaseModel):
    items: list[DeliveryOut] = Field(description="Newest first.")
    total: int
    limit: int
    offset: int


def _iso_or_none(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


def _box(state: StateDep) -> SecretBox:
    return SecretBox.from_settings(state.settings)


async def _check_reachable(state: StateDep, url: str) -> None:
    """Refuse, as a 422 on `url`, a URL the outbound guard would never deliver to."""
    try:
        await check_outbound_url(OutboundPolicy.from_settings(state.settings), url)
    except (OutboundRefused, httpx.ConnectError) as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "url"), "msg": str(exc), "input": url}]
        ) from None


async def _target_of(
    session: SessionDep, organization_id: str, webhook_id: str
) -> EndpointRecord | None:
    """The webhook `webhook_id` names (None for `one-off`); 404 when there is none."""
    if webhook_id == ONE_OFF:
        return None
    record = await webhooks.get_endpoint(session, organization_id, webhook_id)
    if record is None:
        raise NotFoundError("webhook not found")
    return record


@router.post(
    "",
    status_code=201,
    summary="Register a URL for the organization's events; its signing secret is shown once",
    responses={
        201: {
            "description": "The new webhook and its secret",
            "headers": {
                "Location": {"description": "The webhook's URL", "schema": {"type": "string"}}
            },
        },
        **UNAUTHORIZED,
        **FORBIDDEN,
        **INVALID,
    },
)
async def create_webhook(
    body: WebhookCreate,
    principal: AdminPrincipal,
    session: SessionDep,
    state: StateDep,
    response: Response,
) -> WebhookCreatedOut:
    await _check_reachable(state, body.url)
    record, secret = await webhooks.create_endpoint(
        session,
        _box(state),
        principal.organization_id,
        url=body.url,
        description=body.description,
        events=body.events,
    )
    await session.commit()
    log.info(
        "webhooks.created",
        organization_id=principal.organization_id,
        webhook_id=record.id,
        events=record.events,
        by_key_id=principal.api_key_id,
    )
    response.headers["Location"] = f"{router.prefix}/{record.id}"
    return WebhookCreatedOut.model_validate({**WebhookOut.fields_of(record), "secret": secret})


@router.get(
    "",
    summary="The organization's webhooks, oldest first (never their secrets)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **INVALID},
)
async def list_webhooks(principal: AdminPrincipal, session: SessionDep) -> WebhookListOut:
    records = await webhooks.list_endpoints(session, principal.organization_id)
    return WebhookListOut(items=[WebhookOut.of(record) for record in records])


@router.get(
    "/{webhook_id}",
    summary="One of the organization's webhooks (never its secret)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def get_webhook(
    webhook_id: WebhookId, principal: AdminPrincipal, session: SessionDep
) -> WebhookOut:
    record = await webhooks.get_endpoint(session, principal.organization_id, webhook_id)
    if record is None:
        raise NotFoundError("webhook not found")
    return WebhookOut.of(record)


@router.patch(
    "/{webhook_id}",
    summary="Change a webhook: fields left out stay as they are; `enabled: true` re-enables it",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def update_webhook(
    webhook_id: WebhookId,
    body: WebhookUpdate,
    principal: AdminPrincipal,
    session: SessionDep,
    state: StateDep,
) -> WebhookOut:
    organization_id = principal.organization_id
    current = await webhooks.get_endpoint(session, organization_id, webhook_id)
    if current is None:
        raise NotFoundError("webhook not found")
    if body.url is not None and body.url != current.url:
        await _check_reachable(state, body.url)
    record = await webhooks.update_endpoint(
        session,
        organization_id,
        webhook_id,
        EndpointChanges(
            url=body.url,
            description=body.description,
            events=list(body.events) if body.events is not None else None,
            enabled=body.enabled,
        ),
    )
    if record is None:
        raise NotFoundError("webhook not found")
    await session.commit()
    log.info(
        "webhooks.updated",
        organization_id=organization_id,
        webhook_id=webhook_id,
        fields=sorted(body.model_fields_set),
        by_key_id=principal.api_key_id,
    )
    return WebhookOut.of(record)


@router.delete(
    "/{webhook_id}",
    status_code=204,
    summary="Delete a webhook, its secret and its deliveries; retries still due stop",
    responses={
        204: {"description": "The webhook is deleted"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
        **INVALID,
    },
)
async def delete_webhook(
    webhook_id: WebhookId, principal: AdminPrincipal, session: SessionDep
) -> Response:
    if not await webhooks.delete_endpoint(session, principal.organization_id, webhook_id):
        raise NotFoundError("webhook not found")
    await session.commit()
    log.info(
        "webhooks.deleted",
        organization_id=principal.organization_id,
        webhook_id=webhook_id,
        by_key_id=principal.api_key_id,
    )
    return Response(status_code=204)


@router.post(
    "/{webhook_id}/rotate-secret",
    summary="A new signing secret, shown once; the previous one keeps signing for the overlap",
    description="Until `previousSecretExpiresAt` (`DURACHAT_WEBHOOK_SECRET_OVERLAP_SECONDS` "
    "after the rotation) every delivery carries two `v1,` signatures, one per secret, so a "
    "receiver holding either verifies it. `one-off` rotates (or first creates) the "
    "organization's secret for one-off URLs.",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def rotate_webhook_secret(
    webhook_id: WebhookId, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> WebhookSecretOut:
    overlap = timedelta(seconds=state.settings.webhook_secret_overlap_seconds)
    organization_id = principal.organization_id
    expires_at: datetime | None
    if webhook_id == ONE_OFF:
        one_off, secret = await webhooks.rotate_one_off_secret(
            session, _box(state), organization_id, overlap=overlap
        )
        expires_at = one_off.previous_secret_expires_at
    else:
        rotated = await webhooks.rotate_endpoint_secret(
            session, _box(state), organization_id, webhook_id, overlap=overlap
        )
        if rotated is None:
            raise NotFoundError("webhook not found")
        record, secret = rotated
        expires_at = record.previous_secret_expires_at
    await session.commit()
    log.info(
        "webhooks.secret_rotated",
        organization_id=organization_id,
        webhook_id=webhook_id,
        by_key_id=principal.api_key_id,
    )
    return WebhookSecretOut(
        id=webhook_id, secret=secret, previousSecretExpiresAt=_iso_or_none(expires_at)
    )


@router.get(
    "/{webhook_id}/deliveries",
    summary="The webhook's deliveries, newest first: status, and each attempt's answer and time",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def list_webhook_deliveries(
    webhook_id: WebhookId,
    principal: AdminPrincipal,
    session: SessionDep,
    limit: Limit = 20,
    offset: Offset = 0,
) -> DeliveryPageOut:
    endpoint = await _target_of(session, principal.organization_id, webhook_id)
    records, total = await webhooks.list_deliveries(
        session,
        principal.organization_id,
        endpoint.id if endpoint is not None else None,
        limit=limit,
        offset=offset,
    )
    return DeliveryPageOut(
        items=[DeliveryOut.of(record) for record in records],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    summary="Send a delivery again: same `webhook-id`, same payload, retried as before",
    responses={
        202: {"description": "The delivery is pending again"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
        409: {"description": "The webhook is disabled: enable it first", **PROBLEM},
        **INVALID,
    },
)
async def redeliver(
    webhook_id: WebhookId,
    delivery_id: DeliveryId,
    principal: AdminPrincipal,
    session: SessionDep,
    state: StateDep,
) -> DeliveryOut:
    organization_id = principal.organization_id
    endpoint = await _target_of(session, organization_id, webhook_id)
    if endpoint is not None and not endpoint.enabled:
        raise ConflictError("the webhook is disabled: enable it (PATCH enabled: true) first")
    record = await webhooks.reopen_delivery(
        session, organization_id, endpoint.id if endpoint is not None else None, delivery_id
    )
    if record is None:
        raise NotFoundError("delivery not found")
    await session.commit()
    # After the commit, so the run finds the delivery pending. A run still retrying it is left
    # to go on.
    await start_delivery_runs(
        state.temporal,
        task_queue=state.settings.temporal_task_queue,
        organization_id=organization_id,
        delivery_ids=[delivery_id],
        retry=delivery_retry_of(state.settings),
    )
    log.info(
        "webhooks.redelivered",
        organization_id=organization_id,
        webhook_id=webhook_id,
        delivery_id=delivery_id,
        by_key_id=principal.api_key_id,
    )
    return DeliveryOut.of(record)
