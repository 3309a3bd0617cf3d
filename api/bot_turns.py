"""Turns the bot integrations start on behalf of a channel, and the chat a channel is bound to.

A platform event (a Slack mention, a Discord `/ask`) becomes a send to the live chat bound to
`{source, id}`, started exactly as the chat endpoints start theirs (api/sending.py). The event's own
id is the send's idempotency key, so a platform's retry of an event attaches to the turn its first
delivery started (if it got that far) instead of starting another; a retry whose first delivery
never started a turn starts it. Bot turns queue behind a running turn of the chat rather than
being refused: a channel's messages are answered in order.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, TypeVar

from temporalio.common import (
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.types import MethodAsyncSingleParam

from api.idempotency import IdempotentRequest
from api.schemas import ExternalChannelIn, ModelRequest, NewTurn
from api.sending import start_send
from api.state import AppState
from api.turns import stop_turn
from core.contracts import ChatMode, IfBusy, TurnAccepted, TurnKind
from storage import chats
from storage.api_keys import Principal
from storage.chats import Visibility

ReplyInput = TypeVar("ReplyInput")


def integration_principal(organization_id: str, platform: str) -> Principal:
    """Who a bot turn acts for: the organization, through its integration (no one user: every
    member of a channel shares its chat)."""
    return Principal(
        organization_id=organization_id,
        api_key_id=f"integration:{platform}",
        user_id=None,
        is_admin=False,
    )


async def start_channel_turn(
    state: AppState,
    *,
    organization_id: str,
    source: str,
    channel_id: str,
    text: str,
    event_key: str,
) -> TurnAccepted:
    """Send `text` to the chat bound to the channel (created on first use); `event_key` is the
    platform's id of the event, unique per delivery of one event and equal across its retries."""
    request = NewTurn(
        kind=TurnKind.SEND,
        user_parts=[{"type": "text", "text": text}],
        model=ModelRequest(),
        system=None,
        provider_options={},
        external_channel=ExternalChannelIn.model_validate({"source": source, "id": channel_id}),
        if_busy=IfBusy.QUEUE,
    )
    key = f"{source}:{event_key}"
    return await start_send(
        state,
        integration_principal(organization_id, source),
        request,
        ChatMode.CHANNEL,
        None,
        idempotent=IdempotentRequest(key=key, fingerprint=hashlib.sha256(key.encode()).hexdigest()),
    )


async def stop_channel_turn(
    state: AppState, *, organization_id: str, source: str, channel_id: str
) -> str | None:
    """Stop the running turn of the chat bound to the channel; the stopped turn's id, or None."""
    async with state.sessions() as session:
        chat = await chats.get_live_chat_by_channel(
            session, Visibility(organization_id, None), source, channel_id
        )
    if chat is None or chat.active_turn_id is None:
        return None
    stopped = await stop_turn(state, organization_id, chat.active_turn_id)
    return chat.active_turn_id if stopped else None


async def start_reply_once(
    state: AppState,
    run: MethodAsyncSingleParam[Any, ReplyInput, Any],
    reply: ReplyInput,
    *,
    workflow_id: str,
    search_attributes: TypedSearchAttributes | None = None,
) -> None:
    """Start the workflow that posts a turn's answer to its channel, once ever: a retried event
    finds the reply its first delivery started, running (USE_EXISTING) or done (REJECT_DUPLICATE
    raises WorkflowAlreadyStartedError), never a second one."""
    with contextlib.suppress(WorkflowAlreadyStartedError):
        await state.temporal.start_workflow(
            run,
            reply,
            id=workflow_id,
            task_queue=state.settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=search_attributes,
        )
