"""Answers to a paused turn: decisions on tool approvals, and the outputs of client-side tools.

The turn workflow owns what it waits for; these are checked against the stored call and approval
(never the client's copy of a call's input), the caller (another user's or organization's approval
is a 404) and what is still pending (a second decision changes nothing: 409). A decision arrives
either the AI SDK way (the next POST carries the tool part with `approval-responded`, or the
client tool's output) or as `POST /v1/chats/{chatId}/approvals/{approvalId}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import visibility_of
from api.relay import FROM_START, relay_turn, ui_message_stream_response
from api.schemas import SendMessageRequest
from api.state import AppState
from core.contracts import ApprovalDecision, ClientToolOutputs, turn_workflow_id
from core.errors import BadRequestError, ConflictError, ErrorType, NotFoundError
from core.ui_chunks import stored_message_chunks
from storage import chats, tool_calls
from storage.api_keys import Principal
from storage.models import ToolApproval
from workflows.chat_turn import ChatTurnWorkflow

# The largest client tool output stored (it enters the model's context cut to a budget anyway).
MAX_CLIENT_OUTPUT_CHARS = 1_000_000


async def decide_approval(
    state: AppState,
    principal: Principal,
    chat_id: str,
    approval_id: str,
    *,
    approved: bool,
    reason: str | None,
) -> ToolApproval:
    """Deliver a decision to the turn that waits for it; returns the approval as it now stands."""
    approval = await _own_approval(state, principal, chat_id, approval_id)
    if approval.status != "pending":
        raise ConflictError(
            f"this approval was already decided: {approval.status}",
            extra={"status": approval.status},
        )
    handle = state.temporal.get_workflow_handle_for(
        ChatTurnWorkflow.run, turn_workflow_id(approval.turn_id)
    )
    try:
        await handle.execute_update(
            ChatTurnWorkflow.decide_approval,
            ApprovalDecision(
                approval_id=approval.id,
                approved=approved,
                reason=reason,
                decided_by=principal.user_id or principal.api_key_id,
            ),
        )
    except WorkflowUpdateFailedError as err:
        if (
            isinstance(err.cause, ApplicationError)
            and err.cause.type == ErrorType.APPROVAL_NOT_PENDING
        ):
            raise ConflictError("this approval is no longer waiting for a decision") from err
        raise
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise ConflictError("the turn of this approval has ended") from err
    # The workflow records the decision in Postgres as it resumes; the answer says what was decided.
    approval.status = "approved" if approved else "denied"
    approval.reason = reason
    return approval


async def pending_approvals(
    state: AppState, principal: Principal, chat_id: str, status: str | None
) -> list[ToolApproval]:
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
        if chat is None:
            raise NotFoundError("chat not found")
        approvals = await tool_calls.list_approvals(
            session, principal.organization_id, chat_id, status=status
        )
    return [approval for approval in approvals if _decides(principal, approval)]


async def continue_answer(
    state: AppState, principal: Principal, body: SendMessageRequest, chat_id: str
) -> Response:
    """The AI SDK's next POST after a pause: deliver what it answers, then stream the rest of the
    same assistant message from where the client's last response ended."""
    assert body.messages
    answer = body.messages[-1]
    message_id = body.message_id or answer.id
    organization_id = principal.organization_id
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
        if chat is None:
            raise NotFoundError("chat not found")
        turn = (
            await chats.get_turn(session, organization_id, chat.id, chat.active_turn_id)
            if chat.active_turn_id
            else None
        )
    if turn is None or turn.assistant_message_id != message_id:
        raise ConflictError("no turn of this chat is waiting on that assistant message")
    decisions, outputs = _answers_in(answer.parts or [])
    if not decisions and not outputs:
        raise BadRequestError(
            "the assistant message carries no tool approval response and no tool output"
        )
    tail = await state.streams.last_entry(organization_id, turn.id)
    cursor = tail.entry_id if tail is not None else FROM_START
    for approval_id, (approved, reason) in decisions.items():
        await decide_approval(
            state, principal, chat.id, approval_id, approved=approved, reason=reason
        )
    if outputs:
        await _deliver_outputs(state, principal, turn.id, turn.assistant_message_id, outputs)

    async def stored_answer(resuming: bool) -> list[dict[str, Any]] | None:
        async with state.sessions() as session:
            message = await chats.get_message(session, organization_id, message_id)
        if message is None or message.status == "streaming":
            return None
        return stored_message_chunks(
            message.id, message.parts, message.message_metadata, message.status, resuming=resuming
        )

    return ui_message_stream_response(
        relay_turn(
            state.stream_reader, organization_id, turn.id, cursor, stored_answer=stored_answer
        ),
        chat_id=chat.id,
        ping_seconds=state.settings.stream_ping_seconds,
        extra={"X-Turn-Id": turn.id},
    )


