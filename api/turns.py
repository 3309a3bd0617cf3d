"""Starting a turn: builds the workflow input, runs update-with-start and maps rejections to problems."""

from __future__ import annotations

import contextlib

from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.state import AppState
from core.contracts import (
    AcceptTurnRequest,
    StopTurnRequest,
    TurnAccepted,
    TurnInput,
    TurnStatus,
    turn_workflow_id,
)
from core.errors import ConflictError, ErrorType, IdempotencyKeyReusedError, NotFoundError
from workflows import search_attributes
from workflows.chat_turn import ChatTurnWorkflow


async def start_turn(state: AppState, turn: TurnInput) -> TurnAccepted | None:
    """Start the turn's workflow and wait until its chat is claimed and the user message is stored.

    A repeated send (same turn id) attaches to the running workflow; None means that turn has
    already finished, and its workflow id is never reused for a second run.
    """
    attributes: list[SearchAttributePair[str]] = [
        SearchAttributePair(search_attributes.ORGANIZATION_ID, turn.organization_id),
        SearchAttributePair(search_attributes.TURN_ID, turn.turn_id),
        SearchAttributePair(search_attributes.MODEL, turn.model),
        SearchAttributePair(search_attributes.PROVIDER, turn.provider),
        SearchAttributePair(search_attributes.STATUS, TurnStatus.RUNNING.value),
    ]
    if turn.chat_id is not None:
        attributes.append(SearchAttributePair(search_attributes.CHAT_ID, turn.chat_id))
    start = WithStartWorkflowOperation(
        ChatTurnWorkflow.run,
        turn,
        id=turn_workflow_id(turn.turn_id),
        task_queue=state.settings.temporal_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=TypedSearchAttributes(attributes),
    )
    try:
        return await state.temporal.execute_update_with_start_workflow(
            ChatTurnWorkflow.accept_turn,
            AcceptTurnRequest(turn_id=turn.turn_id, request_fingerprint=turn.request_fingerprint),
            start_workflow_operation=start,
        )
    except WorkflowAlreadyStartedError:
        # The start operation keeps the same error for its own handle; read it so asyncio does not
        # report it as never retrieved.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await start.workflow_handle()
        return None
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            if cause.type == ErrorType.CHAT_NOT_FOUND:
                raise NotFoundError("chat not found") from err
            if cause.type == ErrorType.MESSAGE_NOT_FOUND:
                raise NotFoundError("no such message in this chat to regenerate or edit") from err
            if cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED:
                earlier_chat_id, earlier_turn_id = ([*list(cause.details), None, None])[:2]
                raise IdempotencyKeyReusedError(
                    chat_id=earlier_chat_id, turn_id=earlier_turn_id
                ) from err
            if cause.type == ErrorType.CHAT_BUSY:
                active_turn_id, chat_id = ([*list(cause.details), None, None])[:2]
                raise ConflictError(
                    "the chat has an active turn; stop it or wait for it to finish",
                    extra={"turnId": active_turn_id, "chatId": chat_id},
                ) from err
        raise


async def stop_turn(state: AppState, organization_id: str, turn_id: str) -> bool:
    """Tell a running turn to stop: the Redis flag ends generation within a token, the signal makes
    it durable (acted on even if no worker is up now). False when the turn had already ended.

    A turn whose workflow ended without finishing it (terminated from outside) is released instead,
    so its chat is free again; that also answers False.
    """
    await state.streams.request_stop(organization_id, turn_id)
    handle = state.temporal.get_workflow_handle_for(ChatTurnWorkflow.run, turn_workflow_id(turn_id))
    try:
        await handle.signal(ChatTurnWorkflow.stop_turn, StopTurnRequest(reason="user"))
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        # The workflow has closed: normally after storing the turn's outcome, but not if it was
        # terminated.
        async with state.sessions.begin() as session:
            await state.lost_turns.release_if_lost(session, organization_id, turn_id)
        return False
    return True
