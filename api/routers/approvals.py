"""Tool approvals of a chat: list them (a bot or webhook consumer finds what waits), and decide one."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentPrincipal, StateDep
from api.schemas import ChatId, RequestBody
from api.tool_answers import decide_approval, pending_approvals
from storage.tool_calls import approval_view

router = APIRouter(prefix="/v1/chats", tags=["approvals"])

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
ApprovalId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ApprovalDecisionIn(RequestBody):
    model_config = ConfigDict(extra="forbid")

    approved: bool = Field(description="Run the tool call (true) or deny it (false).")
    reason: str | None = Field(
        default=None, max_length=2_000, description="Shown to the model with a denial."
    )


class ApprovalOut(BaseModel):
    id: str
    chatId: str  # noqa: N815 - wire names follow the AI SDK
    turnId: str  # noqa: N815
    messageId: str  # noqa: N815
    toolCallId: str  # noqa: N815
    toolName: str  # noqa: N815
    input: dict[str, Any] = Field(description="The call's input as stored: what runs if approved.")
    status: Literal["pending", "approved", "denied", "expired"]
    reason: str | None
    createdAt: str  # noqa: N815
    expiresAt: str = Field(description="Undecided by then, the call counts as denied.")  # noqa: N815
    decidedAt: str | None  # noqa: N815


class ApprovalListOut(BaseModel):
    items: list[ApprovalOut]


@router.get(
    "/{chat_id}/approvals",
    summary="The chat's tool approvals: by default those waiting for a decision",
    responses={404: {"description": "No such chat", **PROBLEM}},
)
async def list_approvals(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    state: StateDep,
    status: Annotated[
        Literal["pending", "approved", "denied", "expired", "all"], Query()
    ] = "pending",
) -> ApprovalListOut:
    approvals = await pending_approvals(
        state, principal, chat_id, None if status == "all" else status
    )
    return ApprovalListOut(items=[ApprovalOut(**approval_view(item)) for item in approvals])


@router.post(
    "/{chat_id}/approvals/{approval_id}",
    summary="Approve or deny a tool call the chat's turn waits on",
    responses={
        404: {"description": "No such approval for this caller", **PROBLEM},
        409: {"description": "Already decided, or its turn has ended", **PROBLEM},
    },
)
async def decide(
    chat_id: ChatId,
    approval_id: ApprovalId,
    body: ApprovalDecisionIn,
    principal: CurrentPrincipal,
    state: StateDep,
) -> ApprovalOut:
    approval = await decide_approval(
        state, principal, chat_id, approval_id, approved=body.approved, reason=body.reason
    )
    return ApprovalOut(**approval_view(approval))
