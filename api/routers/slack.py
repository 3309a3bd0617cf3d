"""Slack endpoints: admins connect a workspace (its signing secret and bot token, sealed at rest);
Slack posts events, which become durable turns. No answer or log line holds a secret.

The events endpoint is a thin edge: it finds the integration of the team the event names, verifies
Slack's v0 signature with that integration's signing secret (five minutes' tolerance), answers
within Slack's three seconds (work that outlasts ACK_WITHIN_SECONDS finishes after the answer),
and leaves everything slow to Temporal. A mention, or a DM to the
bot, starts a turn on the chat bound to the thread (`<team>:<channel>:<thread root ts>`) and a
SlackReplyWorkflow that streams the answer in; the stop reaction stops the thread's running turn.
Nothing changes for a request whose signature does not hold, and an event only ever touches the
chats of the organization whose integration verified it.

Slack retries an event it thinks failed (`X-Slack-Retry-Num`), possibly while the first delivery is
still being handled. Retries are not dropped: the event id is the turn's idempotency key and the
turn id names the reply's workflow, so a retry attaches to what its first delivery started, and
starts it if the first delivery never got that far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Coroutine
from typing import Annotated, Any, Final

import structlog
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from slack_sdk.signature import SignatureVerifier
from temporalio.client import WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.service import RPCError

from activities.slack import BOT_TOKEN, BOT_USER_ID, PLATFORM, SIGNING_SECRET
from api import integration_admin
from api.bot_turns import start_channel_turn, start_reply_once, stop_channel_turn
from api.deps import AdminPrincipal, SessionDep, StateDep
from api.schemas import RequestBody
from api.state import AppState
from core.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnauthorizedError,
    UnprocessableContentError,
)
from core.secrets import SecretBox
from storage import integrations
from storage.integrations import IntegrationRecord
from workflows import search_attributes
from workflows.slack_reply import (
    SLACK_REPLY_WORKFLOW_NAME,
    SlackReplyInput,
    SlackReplyWorkflow,
    slack_reply_workflow_id,
)

router = APIRouter(prefix="/v1/integrations/slack", tags=["integrations"])
log = structlog.get_logger(__name__)
SLACK = integration_admin.Platform(PLATFORM, "Slack workspace")

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
NOT_FOUND: Responses = {
    404: {"description": "The organization has no Slack workspace connected", **PROBLEM}
}
CONFLICT: Responses = {
    409: {"description": "The workspace is connected to another organization", **PROBLEM}
}
INVALID: Responses = {422: {"description": "Invalid parameters or body", **PROBLEM}}

# Slack's ids: workspaces T…, users U… or W…, channels C…, G… or D…; message timestamps 123.456.
TEAM_ID_PATTERN: Final = r"^T[A-Z0-9]{1,31}$"
USER_ID_PATTERN: Final = r"^[UW][A-Z0-9]{1,31}$"
_CHANNEL = re.compile(r"^[CGD][A-Z0-9]{1,31}$")
_TS = re.compile(r"^[0-9]{1,12}\.[0-9]{1,12}$")
_USER = re.compile(USER_ID_PATTERN)
_TEAM = re.compile(TEAM_ID_PATTERN)
# `<@U123>` or `<@U123|name>`: how Slack writes a mention in a message's text.
_MENTION = r"<@{user}(?:\|[^>]*)?>"
_LEADING_MENTION = re.compile(r"^\s*" + _MENTION.format(user=r"[UW][A-Z0-9]+"))
# Running replies looked through for the message a stop reaction is on.
MAX_REPLIES_SEARCHED: Final = 50
# Slack counts an event not answered within 3 s as failed (and retries it): the answer goes out by
# this time whatever the work still needs.
ACK_WITHIN_SECONDS: Final = 2.0
# Event work still running after its answer, held so it is not collected before it ends.
_IN_FLIGHT: set[asyncio.Task[None]] = set()


class SlackIntegrationIn(RequestBody):
    """A Slack workspace to connect, with its app's credentials."""

    model_config = ConfigDict(extra="forbid")

    teamId: str = Field(  # noqa: N815
        pattern=TEAM_ID_PATTERN, description="The workspace's id (`T…`), as events name it."
    )
    signingSecret: str = Field(  # noqa: N815
        pattern=r"^[\x21-\x7e]{8,200}$",
        description="The app's signing secret (Basic Information); write-only.",
    )
    botToken: str = Field(  # noqa: N815
        pattern=r"^xoxb-[\x21-\x7e]{1,500}$",
        description="The bot user OAuth token (`xoxb-…`, OAuth & Permissions); write-only.",
    )
    botUserId: str | None = Field(  # noqa: N815
        default=None,
        pattern=USER_ID_PATTERN,
        description="The bot's user id (`U…`), whose mention is taken out of messages. Left out: "
        "read from each event's authorizations.",
    )


