"""Webhook activities: announce an event (one delivery row per subscribed endpoint, one workflow per
delivery) and make one signed delivery attempt through the outbound guard. Never imports api or
workflows (the delivery workflow is started by name).

Deliveries are Standard Webhooks: `webhook-id` is the delivery id on every attempt, `webhook-timestamp`
the attempt's own time, and `webhook-signature` one `v1,` signature per secret that signs now (two
while a rotation's overlap lasts). Temporal owns the retries: an attempt that fails raises, and the
workflow's retry policy says when the next one runs. Payloads and secrets never enter workflow
history; activities read them from Postgres by id.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
from httpx_secure import SSRFProtectionError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from core.contracts import (
    WEBHOOK_DELIVERY_WORKFLOW_NAME,
    AnnounceEventInput,
    DeliverInput,
    DeliveryAttemptResult,
    DeliveryRetry,
    DeliveryStatus,
    GiveUpInput,
    TurnStatus,
    WebhookDeliveryInput,
    WebhookErrorType,
    WebhookEvent,
    webhook_delivery_workflow_id,
)
from core.secrets import SecretBox
from core.settings import Settings
from outbound.guard import OutboundPolicy, OutboundRefused, check_outbound_url, guarded_httpx_client
from storage import chats, tool_calls, webhooks
from storage.chats import Visibility, iso
from storage.turn_usage import usd_text

# The spec's bound on a payload; a turn's text is cut to fit it (`textTruncated`).
MAX_PAYLOAD_BYTES: Final = 20_000
USER_AGENT: Final = "durachat-webhooks"
GONE_REASON: Final = "the endpoint answered HTTP 410 Gone"
# A receiver that fails is routine, not a worker error: each attempt is recorded on its delivery,
# so the SDK need not log a traceback per attempt.
BENIGN: Final = ApplicationErrorCategory.BENIGN


class PayloadTooLarge(ValueError):
    """An event's data does not fit the payload bound, even without its text."""


def delivery_retry_of(settings: Settings) -> DeliveryRetry:
    return DeliveryRetry(
        initial_seconds=settings.webhook_retry_initial_seconds,
        max_interval_seconds=settings.webhook_retry_max_interval_seconds,
        for_seconds=settings.webhook_retry_for_seconds,
        attempt_timeout_seconds=settings.webhook_attempt_timeout_seconds,
    )


def event_payload(
    event_type: str, data: dict[str, Any], *, at: datetime | None = None
) -> dict[str, Any]:
    """The Standard Webhooks payload `{"type", "timestamp", "data"}`, under MAX_PAYLOAD_BYTES: a
    `text` too long for it is cut (and `textTruncated` set); raises PayloadTooLarge otherwise."""
    payload = {"type": event_type, "timestamp": iso(at or datetime.now(UTC)), "data": data}
    if _size(payload) <= MAX_PAYLOAD_BYTES:
        return payload
    text = data.get("text")
    if not isinstance(text, str):
        raise PayloadTooLarge(f"a {event_type} payload is over {MAX_PAYLOAD_BYTES} bytes")
    cut = {**data, "textTruncated": True}
    while (overflow := _size({**payload, "data": cut}) - MAX_PAYLOAD_BYTES) > 0:
        text = cut["text"]
        if not text:
            raise PayloadTooLarge(f"a {event_type} payload is over {MAX_PAYLOAD_BYTES} bytes")
        # Characters take from one to six bytes in the body: keep the share of them that fits,
        # and at least one fewer each time round.
        encoded = len(json.dumps(text, ensure_ascii=False).encode())
        keep = len(text) * max(0, encoded - overflow) // encoded
        cut["text"] = text[: min(keep, len(text) - 1)]
    return {**payload, "data": cut}


