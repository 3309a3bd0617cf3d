"""Tool activities: run one tool call, pause a turn for its client (approvals, client-side tools), resume it.

Each call's outcome is stored in its assistant message before it is published, and stored once: a
call whose outcome is already stored is never run again, whatever crashed in between. Only small
results go back to the workflow; outputs stay in Postgres.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.tool_set import ToolSet
from agent_tools.base import ToolFailed
from core.contracts import (
    ApprovalDecision,
    PauseTurnInput,
    PendingApproval,
    ResumeTurnInput,
    RunToolInput,
    RunToolResult,
)
from core.errors import ErrorType
from core.ui_chunks import start_metadata
from storage import tool_calls
from storage.streams import PAUSE_METADATA_KEY, TurnStreams

T = TypeVar("T")
HEARTBEAT_SECONDS = 1.0
# The attempts a tool call gets for trouble that may pass (the workflow's TOOL_RETRY agrees); the
# last one stores the failure as the call's error, which the model reads.
TOOL_MAX_ATTEMPTS = 3


def approval_id_for(turn_id: str, call_id: str) -> str:
    """The same id for the same call whenever it is asked for, so a retried request repeats itself."""
    return "apr_" + hashlib.sha256(f"{turn_id}:{call_id}".encode()).hexdigest()[:24]


class ToolActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        tool_set: ToolSet,
    ) -> None:
        self._sessions = session_factory
        self._streams = streams
        self._tool_set = tool_set

    @activity.defn
    async def run_tool(self, request: RunToolInput) -> RunToolResult:
        """Run one server-side tool call and store and publish its outcome."""

        async def load(session: AsyncSession) -> tuple[dict[str, Any], Any]:
            part = await tool_calls.get_tool_part(
                session, request.organization_id, request.assistant_message_id, request.call_id
            )
            turn_tools = await tool_calls.load_turn_tools(
                session, request.organization_id, request.turn_id
            )
            return part, turn_tools

        part, turn_tools = await self._in_transaction(load)
        if part.get("state") in tool_calls.SETTLED_STATES:
            # Ran (or failed for good) before this attempt: publish what is stored, run nothing.
            await self._publish_outcome(request, part)
            return RunToolResult(is_error=part.get("state") != "output-available")
        name = tool_calls.tool_name_of(part)

        async def report_status(text: str) -> None:
            await self._streams.append_transient(
                request.organization_id,
                request.turn_id,
                {
                    "type": "data-status",
                    "id": f"status-{request.call_id}",
                    "data": {"toolCallId": request.call_id, "toolName": name, "text": text},
                    "transient": True,
                },
            )

        heartbeat = asyncio.create_task(_heartbeat_forever())
        try:
            outcome = await self._tool_set.run(
                request.organization_id, turn_tools, name, part["input"], report_status
            )
        except ToolFailed as failure:
            if failure.retryable and activity.info().attempt < TOOL_MAX_ATTEMPTS:
                raise ApplicationError(
                    failure.message, type=ErrorType.TOOL_UNAVAILABLE
                ) from failure
            await self.settle(request, {"state": "output-error", "errorText": failure.message})
            return RunToolResult(is_error=True)
        finally:
            heartbeat.cancel()
        stored = await self.settle(request, {"state": "output-available", "output": outcome.output})
        return RunToolResult(
            is_error=stored.get("state") != "output-available",
            sources=[{"url": source.url, "title": source.title} for source in outcome.sources],
        )

    @activity.defn
    async def fail_tool_call(self, request: RunToolInput) -> None:
        """End a call whose runs all failed (timed out, or trouble that did not pass) with an error."""
        await self.settle(
            request,
            {"state": "output-error", "errorText": request.error or "the tool did not answer"},
        )

    async def settle(self, request: RunToolInput, outcome: dict[str, Any]) -> dict[str, Any]:
        async def store(session: AsyncSession) -> dict[str, Any]:
            part, _settled = await tool_calls.settle_tool_call(
                session,
                request.organization_id,
                request.assistant_message_id,
                request.call_id,
                outcome,
            )
            return part

        part = await self._in_transaction(store)
        await self._publish_outcome(request, part)
        return part

    async def _publish_outcome(self, request: RunToolInput, part: dict[str, Any]) -> None:
        await self._streams.append_once(
            request.organization_id,
            request.turn_id,
            f"outcome-{request.call_id}",
            [outcome_chunk(part)],
        )

    @activity.defn
    async def pause_turn(self, request: PauseTurnInput) -> list[PendingApproval]:
        """Ask for the approvals, then end the client's response with a pausing `finish`."""
        pending = [
            PendingApproval(approval_id_for(request.turn_id, call_id), call_id)
            for call_id in request.approval_call_ids
        ]

        async def record(session: AsyncSession) -> None:
            approvals = []
            for approval in pending:
                part = await tool_calls.get_tool_part(
                    session,
                    request.organization_id,
                    request.assistant_message_id,
                    approval.call_id,
                )
                approvals.append(
                    tool_calls.NewApproval(
                        approval.approval_id,
                        approval.call_id,
                        tool_calls.tool_name_of(part),
                        part.get("input") or {},
                    )
                )
            await tool_calls.create_approvals(
                session,
                organization_id=request.organization_id,
                chat_id=request.chat_id,
                turn_id=request.turn_id,
                message_id=request.assistant_message_id,
                user_id=request.user_id,
                approvals=approvals,
                expires_in=timedelta(seconds=request.approval_timeout_seconds),
            )
            await tool_calls.mark_tool_calls(
                session,
                request.organization_id,
                request.assistant_message_id,
                {
                    approval.call_id: {
                        "state": "approval-requested",
                        "approval": {"id": approval.approval_id},
                    }
                    for approval in pending
                },
            )

        await self._in_transaction(record)
        chunks: list[dict[str, Any]] = [
            {
                "type": "tool-approval-request",
                "approvalId": approval.approval_id,
                "toolCallId": approval.call_id,
            }
            for approval in pending
        ]
        reason = "approval" if pending else "client-tools"
        chunks.append(
            {
                "type": "finish",
                "finishReason": "tool-calls",
                "messageMetadata": {PAUSE_METADATA_KEY: reason},
            }
        )
        await self._streams.append_once(
            request.organization_id, request.turn_id, f"pause-{request.step}", chunks
        )
        return pending

    @activity.defn
    async def resume_turn(self, request: ResumeTurnInput) -> None:
        """Record the decisions on the calls, and open the client's next response."""
        no_decision = "the turn was stopped" if request.stopped else "no decision in time"
        decided: dict[str, ApprovalDecision | None] = {
            decision.approval_id: decision for decision in request.decisions
        }
        decided.update(dict.fromkeys(request.expired_approval_ids))

        async def record(session: AsyncSession) -> list[dict[str, Any]]:
            changes: dict[str, dict[str, Any]] = {}
            approvals = {}
            for approval_id, decision in decided.items():
                approval = await tool_calls.get_approval(
                    session, request.organization_id, approval_id
                )
                if approval is None:
                    continue
                approvals[approval_id] = approval
                await tool_calls.record_decision(
                    session,
                    request.organization_id,
                    approval_id,
                    status=_status_of(decision),
                    reason=decision.reason if decision else no_decision,
                    decided_by=decision.decided_by if decision else None,
                )
                approved = decision is not None and decision.approved
                answer: dict[str, Any] = {"id": approval_id, "approved": approved}
                reason = decision.reason if decision else no_decision
                if reason:
                    answer["reason"] = reason
                changes[approval.tool_call_id] = {
                    "state": "approval-responded" if approved else "output-denied",
                    "approval": answer,
                }
            await tool_calls.mark_tool_calls(
                session, request.organization_id, request.assistant_message_id, changes
            )
            parts = []
            for call_id in [*changes, *request.client_call_ids]:
                parts.append(
                    await tool_calls.get_tool_part(
                        session, request.organization_id, request.assistant_message_id, call_id
                    )
                )
            return parts

        parts = await self._in_transaction(record)
        chunks: list[dict[str, Any]] = [
            {
                "type": "start",
                "messageId": request.assistant_message_id,
                "messageMetadata": start_metadata(request.chat_id, request.turn_id, request.model),
            }
        ]
        for part in parts:
            approval = part.get("approval")
            if approval is not None and part.get("state") in (
                "approval-responded",
                "output-denied",
            ):
                response = {
                    "type": "tool-approval-response",
                    "approvalId": approval["id"],
                    "approved": approval["approved"],
                }
                if approval.get("reason"):
                    response["reason"] = approval["reason"]
                chunks.append(response)
            if part.get("state") in tool_calls.SETTLED_STATES:
                chunks.append(outcome_chunk(part))
        await self._streams.append_once(
            request.organization_id, request.turn_id, f"resume-{request.step}", chunks
        )

    async def _in_transaction(self, operation: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with self._sessions.begin() as session:
            return await operation(session)


def outcome_chunk(part: dict[str, Any]) -> dict[str, Any]:
    """The chunk that tells clients a call's stored outcome."""
    call_id = part["toolCallId"]
    state = part.get("state")
    if state == "output-available":
        return {
            "type": "tool-output-available",
            "toolCallId": call_id,
            "output": part.get("output"),
        }
    if state == "output-denied":
        return {"type": "tool-output-denied", "toolCallId": call_id}
    return {
        "type": "tool-output-error",
        "toolCallId": call_id,
        "errorText": part.get("errorText", ""),
    }


def _status_of(decision: ApprovalDecision | None) -> str:
    if decision is None:
        return "expired"
    return "approved" if decision.approved else "denied"


async def _heartbeat_forever() -> None:
    """Heartbeats while the tool runs, so a stop's cancellation reaches it and a dead worker's
    call is run again elsewhere within the heartbeat timeout."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_SECONDS)