class SlackIntegrationOut(BaseModel):
    """A connected workspace: which one, never its secrets."""

    teamId: str  # noqa: N815
    botUserId: str | None  # noqa: N815
    hasSigningSecret: bool  # noqa: N815
    hasBotToken: bool  # noqa: N815
    eventsPath: str = Field(  # noqa: N815
        description="Where Slack sends events (the app's Request URL, on this service's host)."
    )

    @classmethod
    def of(cls, record: IntegrationRecord) -> SlackIntegrationOut:
        bot_user = record.settings.get(BOT_USER_ID)
        return cls(
            teamId=record.external_id,
            botUserId=str(bot_user) if bot_user else None,
            hasSigningSecret=bool(record.secrets.get(SIGNING_SECRET)),
            hasBotToken=bool(record.secrets.get(BOT_TOKEN)),
            eventsPath=f"{router.prefix}/events?team={record.external_id}",
        )


def _box(state: AppState) -> SecretBox:
    return SecretBox.from_settings(state.settings)


@router.put(
    "",
    summary="Connect the organization's Slack workspace (or replace its credentials)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **CONFLICT, **INVALID},
)
async def put_slack_integration(
    body: SlackIntegrationIn, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> SlackIntegrationOut:
    record = await integration_admin.connect(
        session,
        state,
        principal,
        SLACK,
        external_id=body.teamId,
        secrets={SIGNING_SECRET: body.signingSecret, BOT_TOKEN: body.botToken},
        settings={BOT_USER_ID: body.botUserId} if body.botUserId else {},
    )
    return SlackIntegrationOut.of(record)


@router.get(
    "",
    summary="The organization's connected Slack workspace (never its secrets)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **INVALID},
)
async def get_slack_integration(
    principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> SlackIntegrationOut:
    return SlackIntegrationOut.of(
        await integration_admin.connected(session, state, principal, SLACK)
    )


@router.delete(
    "",
    status_code=204,
    summary="Disconnect the Slack workspace: its events are refused, its secrets deleted",
    responses={
        204: {"description": "The workspace is disconnected"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
        **INVALID,
    },
)
async def delete_slack_integration(principal: AdminPrincipal, session: SessionDep) -> Response:
    await integration_admin.disconnect(session, principal, SLACK)
    return Response(status_code=204)


# Slack's endpoint, not the API's: it takes no API key (Slack signs each request instead), so it is
# kept out of the OpenAPI document; docs/slack.md describes it.
@router.post("/events", include_in_schema=False)
async def receive_slack_event(
    request: Request,
    state: StateDep,
    team: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    """Verify, acknowledge, and start or stop a turn. `team` in the URL finds the signing secret
    for Slack's URL check, which names no team; events name theirs in the signed body."""
    body = await request.body()
    envelope = _json_object(body)
    named = envelope.get("team_id")
    team_id = named if isinstance(named, str) else team
    record = await _integration_of(state, team_id)
    if record is None or not _signed_by(record, body, request.headers):
        log.info(
            "slack.event_refused",
            team_id=team_id if isinstance(team_id, str) and _TEAM.match(team_id) else None,
            connected=record is not None,
        )
        raise UnauthorizedError("the request is not signed by a connected Slack workspace")
    kind = envelope.get("type")
    if kind == "url_verification":
        return JSONResponse({"challenge": str(envelope.get("challenge", ""))})
    event = envelope.get("event")
    event_id = envelope.get("event_id")
    if (
        kind == "event_callback"
        and named == record.external_id
        and isinstance(event, dict)
        and isinstance(event_id, str)
        and event_id
    ):
        retry = request.headers.get("x-slack-retry-num")
        await _within_ack_time(_on_event(state, record, envelope, event, event_id, retry))
    return Response(status_code=200)


async def _within_ack_time(work: Coroutine[Any, Any, None]) -> None:
    """Run the event's work, waiting for it up to ACK_WITHIN_SECONDS: its failures answer an error
    (Slack retries, and the retry attaches to whatever got started). Work that takes longer (a
    cold worker's first turn) goes on in the background after the answer, so Slack does not
    time out and retry meanwhile."""
    task = asyncio.ensure_future(work)
    _IN_FLIGHT.add(task)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), ACK_WITHIN_SECONDS)
    finally:
        # Still running (past the wait, or the request itself was cancelled): it finishes alone.
        if task.done():
            _IN_FLIGHT.discard(task)
        else:
            task.add_done_callback(_finished_in_background)


def _finished_in_background(task: asyncio.Task[None]) -> None:
    _IN_FLIGHT.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("slack.event_failed_after_ack", error=type(task.exception()).__name__)


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as JSON (read only to find the team; nothing in it is trusted before the
    signature holds)."""
    try:
        loaded = json.loads(body)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


async def _integration_of(state: AppState, team_id: object) -> IntegrationRecord | None:
    if not isinstance(team_id, str) or not _TEAM.match(team_id):
        return None
    async with state.sessions() as session:
        return await integrations.find_integration(session, _box(state), PLATFORM, team_id)


def _signed_by(record: IntegrationRecord, body: bytes, headers: Any) -> bool:
    """Slack's v0 signature over the raw body, by the integration's signing secret, made within the
    last five minutes (SignatureVerifier's window); anything malformed fails."""
    secret = record.secrets.get(SIGNING_SECRET)
    if not secret:
        return False
    try:
        return SignatureVerifier(secret).is_valid(
            body=body,
            timestamp=headers.get("x-slack-request-timestamp"),
            signature=headers.get("x-slack-signature"),
        )
    except (ValueError, TypeError, UnicodeDecodeError):
        return False


async def _on_event(
    state: AppState,
    record: IntegrationRecord,
    envelope: dict[str, Any],
    event: dict[str, Any],
    event_id: str,
    retry: str | None,
) -> None:
    kind = event.get("type")
    asks = kind == "app_mention" or (kind == "message" and event.get("channel_type") == "im")
    if asks:
        await _answer(state, record, envelope, event, event_id, retry)
    elif kind == "reaction_added" and event.get("reaction") == state.settings.slack_stop_reaction:
        await _stop(state, record, event)


def _bot_user_of(record: IntegrationRecord, envelope: dict[str, Any]) -> str | None:
    """The bot's user id: as connected, or from the event's authorizations (signed by Slack)."""
    configured = record.settings.get(BOT_USER_ID)
    if isinstance(configured, str) and configured:
        return configured
    for authorization in envelope.get("authorizations") or []:
        if isinstance(authorization, dict) and authorization.get("is_bot"):
            user = authorization.get("user_id")
            if isinstance(user, str) and _USER.match(user):
                return user
    return None


def question_of(text: str, bot_user: str | None) -> str:
    """The message's text without the bot's mention."""
    if bot_user is not None:
        text = re.sub(_MENTION.format(user=re.escape(bot_user)), "", text)
    else:
        text = _LEADING_MENTION.sub("", text, count=1)
    return text.strip()


async def _answer(
    state: AppState,
    record: IntegrationRecord,
    envelope: dict[str, Any],
    event: dict[str, Any],
    event_id: str,
    retry: str | None,
) -> None:
    """A mention or a DM: a turn on the thread's chat, and the reply that relays it."""
    if event.get("bot_id") or event.get("subtype"):
        return  # a bot's message (ours among them) or an edit, a join, a file share...
    bot_user = _bot_user_of(record, envelope)
    user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
    root = event.get("thread_ts") or ts
    if not (
        isinstance(user, str)
        and _USER.match(user)
        and isinstance(channel, str)
        and _CHANNEL.match(channel)
        and isinstance(root, str)
        and _TS.match(root)
    ):
        return
    if user == bot_user:
        return
    text = question_of(str(event.get("text") or ""), bot_user)
    if not text:
        return
    team_id = record.external_id
    organization_id = record.organization_id
    where = {"team_id": team_id, "channel": channel, "thread_ts": root, "event_id": event_id}
    try:
        accepted = await start_channel_turn(
            state,
            organization_id=organization_id,
            source=PLATFORM,
            channel_id=f"{team_id}:{channel}:{root}",
            text=text,
            event_key=f"{team_id}:{event_id}",
        )
    except (
        BadRequestError,
        ForbiddenError,
        NotFoundError,
        ConflictError,
        UnprocessableContentError,
    ) as refused:
        # Final for this message (too long, over budget, ...): acknowledged, so Slack does not
        # retry it. Trouble that may pass (429, 503) answers an error instead, and Slack retries.
        log.info(
            "slack.turn_refused",
            organization_id=organization_id,
            status=refused.status_code,
            detail=refused.detail,
            **where,
        )
        return
    reply = SlackReplyInput(
        organization_id=organization_id,
        team_id=team_id,
        channel=channel,
        thread_ts=root,
        turn_id=accepted.turn_id,
        chat_id=accepted.chat_id,
        user_id=user,
    )
    await start_reply_once(
        state,
        SlackReplyWorkflow.run,
        reply,
        workflow_id=slack_reply_workflow_id(accepted.turn_id),
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(search_attributes.ORGANIZATION_ID, organization_id),
                SearchAttributePair(search_attributes.CHAT_ID, accepted.chat_id),
                SearchAttributePair(search_attributes.TURN_ID, accepted.turn_id),
            ]
        ),
    )
    log.info(
        "slack.turn_started",
        organization_id=organization_id,
        chat_id=accepted.chat_id,
        turn_id=accepted.turn_id,
        retry=retry,
        **where,
    )


async def _stop(state: AppState, record: IntegrationRecord, event: dict[str, Any]) -> None:
    """The stop reaction on the thread's first message, or on an answer being written, stops the
    thread's running turn."""
    item = event.get("item")
    if not isinstance(item, dict) or item.get("type") != "message":
        return
    channel, ts = item.get("channel"), item.get("ts")
    if not (isinstance(channel, str) and _CHANNEL.match(channel)):
        return
    if not (isinstance(ts, str) and _TS.match(ts)):
        return
    team_id, organization_id = record.external_id, record.organization_id
    root: str | None = ts
    stopped = await stop_channel_turn(
        state,
        organization_id=organization_id,
        source=PLATFORM,
        channel_id=f"{team_id}:{channel}:{ts}",
    )
    if stopped is None:
        root = await _thread_of_answer(state, organization_id, team_id, channel, ts)
        if root is not None:
            stopped = await stop_channel_turn(
                state,
                organization_id=organization_id,
                source=PLATFORM,
                channel_id=f"{team_id}:{channel}:{root}",
            )
    log.info(
        "slack.stop_reaction",
        organization_id=organization_id,
        team_id=team_id,
        channel=channel,
        thread_ts=root,
        stopped_turn_id=stopped,
    )


async def _thread_of_answer(
    state: AppState, organization_id: str, team_id: str, channel: str, ts: str
) -> str | None:
    """The thread of the running reply (of this organization) that posted message `ts`."""
    if "'" in organization_id:
        return None
    query = (
        f"WorkflowType = '{SLACK_REPLY_WORKFLOW_NAME}' AND ExecutionStatus = 'Running' "
        f"AND {search_attributes.ORGANIZATION_ID.name} = '{organization_id}'"
    )
    async for execution in state.temporal.list_workflows(query, limit=MAX_REPLIES_SEARCHED):
        if execution.status is not WorkflowExecutionStatus.RUNNING:
            continue
        handle = state.temporal.get_workflow_handle_for(SlackReplyWorkflow.run, execution.id)
        try:
            place = await handle.query(SlackReplyWorkflow.get_place)
        except (RPCError, WorkflowQueryFailedError):
            continue  # ended meanwhile, or no worker to answer now
        if place.team_id == team_id and place.channel == channel and ts in place.message_ts:
            return place.thread_ts
    return None
