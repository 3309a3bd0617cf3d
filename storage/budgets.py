"""Budgets and the usage ledger: spending limits, a turn's reservation and settlement, usage reports.
Must never import api, workflows or activities.

Money is `Decimal` throughout (the columns are NUMERIC(20, 10)); a float never touches an amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import and_, case, func, literal, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ORGANIZATION_BUDGET, Budget, UsageEntry
from storage.turn_usage import TokenCounts

# A turn runs for minutes at most: a reservation this old that was never settled nor released
# belongs to a lost turn, and stops counting against budgets.
RESERVATION_TTL = timedelta(hours=1)

RESERVED = "reserved"
SETTLED = "settled"
RELEASED = "released"

BudgetName = Literal["organization.weekly", "organization.perChat", "user.weekly", "user.perChat"]
GroupBy = Literal["user", "model", "day"]

ZERO = Decimal(0)


@dataclass(frozen=True)
class BudgetLimits:
    """Limits in USD; None is no limit."""

    weekly_usd: Decimal | None = None
    per_chat_usd: Decimal | None = None


@dataclass(frozen=True)
class UsageTotals:
    """What settled turns used and cost."""

    turns: int
    tokens: TokenCounts
    cost_usd: Decimal


@dataclass(frozen=True)
class UsageGroup(UsageTotals):
    # The user id (None: turns of keys bound to no user), the model, or the UTC day `YYYY-MM-DD`.
    key: str | None


class BudgetExhausted(Exception):
    """A reservation refused: `budget` has `spent_usd` of its `limit_usd` already."""

    def __init__(
        self,
        *,
        budget: BudgetName,
        limit_usd: Decimal,
        spent_usd: Decimal,
        resets_at: datetime | None,
    ) -> None:
        super().__init__(f"budget {budget} exhausted: {spent_usd} of {limit_usd} USD spent")
        self.budget: BudgetName = budget
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.remaining_usd = max(limit_usd - spent_usd, ZERO)
        # When a weekly budget starts again (the next Monday 00:00 UTC); None for a chat's budget.
        self.resets_at = resets_at


def week_start(now: datetime) -> datetime:
    """Monday 00:00 UTC of the week `now` falls in: weekly budgets count from here."""
    midnight = _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=midnight.weekday())


def week_reset(now: datetime) -> datetime:
    """The next Monday 00:00 UTC after `now`, when weekly budgets start again."""
    return week_start(now) + timedelta(days=7)


# --- budgets ---------------------------------------------------------------------------------------


async def get_budget(session: AsyncSession, organization_id: str, user_id: str) -> BudgetLimits:
    """The limits of the organization (`user_id` ORGANIZATION_BUDGET) or of one of its users; no
    row is no limit."""
    row = (
        await session.execute(
            select(Budget.weekly_usd, Budget.per_chat_usd).where(
                Budget.organization_id == organization_id, Budget.user_id == user_id
            )
        )
    ).one_or_none()
    return BudgetLimits() if row is None else BudgetLimits(row.weekly_usd, row.per_chat_usd)


async def set_budget(
    session: AsyncSession, organization_id: str, user_id: str, limits: BudgetLimits
) -> BudgetLimits:
    """Replace the limits of the organization or a user; returns them as stored."""
    for amount in (limits.weekly_usd, limits.per_chat_usd):
        if amount is not None and not (amount.is_finite() and amount >= 0):
            raise ValueError(f"a budget is a finite amount >= 0, not {amount}")
    values = {"weekly_usd": limits.weekly_usd, "per_chat_usd": limits.per_chat_usd}
    row = (
        await session.execute(
            insert(Budget)
            .values(organization_id=organization_id, user_id=user_id, **values)
            .on_conflict_do_update(
                index_elements=[Budget.organization_id, Budget.user_id],
                set_={**values, "updated_at": func.now()},
            )
            .returning(Budget.weekly_usd, Budget.per_chat_usd)
        )
    ).one()
    return BudgetLimits(row.weekly_usd, row.per_chat_usd)


# --- the ledger ------------------------------------------------------------------------------------


def _counted(now: datetime) -> Any:
    """What a ledger row counts against budgets at `now`: a settled turn its cost, a live
    reservation its estimate, a released or lost reservation nothing."""
    return case(
        (UsageEntry.state == SETTLED, func.coalesce(UsageEntry.cost_usd, ZERO)),
        (
            and_(UsageEntry.state == RESERVED, UsageEntry.created_at > now - RESERVATION_TTL),
            UsageEntry.reserved_usd,
        ),
        else_=literal(ZERO),
    )


def _spent(counted: Any, *conditions: Any) -> Any:
    total = func.sum(counted)
    return func.coalesce(total.filter(and_(*conditions)) if conditions else total, ZERO)


async def reserve(
    session: AsyncSession,
    *,
    organization_id: str,
    user_id: str | None,
    chat_id: str | None,
    turn_id: str,
    model: str,
    estimate_usd: Decimal,
    now: datetime,
) -> bool:
    """Reserve `estimate_usd` for a turn, in the caller's transaction (commit it promptly: while a
    budget applies, other reservations of the organization wait for it).

    Raises BudgetExhausted when what is already spent (settled costs and live reservations) has
    reached a limit, checking the organization's weekly, the organization's per-chat, the user's
    weekly and the user's per-chat budget in that order. Reservations of one organization are
    serialised, so concurrent sends near a limit overrun it by at most one turn's estimate. A turn
    that has a ledger row already (a repeated send) is not reserved again, and never refused:
    returns whether this call made the reservation.
    Needs READ COMMITTED (the default): each statement must see what earlier lock holders committed.
    """
    if not (estimate_usd.is_finite() and estimate_usd >= 0):
        raise ValueError(f"an estimate is a finite amount >= 0, not {estimate_usd}")
    now = _utc(now)
    owners = [ORGANIZATION_BUDGET] if user_id is None else [ORGANIZATION_BUDGET, user_id]
    rows = (
        await session.execute(
            select(Budget.user_id, Budget.weekly_usd, Budget.per_chat_usd).where(
                Budget.organization_id == organization_id, Budget.user_id.in_(owners)
            )
        )
    ).all()
    limits = {row.user_id: BudgetLimits(row.weekly_usd, row.per_chat_usd) for row in rows}
    organization = limits.get(ORGANIZATION_BUDGET, BudgetLimits())
    user = limits.get(user_id, BudgetLimits()) if user_id is not None else BudgetLimits()
    checks: list[tuple[BudgetName, Decimal | None]] = [
        ("organization.weekly", organization.weekly_usd),
        ("organization.perChat", organization.per_chat_usd if chat_id is not None else None),
        ("user.weekly", user.weekly_usd),
        ("user.perChat", user.per_chat_usd if chat_id is not None else None),
    ]
    if any(limit is not None for _, limit in checks):
        # Without a limit nothing can overrun, and sends of the organization need not queue here.
        await session.execute(
            select(
                func.pg_advisory_xact_lock(func.hashtextextended(_lock_name(organization_id), 0))
            )
        )
        if await _has_entry(session, organization_id, turn_id):
            return False
        spent = await _spent_by_budget(
            session, organization_id, user_id=user_id, chat_id=chat_id, now=now
        )
        for budget, limit in checks:
            if limit is not None and spent[budget] >= limit:
                raise BudgetExhausted(
                    budget=budget,
                    limit_usd=limit,
                    spent_usd=spent[budget],
                    resets_at=week_reset(now) if budget.endswith(".weekly") else None,
                )
    inserted = await session.execute(
        insert(UsageEntry)
        .values(
            organization_id=organization_id,
            turn_id=turn_id,
            user_id=user_id,
            chat_id=chat_id,
            model=model,
            state=RESERVED,
            reserved_usd=estimate_usd,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[UsageEntry.organization_id, UsageEntry.turn_id])
        .returning(UsageEntry.turn_id)
    )
    return inserted.first() is not None


def _lock_name(organization_id: str) -> str:
    return f"durachat.budget:{organization_id}"


async def _has_entry(session: AsyncSession, organization_id: str, turn_id: str) -> bool:
    found = await session.execute(
        select(literal(1)).where(
            UsageEntry.organization_id == organization_id, UsageEntry.turn_id == turn_id
        )
    )
    return found.first() is not None


async def _spent_by_budget(
    session: AsyncSession,
    organization_id: str,
    *,
    user_id: str | None,
    chat_id: str | None,
    now: datetime,
) -> dict[BudgetName, Decimal]:
    counted = _counted(now)
    this_week = UsageEntry.created_at >= week_start(now)
    of_user = UsageEntry.user_id == user_id if user_id is not None else literal(False)
    of_chat = UsageEntry.chat_id == chat_id if chat_id is not None else literal(False)
    row = (
        await session.execute(
            select(
                _spent(counted, this_week).label("organization_week"),
                _spent(counted, this_week, of_user).label("user_week"),
                _spent(counted, of_chat).label("chat"),
            ).where(UsageEntry.organization_id == organization_id, or_(this_week, of_chat))
        )
    ).one()
    return {
        "organization.weekly": row.organization_week,
        "organization.perChat": row.chat,
        "user.weekly": row.user_week,
        "user.perChat": row.chat,
    }


async def spent_this_week(
    session: AsyncSession, organization_id: str, *, user_id: str | None, now: datetime
) -> Decimal:
    """What counts against the weekly budget of the organization (`user_id` None) or of a user at
    `now`, exactly as `reserve` counts it."""
    query = select(_spent(_counted(_utc(now)))).where(
        UsageEntry.organization_id == organization_id,
        UsageEntry.created_at >= week_start(now),
    )
    if user_id is not None:
        query = query.where(UsageEntry.user_id == user_id)
    spent: Decimal = (await session.execute(query)).scalar_one()
    return spent


async def settle(
    session: AsyncSession,
    *,
    organization_id: str,
    turn_id: str,
    user_id: str | None,
    chat_id: str | None,
    model: str,
    tokens: TokenCounts,
    cost_usd: Decimal,
) -> None:
    """Record what a turn used and cost, replacing its reservation. Idempotent: the values are
    absolute and `settled_at` is kept from the first settlement, so a retry writes the same row.
    A turn without a reservation gets a settled row (`reserved_usd` 0)."""
    if not (cost_usd.is_finite() and cost_usd >= 0):
        raise ValueError(f"a cost is a finite amount >= 0, not {cost_usd}")
    values = {
        "user_id": user_id,
        "chat_id": chat_id,
        "model": model,
        "state": SETTLED,
        "cost_usd": cost_usd,
        "input_tokens": tokens.input_tokens,
        "cached_input_tokens": tokens.cached_input_tokens,
        "cache_write_tokens": tokens.cache_write_tokens,
        "output_tokens": tokens.output_tokens,
        "reasoning_tokens": tokens.reasoning_tokens,
    }
    await session.execute(
        insert(UsageEntry)
        .values(
            organization_id=organization_id,
            turn_id=turn_id,
            reserved_usd=ZERO,
            settled_at=func.now(),
            **values,
        )
        .on_conflict_do_update(
            index_elements=[UsageEntry.organization_id, UsageEntry.turn_id],
            set_={**values, "settled_at": func.coalesce(UsageEntry.settled_at, func.now())},
        )
    )


async def release(session: AsyncSession, organization_id: str, turn_id: str) -> bool:
    """Give back the reservation of a turn that never ran; False when the turn holds none (it was
    settled, released already, or never reserved)."""
    result = await session.execute(
        update(UsageEntry)
        .where(
            UsageEntry.organization_id == organization_id,
            UsageEntry.turn_id == turn_id,
            UsageEntry.state == RESERVED,
        )
        .values(state=RELEASED)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- reports ---------------------------------------------------------------------------------------


def _totals_columns() -> list[Any]:
    return [
        func.count().label("turns"),
        func.coalesce(func.sum(UsageEntry.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(UsageEntry.cached_input_tokens), 0).label("cached_input_tokens"),
        func.coalesce(func.sum(UsageEntry.cache_write_tokens), 0).label("cache_write_tokens"),
        func.coalesce(func.sum(UsageEntry.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(UsageEntry.reasoning_tokens), 0).label("reasoning_tokens"),
        func.coalesce(func.sum(UsageEntry.cost_usd), ZERO).label("cost_usd"),
    ]


def _tokens_of(row: Any) -> TokenCounts:
    return TokenCounts(
        input_tokens=int(row.input_tokens),
        cached_input_tokens=int(row.cached_input_tokens),
        cache_write_tokens=int(row.cache_write_tokens),
        output_tokens=int(row.output_tokens),
        reasoning_tokens=int(row.reasoning_tokens),
    )


async def usage_report(
    session: AsyncSession,
    organization_id: str,
    *,
    user_id: str | None,
    start: datetime,
    end: datetime,
    group_by: GroupBy,
) -> list[UsageGroup]:
    """Settled turns accepted in [start, end), of the organization or of one user, summed per user,
    model or UTC day and ordered by that key (turns of keys bound to no user last)."""
    key: Any
    if group_by == "user":
        key = UsageEntry.user_id
    elif group_by == "model":
        key = UsageEntry.model
    else:
        # Literals, not parameters: GROUP BY must repeat the very expression the SELECT list has.
        key = func.to_char(
            func.timezone(literal_column("'UTC'"), UsageEntry.created_at),
            literal_column("'YYYY-MM-DD'"),
        )
    key = key.label("key")
    query = (
        select(key, *_totals_columns())
        .where(
            UsageEntry.organization_id == organization_id,
            UsageEntry.state == SETTLED,
            UsageEntry.created_at >= _utc(start),
            UsageEntry.created_at < _utc(end),
        )
        .group_by(key)
        # Byte order, whatever the database's collation: the order does not depend on the server.
        .order_by(key.collate("C").asc().nulls_last())
    )
    if user_id is not None:
        query = query.where(UsageEntry.user_id == user_id)
    return [
        UsageGroup(
            key=row.key, turns=row.turns, tokens=_tokens_of(row), cost_usd=Decimal(row.cost_usd)
        )
        for row in await session.execute(query)
    ]


async def chat_usage(session: AsyncSession, organization_id: str, chat_id: str) -> UsageTotals:
    """What a chat's settled turns used and cost, over all time."""
    row = (
        await session.execute(
            select(*_totals_columns()).where(
                UsageEntry.organization_id == organization_id,
                UsageEntry.chat_id == chat_id,
                UsageEntry.state == SETTLED,
            )
        )
    ).one()
    return UsageTotals(turns=row.turns, tokens=_tokens_of(row), cost_usd=Decimal(row.cost_usd))


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("a naive datetime: ledger times are timezone-aware")
    return moment.astimezone(UTC)
