"""Tool calls in stored messages, the turn's tool set, and approvals. Must never import api, workflows or activities.

A tool call lives in its assistant message as a part shaped the way the `ai` client assembles it
(`tool-<name>` or `dynamic-tool`, with `toolCallId`, `state`, `input`, then `output` or
`errorText`). A call's outcome is written once: the first outcome stored wins, so a tool activity
that runs again after a crash finds the stored outcome and never runs the tool twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from core.contracts import ClientTool, TurnTools
from storage.models import Chat, Message, ToolApproval, Turn

# States after which a call's outcome is settled.
SETTLED_STATES = frozenset({"output-available", "output-error", "output-denied"})


class ToolCallNotFound(Exception):
    """The message holds no tool call with that id."""


def is_tool_part(part: dict[str, Any]) -> bool:
    kind = str(part.get("type", ""))
    return kind == "dynamic-tool" or kind.startswith("tool-")


def tool_name_of(part: dict[str, Any]) -> str:
    kind = str(part["type"])
    return str(part.get("toolName", "")) if kind == "dynamic-tool" else kind.removeprefix("tool-")


def find_tool_part(parts: list[dict[str, Any]], call_id: str) -> dict[str, Any] | None:
    for part in parts:
        if is_tool_part(part) and part.get("toolCallId") == call_id:
            return part
    return None


async def load_turn_tools(session: AsyncSession, organization_id: str, turn_id: str) -> TurnTools:
    """The turn's tools, with its chat's settings filled in where the send did not say."""
    row = (
        await session.execute(
            select(Turn.tools, Chat.web, Chat.toolkit_ids)
            .join(Chat, (Chat.organization_id == Turn.organization_id) & (Chat.id == Turn.chat_id))
            .where(Turn.organization_id == organization_id, Turn.id == turn_id)
        )
    ).first()
    if row is None:
        return TurnTools(web=False)
    stored, chat_web, chat_toolkits = row
    stored = stored or {}
    web = stored.get("web")
    # A send naming no toolkits takes its chat's.
    toolkit_ids = list(stored.get("toolkit_ids") or chat_toolkits or [])
    return TurnTools(
        web=bool(chat_web) if web is None else bool(web),
        client_tools=[ClientTool(**tool) for tool in stored.get("client_tools", [])],
        toolkit_ids=toolkit_ids,
        functions=stored.get("functions"),
    )


async def _locked_parts(
    session: AsyncSession, organization_id: str, message_id: str
) -> tuple[Message, list[dict[str, Any]]]:
    message = (
        await session.execute(
            select(Message)
            .where(Message.organization_id == organization_id, Message.id == message_id)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if message is None:
        raise ToolCallNotFound(message_id)
    return message, [dict(part) for part in message.parts]


async def get_tool_part(
    session: AsyncSession, organization_id: str, message_id: str, call_id: str
) -> dict[str, Any]:
    message = (
        await session.execute(
            select(Message.parts).where(
                Message.organization_id == organization_id, Message.id == message_id
            )
        )
    ).scalar_one_or_none()
    part = find_tool_part(message or [], call_id)
    if part is None:
        raise ToolCallNotFound(call_id)
    return part


async def settle_tool_call(
    session: AsyncSession,
    organization_id: str,
    message_id: str,
    call_id: str,
    outcome: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    """Write a call's outcome (`state` and `output` or `errorText`) unless one is stored already.

    Returns the call's part as stored and whether this write settled it. Parallel calls of a step
    settle one at a time (the message row is locked), so none overwrites another's outcome.
    """
    message, parts = await _locked_parts(session, organization_id, message_id)
    part = find_tool_part(parts, call_id)
    if part is None:
        raise ToolCallNotFound(call_id)
    if part.get("state") in SETTLED_STATES:
        return part, False
    part.update(outcome)
    message.parts = parts
    message.updated_at = func.now()
    return part, True


async def mark_tool_calls(
    session: AsyncSession,
    organization_id: str,
    message_id: str,
    changes: dict[str, dict[str, Any]],
) -> None:
    """Merge `changes[call_id]` into each named call's part (approval states), unless settled."""
    message, parts = await _locked_parts(session, organization_id, message_id)
    for call_id, change in changes.items():
        part = find_tool_part(parts, call_id)
        if part is not None and part.get("state") not in SETTLED_STATES:
            part.update(change)
    message.parts = parts
    message.updated_at = func.now()


# Approvals


@dataclass(frozen=True)
class NewApproval:
    id: str
    call_id: str
    tool_name: str
    input: dict[str, Any]


async def create_approvals(
    session: AsyncSession,
    *,
    organization_id: str,
    chat_id: str,
    turn_id: str,
    message_id: str,
    user_id: str | None,
    approvals: list[NewApproval],
    expires_in: timedelta,
) -> None:
    """Record pending approvals; recording them again (a retried activity) changes nothing."""
    if not approvals:
        return
    expires_at = (await session.execute(select(func.now()))).scalar_one() + expires_in
    await session.execute(
        insert(ToolApproval)
        .values(
            [
                {
                    "organization_id": organization_id,
                    "id": approval.id,
                    "chat_id": chat_id,
                    "turn_id": turn_id,
                    "message_id": message_id,
                    "tool_call_id": approval.call_id,
                    "tool_name": approval.tool_name,
                    "input": approval.input,
                    "user_id": user_id,
                    "status": "pending",
                    "expires_at": expires_at,
                }
                for approval in approvals
            ]
        )
        .on_conflict_do_nothing()
    )


async def get_approval(
    session: AsyncSession, organization_id: str, approval_id: str
) -> ToolApproval | None:
    return (
        await session.execute(
            select(ToolApproval).where(
                ToolApproval.organization_id == organization_id, ToolApproval.id == approval_id
            )
        )
    ).scalar_one_or_none()


async def record_decision(
    session: AsyncSession,
    organization_id: str,
    approval_id: str,
    *,
    status: str,
    reason: str | None,
    decided_by: str | None,
) -> None:
    """Store a decision on a pending approval; a decided one keeps its first decision."""
    await session.execute(
        update(ToolApproval)
        .where(
            ToolApproval.organization_id == organization_id,
            ToolApproval.id == approval_id,
            ToolApproval.status == "pending",
        )
        .values(status=status, reason=reason, decided_by=decided_by, decided_at=func.now())
    )


async def list_approvals(
    session: AsyncSession, organization_id: str, chat_id: str, *, status: str | None = "pending"
) -> list[ToolApproval]:
    query = select(ToolApproval).where(
        ToolApproval.organization_id == organization_id, ToolApproval.chat_id == chat_id
    )
    if status is not None:
        query = query.where(ToolApproval.status == status)
    return list((await session.execute(query.order_by(ToolApproval.created_at))).scalars())


def approval_view(approval: ToolApproval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "chatId": approval.chat_id,
        "turnId": approval.turn_id,
        "messageId": approval.message_id,
        "toolCallId": approval.tool_call_id,
        "toolName": approval.tool_name,
        "input": approval.input,
        "status": approval.status,
        "reason": approval.reason,
        "createdAt": _iso(approval.created_at),
        "expiresAt": _iso(approval.expires_at),
        "decidedAt": _iso(approval.decided_at) if approval.decided_at else None,
    }


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
