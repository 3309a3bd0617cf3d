"""The api's limits: request body size (an ASGI middleware), and per-key rate limits, open streams per
key and running turns per organization (dependencies the routes declare). Must never import routers.

Every refusal is an `application/problem+json` answer: 413 for a body, 429 with `Retry-After` for the
rest. Counts live in Redis (and turns in Postgres), so they hold across api replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import structlog
from fastapi import Depends
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import CurrentPrincipal, StateDep, visibility_of
from api.problems import problem_response
from api.state import AppState
from core.contracts import ChatMode, IfBusy, TurnInput
from core.errors import ContentTooLargeError, TooManyRequestsError
from storage import chats
from storage.api_keys import Principal
from storage.limits import StreamLeases, count_running_turns, parse_rate_limit

log = structlog.get_logger(__name__)

# What a refusal by a concurrency cap suggests waiting: a slot frees whenever one of the caller's
# streams or turns ends, which no clock predicts, so this is a short polite pause.
CAP_RETRY_AFTER_SECONDS = 2


# Requests that may carry files: uploads, and sends (whose messages may hold `data:` URLs). They are
# bounded by the upload limit instead of the JSON one.
FILE_CARRYING_PATHS = re.compile(
    r"^/v1/(?:files|chats(?:/[^/]+(?:/attachments|/messages/[^/]+/edit)?)?)/?$"
)


class RequestSizeLimitMiddleware:
    """Answers 413 to a request whose body is larger than its limit, before the app acts on it.

    The limit is `max_bytes`, or `upload_max_bytes` for a POST to a path that may carry files. A
    declared `Content-Length` is checked first. Otherwise (chunked or streamed uploads) the body is
    counted as it arrives. A JSON (or other) body is held until it is complete (never more than its
    limit), so the app neither parses nor stores any part of an oversized body; a multipart upload
    streams on to the app's parser (which spools it to a temporary file), and one that passes the
    limit midway is refused before the app answers, so a file is never held in memory whole. Plain
    ASGI rather than BaseHTTPMiddleware, which would buffer and break streaming responses.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = max_bytes if upload_max_bytes is None else upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carries_files = scope["method"] == "POST" and FILE_CARRYING_PATHS.match(scope["path"])
        limit = self.upload_max_bytes if carries_files else self.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        if carries_files and _is_multipart(scope):
            await self._stream_counted(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left mid-upload; there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay_then_receive() -> Message:
            # The app reads the held body once; later reads (disconnect watchers) go to the client.
            nonlocal delivered
            if not delivered:
                delivered = True
                return body
            return await receive()

        await self.app(scope, replay_then_receive, send)

    async def _stream_counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        exceeded = False
        started = False

        async def counted_receive() -> Message:
            # Past the limit the app is told the client left, which ends its parsing (and removes
            # what it spooled); whatever it answers to that is replaced by the 413 below.
            nonlocal size, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, counted_receive, tracked_send)
        if exceeded and not started:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = ContentTooLargeError(f"the request body is larger than {limit} bytes")
        log.info("api.limit_refused", limit="requestBytes", path=scope["path"])
        response = problem_response(
            error.status_code,
            error.title,
            error.detail,
            problem_type=error.problem_type,
            extra={"maxBytes": limit},
        )
        await response(scope, receive, send)