async def _deliver_outputs(
    state: AppState,
    principal: Principal,
    turn_id: str,
    message_id: str,
    outputs: dict[str, dict[str, Any]],
) -> None:
    """Store the outputs of the turn's client-side calls, then tell the turn they are in."""
    organization_id = principal.organization_id
    delivered: list[str] = []
    async with state.sessions.begin() as session:
        turn_tools = await tool_calls.load_turn_tools(session, organization_id, turn_id)
        client_names = {tool.name for tool in turn_tools.client_tools}
        for call_id, outcome in outputs.items():
            try:
                part = await tool_calls.get_tool_part(session, organization_id, message_id, call_id)
            except tool_calls.ToolCallNotFound:
                continue
            if (
                tool_calls.tool_name_of(part) not in client_names
                or part.get("state") != "input-available"
            ):
                continue  # not the client's to answer, or answered already
            await tool_calls.settle_tool_call(
                session, organization_id, message_id, call_id, outcome
            )
            delivered.append(call_id)
    if not delivered:
        raise ConflictError("the turn is not waiting for the outputs of these tool calls")
    handle = state.temporal.get_workflow_handle_for(ChatTurnWorkflow.run, turn_workflow_id(turn_id))
    try:
        await handle.execute_update(
            ChatTurnWorkflow.submit_tool_outputs, ClientToolOutputs(call_ids=delivered)
        )
    except WorkflowUpdateFailedError as err:
        if (
            isinstance(err.cause, ApplicationError)
            and err.cause.type == ErrorType.APPROVAL_NOT_PENDING
        ):
            raise ConflictError("the turn is not waiting for these tool outputs") from err
        raise


def _answers_in(
    parts: list[dict[str, Any]],
) -> tuple[dict[str, tuple[bool, str | None]], dict[str, dict[str, Any]]]:
    """The approval decisions (by approval id) and client tool outcomes (by call id) a message carries."""
    decisions: dict[str, tuple[bool, str | None]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    for part in parts:
        if not isinstance(part, dict) or not tool_calls.is_tool_part(part):
            continue
        call_id = part.get("toolCallId")
        state = part.get("state")
        if not isinstance(call_id, str):
            continue
        approval = part.get("approval")
        if state == "approval-responded" and isinstance(approval, dict):
            approval_id, approved = approval.get("id"), approval.get("approved")
            reason = approval.get("reason")
            if isinstance(approval_id, str) and isinstance(approved, bool):
                decisions[approval_id] = (approved, reason if isinstance(reason, str) else None)
        elif state == "output-available" and "output" in part and not isinstance(approval, dict):
            output = part["output"]
            if len(str(output)) > MAX_CLIENT_OUTPUT_CHARS:
                raise BadRequestError(
                    f"a tool output may be at most {MAX_CLIENT_OUTPUT_CHARS} characters"
                )
            outputs[call_id] = {"state": "output-available", "output": output}
        elif state == "output-error" and isinstance(part.get("errorText"), str):
            outputs[call_id] = {"state": "output-error", "errorText": part["errorText"][:10_000]}
    return decisions, outputs


async def _own_approval(
    state: AppState, principal: Principal, chat_id: str, approval_id: str
) -> ToolApproval:
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
        approval = await tool_calls.get_approval(session, principal.organization_id, approval_id)
    if (
        chat is None
        or approval is None
        or approval.chat_id != chat_id
        or not _decides(principal, approval)
    ):
        raise NotFoundError("no such approval in this chat")
    return approval


def _decides(principal: Principal, approval: ToolApproval) -> bool:
    """Whether the caller may decide: the user the turn was sent for (a key without a user
    decides its organization's turns sent without one)."""
    return approval.user_id == principal.user_id
