"""Starting a turn: builds the workflow input, runs update-with-start and maps rejections to problems."""

from __future__ import annotations

from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from api.state import AppState
from core.contracts import AcceptTurnRequest, TurnAccepted, TurnInput, TurnStatus, turn_workflow_id
from core.errors import ConflictError, ErrorType, NotFoundError
from workflows import search_attributes
from workflows.chat_turn import ChatTurnWorkflow


async def start_turn(state: AppState, turn: TurnInput) -> TurnAccepted:
    """Start the turn's workflow and wait until its chat is claimed and the user message is stored."""
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
        search_attributes=TypedSearchAttributes(attributes),
    )
    try:
        return await state.temporal.execute_update_with_start_workflow(
            ChatTurnWorkflow.accept_turn,
            AcceptTurnRequest(turn_id=turn.turn_id),
            start_workflow_operation=start,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            if cause.type == ErrorType.CHAT_NOT_FOUND:
                raise NotFoundError("chat not found") from err
            if cause.type == ErrorType.CHAT_BUSY:
                active_turn_id, chat_id = ([*list(cause.details), None, None])[:2]
                raise ConflictError(
                    "the chat has an active turn; stop it or wait for it to finish",
                    extra={"turnId": active_turn_id, "chatId": chat_id},
                ) from err
        raise