def _is_multipart(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media_type: bytes = value.split(b";", 1)[0].strip().lower()
            return media_type == b"multipart/form-data"
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _limit_rate(state: AppState, principal: Principal, limit: str, setting: str) -> None:
    items = parse_rate_limit(setting)
    if not items:
        return
    wait = await state.rate_limiter.hit(
        items, principal.organization_id, principal.api_key_id, limit
    )
    if wait is not None:
        log.info("api.limit_refused", limit=limit, organization_id=principal.organization_id)
        raise TooManyRequestsError(
            f"rate limit {setting} for {limit} reached for this API key; retry in {wait} s",
            limit=limit,
            retry_after_seconds=wait,
        )


async def limit_active_turns(state: AppState, principal: Principal, turn: TurnInput) -> None:
    """429 when the organization already runs its cap of turns and `turn` would add one.

    Called by the send handler once it knows the turn: a repeated send attaches to its existing turn
    and an interrupt takes the place of the turn it stops, so neither is refused for the cap.
    """
    cap = state.settings.max_active_turns_per_organization
    if cap == 0:
        return
    async with state.sessions() as session:
        running = await count_running_turns(
            session,
            principal.organization_id,
            presumed_lost_after=timedelta(seconds=state.settings.stream_max_lifetime_seconds),
        )
        # Only at the cap is it worth asking whether the send adds a turn at all.
        if running < cap or await _adds_no_running_turn(session, principal, turn):
            return
    log.info("api.limit_refused", limit="activeTurns", organization_id=principal.organization_id)
    raise TooManyRequestsError(
        f"the organization already has {running} running turns (at most {cap}); "
        "wait for one to finish or stop one",
        limit="activeTurns",
        retry_after_seconds=CAP_RETRY_AFTER_SECONDS,
    )


async def _adds_no_running_turn(
    session: AsyncSession, principal: Principal, turn: TurnInput
) -> bool:
    """A repeat of an existing turn attaches to it; an interrupt of a chat's running turn replaces it."""
    if await chats.get_turn_by_id(session, principal.organization_id, turn.turn_id):
        return True
    if turn.if_busy is not IfBusy.INTERRUPT:
        return False
    visibility = visibility_of(principal)
    channel = turn.external_channel
    if turn.chat_mode is ChatMode.CHANNEL and channel is not None:
        chat = await chats.get_live_chat_by_channel(session, visibility, channel.source, channel.id)
    elif turn.chat_mode is ChatMode.CONTINUE and turn.chat_id is not None:
        chat = await chats.get_live_chat(session, visibility, turn.chat_id)
    else:
        return False
    return chat is not None and chat.active_turn_id is not None


@asynccontextmanager
async def _stream_slot(state: AppState, principal: Principal) -> AsyncIterator[None]:
    """Holds one of the key's open-stream slots while the response is being sent."""
    cap = state.settings.max_open_streams_per_key
    if cap == 0:
        yield
        return
    leases = state.stream_leases
    key = leases.key(principal.organization_id, principal.api_key_id)
    lease_id = uuid.uuid4().hex
    if not await leases.acquire(key, lease_id, cap):
        log.info(
            "api.limit_refused", limit="openStreams", organization_id=principal.organization_id
        )
        raise TooManyRequestsError(
            f"this API key already has {cap} open streams; close one first",
            limit="openStreams",
            retry_after_seconds=CAP_RETRY_AFTER_SECONDS,
        )
    renewal = asyncio.create_task(_keep_lease(leases, key, lease_id))
    try:
        yield
    finally:
        renewal.cancel()
        try:
            # Shielded: a request also ends by being cancelled (server shutdown), and the slot
            # should come back at once rather than when its lease runs out.
            await asyncio.shield(leases.release(key, lease_id))
        except RedisError:
            log.warning("api.stream_lease_release_failed", exc_info=True)  # it will expire


async def _keep_lease(leases: StreamLeases, key: str, lease_id: str) -> None:
    while True:
        await asyncio.sleep(leases.renew_every_seconds)
        try:
            await leases.renew(key, lease_id)
        except RedisError:
            # Try again next round; meanwhile the lease may lapse and the cap undercount by one.
            log.warning("api.stream_lease_renewal_failed", exc_info=True)


async def _send_limits(state: StateDep, principal: CurrentPrincipal) -> AsyncIterator[None]:
    # The rate limit first: it also shields Postgres from a flood of sends. The running-turn cap is
    # checked by the handler (`limit_active_turns`), which knows the turn.
    await _limit_rate(state, principal, "sends", state.settings.send_rate_limit)
    # A send's response streams the turn (or waits for it, as JSON): it holds a stream slot.
    async with _stream_slot(state, principal):
        yield


async def _stream_open_limits(state: StateDep, principal: CurrentPrincipal) -> AsyncIterator[None]:
    await _limit_rate(state, principal, "streamOpens", state.settings.stream_open_rate_limit)
    async with _stream_slot(state, principal):
        yield


_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
# For the OpenAPI `responses` of the routes these limits guard.
LIMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "The request body is larger than the limit", **_PROBLEM},
    429: {
        "description": "A rate limit or a concurrency cap refused the request",
        "headers": {
            "Retry-After": {
                "description": "Whole seconds to wait before trying again",
                "schema": {"type": "integer"},
            }
        },
        **_PROBLEM,
    },
}

# For `dependencies=[...]` of every route that starts a turn, and of the stream resume route. The
# slot is released when the response has been sent (or the client went away), not when the handler
# returns: yield dependencies close with the request.
SEND_LIMITS = Depends(_send_limits)
STREAM_OPEN_LIMITS = Depends(_stream_open_limits)
