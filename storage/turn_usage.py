"""What each generation attempt of a turn used and cost, and the turn's totals. Must never import api or workflows.

Every attempt the provider billed is recorded on the turn (`turn.attempt_log`) by the generation
activity as the attempt ends (completed, stopped or failed), keyed by model and attempt, so a
repeated write replaces rather than adds. The turn's totals, its cost and the usage ledger's
settlement are sums over this log, computed once when the turn ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import cast, column, func, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from core.ui_chunks import usage_metadata
from storage.models import Turn

AttemptOutcome = Literal["completed", "stopped", "failed"]
# One entry of the attempt log, as `jsonb_array_elements` yields it.
_ELEMENT = column("value", JSONB)


@dataclass(frozen=True)
class TokenCounts:
    input_tokens: int = 0  # every prompt token, cached ones included
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0  # reasoning tokens included
    reasoning_tokens: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    def as_metadata(self, *, estimated: bool) -> dict[str, Any]:
        """The `usage` of message metadata (AI SDK LanguageModelUsage names)."""
        usage = usage_metadata(self.input_tokens, self.output_tokens, estimated=estimated)
        if self.cached_input_tokens:
            usage["cachedInputTokens"] = self.cached_input_tokens
        if self.cache_write_tokens:
            usage["cacheWriteTokens"] = self.cache_write_tokens
        if self.reasoning_tokens:
            usage["reasoningTokens"] = self.reasoning_tokens
        return usage


@dataclass(frozen=True)
class AttemptUsage:
    model: str
    attempt: int  # the activity attempt of this model, 1-based
    outcome: AttemptOutcome
    tokens: TokenCounts
    cost_usd: Decimal
    estimated: bool  # the provider reported no usage; the counts are estimated from the text
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "model": self.model,
            "attempt": self.attempt,
            "outcome": self.outcome,
            **self.tokens.as_metadata(estimated=self.estimated),
            "costUsd": usd_text(self.cost_usd),
        }
        if self.error:
            entry["error"] = self.error
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> AttemptUsage:
        return cls(
            model=entry["model"],
            attempt=entry["attempt"],
            outcome=entry["outcome"],
            tokens=TokenCounts(
                entry.get("inputTokens", 0),
                entry.get("cachedInputTokens", 0),
                entry.get("cacheWriteTokens", 0),
                entry.get("outputTokens", 0),
                entry.get("reasoningTokens", 0),
            ),
            cost_usd=Decimal(entry.get("costUsd", "0")),
            estimated=bool(entry.get("estimated", False)),
            error=entry.get("error"),
        )


@dataclass(frozen=True)
class TurnTotals:
    attempts: list[AttemptUsage]
    tokens: TokenCounts
    cost_usd: Decimal
    estimated: bool  # some attempt's counts are estimates


def usd_text(amount: Decimal) -> str:
    """An amount as the api shows it: exact, no exponent, at least two decimal places (`12.50`,
    `0.000125`)."""
    if amount == 0:
        return "0.00"
    whole, _, fraction = format(amount.normalize(), "f").partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


async def record_attempt(
    session: AsyncSession, organization_id: str, turn_id: str, usage: AttemptUsage
) -> None:
    """Add (or replace) one attempt's entry in the turn's attempt log, in one statement: the row
    lock of the UPDATE orders concurrent writers, and an entry of the same model and attempt is
    dropped before the new one is appended."""
    entry = usage.as_json()
    others = (
        select(func.coalesce(func.jsonb_agg(_ELEMENT), cast([], JSONB)))
        .select_from(
            func.jsonb_array_elements(func.coalesce(Turn.attempt_log, cast([], JSONB))).alias(
                "element"
            )
        )
        .where(
            or_(
                _ELEMENT["model"].astext != usage.model,
                _ELEMENT["attempt"].astext != str(usage.attempt),
            )
        )
        .scalar_subquery()
    )
    await session.execute(
        update(Turn)
        .where(Turn.id == turn_id, Turn.organization_id == organization_id)
        .values(attempt_log=others.op("||")(cast([entry], JSONB)))
    )


async def turn_totals(session: AsyncSession, organization_id: str, turn_id: str) -> TurnTotals:
    """The sums over every recorded attempt of the turn (none recorded: zeros)."""
    log = await session.scalar(
        select(Turn.attempt_log).where(Turn.id == turn_id, Turn.organization_id == organization_id)
    )
    attempts = [AttemptUsage.from_json(entry) for entry in log or []]
    tokens = TokenCounts()
    for attempt in attempts:
        tokens += attempt.tokens
    return TurnTotals(
        attempts=attempts,
        tokens=tokens,
        cost_usd=sum((attempt.cost_usd for attempt in attempts), Decimal(0)),
        estimated=any(attempt.estimated for attempt in attempts),
    )
