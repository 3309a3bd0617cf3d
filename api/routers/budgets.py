"""Budgets and usage: organization admins set weekly and per-chat spending limits for the organization
and its users; usage reports sum what settled turns used and cost.

Amounts are exact decimal strings in answers (`"12.50"`); requests give them as strings or numbers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import AdminPrincipal, CurrentPrincipal, SessionDep
from api.schemas import RequestBody
from core.errors import ForbiddenError
from storage import budgets
from storage.api_keys import Principal
from storage.budgets import BudgetLimits, GroupBy
from storage.chats import iso
from storage.models import ORGANIZATION_BUDGET
from storage.turn_usage import usd_text

router = APIRouter(tags=["budgets"])
log = structlog.get_logger(__name__)

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
ADMIN_ONLY: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
INVALID: Responses = {422: {"description": "Invalid parameters or body", **PROBLEM}}

# Far above any real budget, and within NUMERIC(20, 10).
MAX_USD = Decimal(1_000_000_000)
USD_DECIMAL_PLACES = 10
MAX_USAGE_SPAN = timedelta(days=366)
USD_TEXT_PATTERN = r"^\d+(\.\d+)?$"

UsdIn = Annotated[
    Decimal,
    Field(
        ge=0,
        le=MAX_USD,
        decimal_places=USD_DECIMAL_PLACES,
        description='USD, as a decimal string (`"12.50"`, exact) or a number; 0 to 1,000,000,000, '
        "at most 10 decimal places.",
    ),
]
UsdOut = Annotated[
    str,
    Field(
        pattern=USD_TEXT_PATTERN, description="USD, exact, as a decimal string.", examples=["12.50"]
    ),
]
UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        pattern=r"^\S(.*\S)?$",
        description="The user's id, as keys bound to the user name it",
    ),
]


class BudgetIn(RequestBody):
    """Replaces the budget: a limit left out or null is no limit."""

    model_config = ConfigDict(extra="forbid")

    weekly_usd: UsdIn | None = Field(
        default=None,
        alias="weeklyUsd",
        description="What may be spent per week (Monday 00:00 UTC to the next); null: no limit.",
    )
    per_chat_usd: UsdIn | None = Field(
        default=None,
        alias="perChatUsd",
        description="What may be spent in any one chat, over its whole life; null: no limit.",
    )


class BudgetOut(BaseModel):
    userId: str | None = Field(  # noqa: N815 - wire names are camelCase
        description="The user the budget is of; null for the organization's own budget."
    )
    weeklyUsd: UsdOut | None  # noqa: N815
    perChatUsd: UsdOut | None  # noqa: N815
    spentThisWeekUsd: UsdOut = Field(  # noqa: N815
        description="What counts against the weekly budget now: settled turns' cost and the "
        "reservations of running turns, since Monday 00:00 UTC."
    )
    resetsAt: str = Field(  # noqa: N815
        description="When the week ends and the weekly budget starts again (Monday 00:00 UTC)."
    )


class UsageGroupOut(BaseModel):
    key: str | None = Field(
        description="The user id (null: keys bound to no user), the model, or the UTC day "
        "(`YYYY-MM-DD`)."
    )
    turns: int
    inputTokens: int = Field(description="Every prompt token, cached ones included.")  # noqa: N815
    cachedInputTokens: int  # noqa: N815
    cacheWriteTokens: int  # noqa: N815
    outputTokens: int = Field(description="Every output token, reasoning included.")  # noqa: N815
    reasoningTokens: int  # noqa: N815
    costUsd: UsdOut  # noqa: N815


class UsageReportOut(BaseModel):
    from_: str = Field(alias="from", description="The start of the range (inclusive).")
    to: str = Field(description="The end of the range (exclusive).")
    groupBy: Literal["user", "model", "day"]  # noqa: N815
    userId: str | None = Field(  # noqa: N815
        description="The user the report is of; null for the whole organization."
    )
    groups: list[UsageGroupOut] = Field(description="Ordered by key; a null key last.")
    totalUsd: UsdOut  # noqa: N815


def _budget_out(
    user_id: str | None, limits: BudgetLimits, spent: Decimal, now: datetime
) -> BudgetOut:
    return BudgetOut(
        userId=user_id,
        weeklyUsd=None if limits.weekly_usd is None else usd_text(limits.weekly_usd),
        perChatUsd=None if limits.per_chat_usd is None else usd_text(limits.per_chat_usd),
        spentThisWeekUsd=usd_text(spent),
        resetsAt=iso(budgets.week_reset(now)),
    )


async def _read_budget(
    session: AsyncSession, organization_id: str, user_id: str | None
) -> BudgetOut:
    now = datetime.now(UTC)
    limits = await budgets.get_budget(session, organization_id, user_id or ORGANIZATION_BUDGET)
    spent = await budgets.spent_this_week(session, organization_id, user_id=user_id, now=now)
    return _budget_out(user_id, limits, spent, now)


async def _write_budget(
    session: AsyncSession, principal: Principal, user_id: str | None, body: BudgetIn
) -> BudgetOut:
    organization_id = principal.organization_id
    await budgets.set_budget(
        session,
        organization_id,
        user_id or ORGANIZATION_BUDGET,
        BudgetLimits(weekly_usd=body.weekly_usd, per_chat_usd=body.per_chat_usd),
    )
    await session.commit()
    log.info(
        "budgets.set",
        organization_id=organization_id,
        user_id=user_id,
        weekly_usd=None if body.weekly_usd is None else str(body.weekly_usd),
        per_chat_usd=None if body.per_chat_usd is None else str(body.per_chat_usd),
        by_key_id=principal.api_key_id,
    )
    return await _read_budget(session, organization_id, user_id)


BUDGET_RESPONSES: Responses = {**UNAUTHORIZED, **ADMIN_ONLY, **INVALID}


@router.put(
    "/v1/budgets/organization",
    summary="Set the organization's budget: weekly and per-chat limits on what its turns cost",
    responses=BUDGET_RESPONSES,
)
async def set_organization_budget(
    body: BudgetIn, principal: AdminPrincipal, session: SessionDep
) -> BudgetOut:
    return await _write_budget(session, principal, None, body)


@router.get(
    "/v1/budgets/organization",
    summary="The organization's budget and what it spent this week; null limits when none is set",
    responses=BUDGET_RESPONSES,
)
async def get_organization_budget(principal: AdminPrincipal, session: SessionDep) -> BudgetOut:
    return await _read_budget(session, principal.organization_id, None)


@router.put(
    "/v1/budgets/users/{user_id}",
    summary="Set one user's budget, within the organization's",
    responses=BUDGET_RESPONSES,
)
async def set_user_budget(
    user_id: UserId,
    body: BudgetIn,
    principal: AdminPrincipal,
    session: SessionDep,
) -> BudgetOut:
    return await _write_budget(session, principal, user_id, body)


@router.get(
    "/v1/budgets/users/{user_id}",
    summary="One user's budget and what the user spent this week; null limits when none is set",
    responses=BUDGET_RESPONSES,
)
async def get_user_budget(
    user_id: UserId,
    principal: AdminPrincipal,
    session: SessionDep,
) -> BudgetOut:
    return await _read_budget(session, principal.organization_id, user_id)


def _usage_scope(principal: Principal, user_id: str | None) -> str | None:
    """Whose usage the caller may read: an admin anyone's, a user's key only the user's own."""
    if principal.is_admin:
        return user_id
    if principal.user_id is None:
        raise ForbiddenError("usage needs an admin key or a key bound to a user")
    if user_id is not None and user_id != principal.user_id:
        raise ForbiddenError("a user's key reads only its own usage")
    return principal.user_id