def _body(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _size(payload: dict[str, Any]) -> int:
    return len(_body(payload).encode())


async def turn_event_payload(
    session: AsyncSession,
    organization_id: str,
    event_type: WebhookEvent,
    chat_id: str,
    turn_id: str,
    *,
    public_base_url: str | None = None,
) -> dict[str, Any] | None:
    """The `data` of a turn's event, read from Postgres; None when there is no such turn.

    `chatId`, `turnId`, `messageId`, `externalChannel`, `status`, `text` (the answer's), `usage`,
    `costUsd`, `error`, `links`; approval.requested adds the turn's pending `approvals`."""
    turn = await chats.get_turn(session, organization_id, chat_id, turn_id)
    if turn is None:
        return None
    message = await chats.get_message(session, organization_id, turn.assistant_message_id)
    chat = await chats.get_live_chat(session, Visibility(organization_id), chat_id)
    base = (public_base_url or "").rstrip("/")
    links = {
        "chat": f"{base}/v1/chats/{chat_id}",
        "messages": f"{base}/v1/chats/{chat_id}/messages",
    }
    data: dict[str, Any] = {
        "chatId": chat_id,
        "turnId": turn_id,
        "messageId": turn.assistant_message_id if message is not None else None,
        "externalChannel": (
            {"source": chat.external_source, "id": chat.external_id}
            if chat is not None and chat.external_source and chat.external_id
            else None
        ),
        "status": turn.status,
        "text": _text_of(message.parts) if message is not None else "",
        "usage": (message.message_metadata.get("usage") or {}) if message is not None else {},
        "costUsd": usd_text(turn.cost_usd) if turn.cost_usd is not None else None,
        "error": turn.error,
        "links": links,
    }
    if event_type is WebhookEvent.APPROVAL_REQUESTED:
        data["status"] = TurnStatus.AWAITING_INPUT
        pending = await tool_calls.list_approvals(session, organization_id, chat_id)
        data["approvals"] = [
            {
                "id": approval.id,
                "toolCallId": approval.tool_call_id,
                "toolName": approval.tool_name,
                "expiresAt": iso(approval.expires_at),
            }
            for approval in pending
            if approval.turn_id == turn_id
        ]
        links["approvals"] = f"{base}/v1/chats/{chat_id}/approvals"
    return data


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(str(part.get("text", "")) for part in parts if part.get("type") == "text")


async def start_delivery_runs(
    temporal: Client,
    *,
    task_queue: str,
    organization_id: str,
    delivery_ids: Sequence[str],
    retry: DeliveryRetry,
) -> None:
    """A delivery workflow per delivery; one already running is left to go on (so starting again
    is harmless), one that ended is run anew (a redelivery)."""
    await asyncio.gather(
        *(
            temporal.start_workflow(
                WEBHOOK_DELIVERY_WORKFLOW_NAME,
                WebhookDeliveryInput(organization_id, delivery_id, retry),
                id=webhook_delivery_workflow_id(delivery_id),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
            for delivery_id in delivery_ids
        )
    )


class WebhookAnnouncer:
    """Turns an event into deliveries and starts them; the activity's logic, callable by anything
    holding a Temporal client (tests announce events this way)."""

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        temporal: Client,
        secrets: SecretBox,
        *,
        task_queue: str,
        retry: DeliveryRetry,
        public_base_url: str | None = None,
    ) -> None:
        self._sessions = session_factory
        self._temporal = temporal
        self._secrets = secrets
        self._task_queue = task_queue
        self._retry = retry
        self._public_base_url = public_base_url

    async def announce(
        self,
        organization_id: str,
        event_type: str,
        event_key: str,
        data: dict[str, Any],
        *,
        one_off_url: str | None = None,
    ) -> list[str]:
        """Deliver `data` as `event_type` to every enabled endpoint subscribed to it (and to
        `one_off_url`); the event's delivery ids. `event_key` names the event: announcing the
        same key again creates no delivery twice and delivers none again."""
        payload = event_payload(event_type, data)
        async with self._sessions.begin() as session:
            if one_off_url is not None:
                await webhooks.ensure_one_off_secret(session, self._secrets, organization_id)
            deliveries = await webhooks.create_deliveries(
                session,
                organization_id,
                event_type=event_type,
                event_key=event_key,
                payload=payload,
                one_off_url=one_off_url,
            )
        await start_delivery_runs(
            self._temporal,
            task_queue=self._task_queue,
            organization_id=organization_id,
            delivery_ids=deliveries.pending_ids,
            retry=self._retry,
        )
        return deliveries.ids

    async def announce_turn_event(self, request: AnnounceEventInput) -> list[str]:
        """Announce a turn's event with its data read from Postgres."""
        event_type = WebhookEvent(request.event_type)
        async with self._sessions() as session:
            # Every turn announces its end and most organizations have no webhook: one indexed
            # lookup then answers, before the event's data is read.
            if request.one_off_url is None and not await webhooks.has_endpoints(
                session, request.organization_id
            ):
                return []
            data = await turn_event_payload(
                session,
                request.organization_id,
                event_type,
                request.chat_id,
                request.turn_id,
                public_base_url=self._public_base_url,
            )
        if data is None:
            return []
        event_key = f"{request.turn_id}:{event_type}"
        if request.step is not None:
            event_key += f":{request.step}"
        return await self.announce(
            request.organization_id,
            event_type,
            event_key,
            data,
            one_off_url=request.one_off_url,
        )


@dataclass(frozen=True)
class SentResponse:
    status_code: int
    retry_after: str | None


class WebhookSender:
    """POSTs to URLs users name, through the outbound guard's checks (the URL and every address
    it resolves to before anything is sent, and the address each connection uses), following no
    redirect: to Standard Webhooks a 3xx is a failed attempt, and following one would send the
    signed payload somewhere nobody registered. Reads no response body."""

    def __init__(self, policy: OutboundPolicy, *, timeout_seconds: float) -> None:
        self._policy = policy
        self._timeout_seconds = timeout_seconds
        self._client = guarded_httpx_client(
            policy, timeout_seconds=timeout_seconds, headers={"User-Agent": USER_AGENT}
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSender:
        return cls(
            OutboundPolicy.from_settings(settings),
            timeout_seconds=settings.webhook_attempt_timeout_seconds,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> SentResponse:
        """The receiver's status. Raises OutboundRefused for a destination the guard refuses,
        httpx.HTTPError or TimeoutError when no answer came within the timeout."""
        target = await check_outbound_url(self._policy, url)
        # httpx's timeouts bound each read; this bounds the whole exchange.
        async with asyncio.timeout(self._timeout_seconds):
            request = self._client.build_request("POST", target, content=body, headers=headers)
            try:
                response = await self._client.send(request, stream=True)
            except SSRFProtectionError as exc:
                raise OutboundRefused(f"{url} is not allowed: {exc}") from None
            try:
                return SentResponse(response.status_code, response.headers.get("retry-after"))
            finally:
                await response.aclose()


def _retry_after_seconds(value: str | None, ceiling: float) -> float | None:
    """A `retry-after` header (seconds, or an HTTP date) in seconds, at most `ceiling`."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), ceiling)


class WebhookActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        sender: WebhookSender,
        secrets: SecretBox,
        temporal: Client,
        settings: Settings,
    ) -> None:
        self._sessions = session_factory
        self._sender = sender
        self._secrets = secrets
        self._settings = settings
        self._announcer = WebhookAnnouncer(
            session_factory,
            temporal,
            secrets,
            task_queue=settings.temporal_task_queue,
            retry=delivery_retry_of(settings),
            public_base_url=settings.public_base_url,
        )

    @activity.defn
    async def announce_event(self, request: AnnounceEventInput) -> list[str]:
        """Create the event's deliveries and start a workflow for each; their ids."""
        return await self._announcer.announce_turn_event(request)

    @activity.defn
    async def deliver(self, request: DeliverInput) -> DeliveryAttemptResult:
        """One attempt: sign, POST, record. Delivered (2xx) or gone (410) returns; any other
        answer, or none, raises for Temporal to retry; a URL the guard refuses fails for good."""
        async with self._sessions() as session:
            target = await webhooks.delivery_target(
                session, self._secrets, request.organization_id, request.delivery_id
            )
        if target is None:
            # Its endpoint was deleted, and the delivery with it.
            return DeliveryAttemptResult(request.delivery_id, DeliveryStatus.FAILED)
        if target.status is not DeliveryStatus.PENDING:
            return DeliveryAttemptResult(request.delivery_id, target.status)
        if not target.endpoint_enabled:
            async with self._sessions.begin() as session:
                await webhooks.mark_failed(session, request.organization_id, request.delivery_id)
            return DeliveryAttemptResult(request.delivery_id, DeliveryStatus.FAILED)

        body = _body(target.payload)
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": target.delivery_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": " ".join(
                Webhook(secret).sign(target.delivery_id, now, body) for secret in target.secrets
            ),
        }
        started = time.monotonic()
        try:
            sent = await self._sender.post(target.url, body.encode(), headers)
        except OutboundRefused as refused:
            await self._record(request, now, started, None, str(refused))
            raise ApplicationError(
                str(refused), type=WebhookErrorType.REFUSED, non_retryable=True, category=BENIGN
            ) from None
        except (httpx.HTTPError, TimeoutError) as exc:
            error = _no_answer(exc, self._settings.webhook_attempt_timeout_seconds)
            await self._record(request, now, started, None, error)
            raise ApplicationError(
                error, type=WebhookErrorType.UNDELIVERED, category=BENIGN
            ) from None

        code = sent.status_code
        if 200 <= code < 300:
            await self._record(request, now, started, code, None, outcome=DeliveryStatus.DELIVERED)
            return DeliveryAttemptResult(request.delivery_id, DeliveryStatus.DELIVERED, code)
        if code == 410:
            await self._record(
                request, now, started, code, GONE_REASON, outcome=DeliveryStatus.FAILED
            )
            if target.endpoint_id is not None:
                async with self._sessions.begin() as session:
                    await webhooks.disable_endpoint(
                        session, request.organization_id, target.endpoint_id, GONE_REASON
                    )
                activity.logger.warning(
                    "webhook endpoint %s answered 410 Gone: disabled", target.endpoint_id
                )
            return DeliveryAttemptResult(request.delivery_id, DeliveryStatus.FAILED, code)
        error = f"HTTP {code}"
        if 300 <= code < 400:
            error += " (redirects are not followed)"
        await self._record(request, now, started, code, error)
        # Honoured beyond the backoff's own bound: the receiver knows when it can take more.
        delay = _retry_after_seconds(sent.retry_after, self._settings.webhook_retry_for_seconds)
        raise ApplicationError(
            error,
            type=WebhookErrorType.UNDELIVERED,
            next_retry_delay=timedelta(seconds=delay) if delay is not None else None,
            category=BENIGN,
        )

    @activity.defn
    async def give_up(self, request: GiveUpInput) -> None:
        """End a delivery whose retries ran out as failed, and count it against its endpoint:
        `webhook_disable_after_failures` in a row disable the endpoint."""
        limit = self._settings.webhook_disable_after_failures
        async with self._sessions.begin() as session:
            failed = await webhooks.mark_failed(
                session, request.organization_id, request.delivery_id
            )
            if failed is None or failed.endpoint_id is None:
                return
            endpoint = await webhooks.count_failure(
                session,
                request.organization_id,
                failed.endpoint_id,
                disable_after=limit,
                last_error=failed.last_error,
            )
        if endpoint is not None and not endpoint.enabled and endpoint.consecutive_failures == limit:
            activity.logger.warning(
                "webhook endpoint %s disabled: %s", endpoint.id, endpoint.disabled_reason
            )

    async def _record(
        self,
        request: DeliverInput,
        at: datetime,
        started: float,
        status_code: int | None,
        error: str | None,
        *,
        outcome: DeliveryStatus | None = None,
    ) -> None:
        attempt = {
            "at": iso(at),
            "statusCode": status_code,
            "durationMs": round((time.monotonic() - started) * 1000),
            "error": error,
        }
        async with self._sessions.begin() as session:
            await webhooks.append_attempt(
                session, request.organization_id, request.delivery_id, attempt
            )
            if outcome is DeliveryStatus.DELIVERED:
                await webhooks.mark_delivered(session, request.organization_id, request.delivery_id)
            elif outcome is DeliveryStatus.FAILED:
                await webhooks.mark_failed(session, request.organization_id, request.delivery_id)


def _no_answer(exc: Exception, timeout_seconds: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout_seconds:g} s"
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect: {detail}"[:500]
    return f"no answer: {detail}"[:500]