def _invalid_query(name: str, message: str, value: object) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", name), "msg": message, "input": str(value)}]
    )


def _as_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise _invalid_query(name, "out of range once in UTC", value) from None


@router.get(
    "/v1/usage",
    tags=["usage"],
    summary="What settled turns used and cost, per user, model or UTC day",
    description="An admin key reads the whole organization (or one user, with `userId`); a key "
    "bound to a user reads only that user's usage. Turns count in the range they were accepted in.",
    responses={
        **UNAUTHORIZED,
        403: {
            "description": "A key bound to no user that is not an admin key, or a user's key "
            "asking for another user",
            **PROBLEM,
        },
        **INVALID,
    },
)
async def get_usage(
    principal: CurrentPrincipal,
    session: SessionDep,
    start: Annotated[
        datetime | None,
        Query(
            alias="from",
            description="ISO date or datetime (UTC unless it says otherwise), inclusive; default "
            "this week's Monday 00:00 UTC.",
        ),
    ] = None,
    end: Annotated[
        datetime | None,
        Query(
            alias="to",
            description="ISO date or datetime, exclusive, after `from` and at most 366 days after "
            "it; default now.",
        ),
    ] = None,
    group_by: Annotated[GroupBy, Query(alias="groupBy")] = "day",
    user_id: Annotated[
        str | None, Query(alias="userId", min_length=1, max_length=200, description="One user")
    ] = None,
) -> UsageReportOut:
    scope = _usage_scope(principal, user_id)
    now = datetime.now(UTC)
    start = budgets.week_start(now) if start is None else _as_utc(start, "from")
    end = now if end is None else _as_utc(end, "to")
    if end <= start:
        raise _invalid_query("to", "must be after `from`", iso(end))
    if end - start > MAX_USAGE_SPAN:
        raise _invalid_query("to", "may be at most 366 days after `from`", iso(end))
    groups = await budgets.usage_report(
        session, principal.organization_id, user_id=scope, start=start, end=end, group_by=group_by
    )
    return UsageReportOut.model_validate(
        {
            "from": iso(start),
            "to": iso(end),
            "groupBy": group_by,
            "userId": scope,
            "groups": [
                UsageGroupOut(
                    key=group.key,
                    turns=group.turns,
                    inputTokens=group.tokens.input_tokens,
                    cachedInputTokens=group.tokens.cached_input_tokens,
                    cacheWriteTokens=group.tokens.cache_write_tokens,
                    outputTokens=group.tokens.output_tokens,
                    reasoningTokens=group.tokens.reasoning_tokens,
                    costUsd=usd_text(group.cost_usd),
                )
                for group in groups
            ],
            "totalUsd": usd_text(sum((group.cost_usd for group in groups), Decimal(0))),
        }
    )
