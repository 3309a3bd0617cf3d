"""Budgets and the usage ledger against the real Postgres and api: admin-only budgets behind the
organization wall, exact decimal amounts, reservations refused once a budget is spent (concurrent
ones overrun it by at most one reservation), stale reservations, settlement, release, and usage
reports for admins and for a user's own key."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.problems import budget_exceeded_error
from core.settings import Settings
from storage import api_keys, budgets
from storage.budgets import BudgetExhausted, BudgetLimits, TokenCounts
from storage.chats import iso
from storage.db import create_engine, create_session_factory
from storage.models import ORGANIZATION_BUDGET, UsageEntry
from tests.conftest import Tenant, make_tenant
from tests.support.chat_api import assert_problem

Sessions = async_sessionmaker[AsyncSession]

# A Wednesday: its week runs from Monday 2026-03-09 00:00 UTC to Monday 2026-03-16.
WEDNESDAY = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)
NEXT_MONDAY = datetime(2026, 3, 16, tzinfo=UTC)
ORGANIZATION_BUDGET_URL = "/v1/budgets/organization"


def new_turn_id() -> str:
    return f"turn-{uuid.uuid4().hex[:16]}"


def usd(amount: str) -> Decimal:
    return Decimal(amount)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def set_limits(
    sessions: Sessions,
    organization_id: str,
    user_id: str = ORGANIZATION_BUDGET,
    *,
    weekly: str | None = None,
    per_chat: str | None = None,
) -> None:
    limits = BudgetLimits(
        weekly_usd=None if weekly is None else usd(weekly),
        per_chat_usd=None if per_chat is None else usd(per_chat),
    )
    async with sessions.begin() as session:
        await budgets.set_budget(session, organization_id, user_id, limits)


async def reserve(
    sessions: Sessions,
    organization_id: str,
    estimate: str,
    *,
    user_id: str | None = None,
    chat_id: str | None = None,
    now: datetime = WEDNESDAY,
    turn_id: str | None = None,
) -> str:
    turn_id = turn_id or new_turn_id()
    async with sessions.begin() as session:
        await budgets.reserve(
            session,
            organization_id=organization_id,
            user_id=user_id,
            chat_id=chat_id,
            turn_id=turn_id,
            model="mock/echo",
            estimate_usd=usd(estimate),
            now=now,
        )
    return turn_id


async def settle(
    sessions: Sessions,
    organization_id: str,
    cost: str,
    *,
    user_id: str | None = None,
    chat_id: str | None = None,
    model: str = "mock/echo",
    tokens: TokenCounts | None = None,
    turn_id: str | None = None,
    accepted_at: datetime | None = None,
) -> str:
    """A settled turn; `accepted_at` reserves it first at that time (settlement keeps the time a
    turn was accepted), otherwise it is accepted now."""
    turn_id = turn_id or new_turn_id()
    async with sessions.begin() as session:
        if accepted_at is not None:
            await budgets.reserve(
                session,
                organization_id=organization_id,
                user_id=user_id,
                chat_id=chat_id,
                turn_id=turn_id,
                model=model,
                estimate_usd=Decimal(0),
                now=accepted_at,
            )
        await budgets.settle(
            session,
            organization_id=organization_id,
            turn_id=turn_id,
            user_id=user_id,
            chat_id=chat_id,
            model=model,
            tokens=tokens or TokenCounts(),
            cost_usd=usd(cost),
        )
    return turn_id


async def ledger_row(sessions: Sessions, organization_id: str, turn_id: str) -> UsageEntry:
    async with sessions() as session:
        row: UsageEntry = (
            await session.execute(
                select(UsageEntry).where(
                    UsageEntry.organization_id == organization_id, UsageEntry.turn_id == turn_id
                )
            )
        ).scalar_one()
        return row


async def spent_this_week(
    sessions: Sessions, organization_id: str, *, user_id: str | None = None, now: datetime
) -> Decimal:
    async with sessions() as session:
        return await budgets.spent_this_week(session, organization_id, user_id=user_id, now=now)


async def user_key(sessions: Sessions, organization_id: str, user_id: str | None) -> str:
    """A non-admin key of the organization, bound to `user_id` (or to no user)."""
    async with sessions.begin() as session:
        created = await api_keys.create_key(session, organization_id, user_id=user_id)
    return created.secret


# --- budgets through the api -----------------------------------------------------------------------


async def test_admin_sets_and_reads_the_organization_budget_as_exact_decimal_strings(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    resets_at = iso(budgets.week_reset(datetime.now(UTC)))

    response = await client.put(
        ORGANIZATION_BUDGET_URL,
        json={"weeklyUsd": "12.50", "perChatUsd": 1},
        headers=tenant.headers,
    )

    assert response.status_code == 200, response.text
    expected = {
        "userId": None,
        "weeklyUsd": "12.50",
        "perChatUsd": "1.00",
        "spentThisWeekUsd": "0.00",
        "resetsAt": resets_at,
    }
    assert response.json() == expected
    read = await client.get(ORGANIZATION_BUDGET_URL, headers=tenant.headers)
    assert (read.status_code, read.json()) == (200, expected)
    async with sessions() as session:
        stored = await budgets.get_budget(session, tenant.organization_id, ORGANIZATION_BUDGET)
    assert stored == BudgetLimits(weekly_usd=usd("12.5"), per_chat_usd=usd("1"))

    # A PUT replaces the budget: what it leaves out is no limit. Ten decimal places stay exact.
    response = await client.put(
        ORGANIZATION_BUDGET_URL, json={"weeklyUsd": 0.1}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    assert (response.json()["weeklyUsd"], response.json()["perChatUsd"]) == ("0.10", None)
    response = await client.put(
        ORGANIZATION_BUDGET_URL,
        json={"weeklyUsd": "1000000000", "perChatUsd": "0.0000000001"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    assert (response.json()["weeklyUsd"], response.json()["perChatUsd"]) == (
        "1000000000.00",
        "0.0000000001",
    )
    response = await client.put(ORGANIZATION_BUDGET_URL, json={}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert (response.json()["weeklyUsd"], response.json()["perChatUsd"]) == (None, None)


async def test_unset_budgets_read_as_nulls_with_what_was_spent_this_week(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    organization_id = tenant.organization_id
    await settle(sessions, organization_id, "0.25", user_id="ada", chat_id="c1")
    await settle(sessions, organization_id, "0.5", chat_id="c2")
    # A running turn's reservation counts too; a turn of last week does not.
    await reserve(sessions, organization_id, "0.1", user_id="ada", now=datetime.now(UTC))
    last_week = budgets.week_start(datetime.now(UTC)) - timedelta(hours=1)
    await settle(sessions, organization_id, "7", user_id="ada", accepted_at=last_week)

    organization = await client.get(ORGANIZATION_BUDGET_URL, headers=tenant.headers)
    ada = await client.get("/v1/budgets/users/ada", headers=tenant.headers)
    bob = await client.get("/v1/budgets/users/bob", headers=tenant.headers)

    for response, user_id, spent in [
        (organization, None, "0.85"),
        (ada, "ada", "0.35"),
        (bob, "bob", "0.00"),
    ]:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["userId"] == user_id
        assert (answer["weeklyUsd"], answer["perChatUsd"]) == (None, None)
        assert answer["spentThisWeekUsd"] == spent


async def test_admin_sets_a_users_budget_apart_from_the_organizations(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    response = await client.put(
        "/v1/budgets/users/ada", json={"weeklyUsd": 5, "perChatUsd": None}, headers=tenant.headers
    )

    assert response.status_code == 200, response.text
    assert response.json()["userId"] == "ada"
    assert (response.json()["weeklyUsd"], response.json()["perChatUsd"]) == ("5.00", None)
    read = await client.get("/v1/budgets/users/ada", headers=tenant.headers)
    assert read.json() == response.json()
    for other in ("/v1/budgets/users/bob", ORGANIZATION_BUDGET_URL):
        answer = (await client.get(other, headers=tenant.headers)).json()
        assert (answer["weeklyUsd"], answer["perChatUsd"]) == (None, None)
    async with sessions() as session:
        stored = await budgets.get_budget(session, tenant.organization_id, "ada")
    assert stored == BudgetLimits(weekly_usd=usd("5"))


@pytest.mark.parametrize("bound_to", ["ada", None], ids=["user-key", "organization-key-not-admin"])
async def test_non_admin_keys_get_403_on_every_budget_endpoint_and_change_nothing(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions, bound_to: str | None
) -> None:
    await set_limits(sessions, tenant.organization_id, weekly="3")
    await set_limits(sessions, tenant.organization_id, "ada", per_chat="1")
    headers = bearer(await user_key(sessions, tenant.organization_id, bound_to))

    for method, path in [
        ("GET", ORGANIZATION_BUDGET_URL),
        ("PUT", ORGANIZATION_BUDGET_URL),
        ("GET", "/v1/budgets/users/ada"),
        ("PUT", "/v1/budgets/users/ada"),
    ]:
        body = {"weeklyUsd": "1000"} if method == "PUT" else None
        response = await client.request(method, path, json=body, headers=headers)
        problem = assert_problem(response, 403)
        assert problem["type"] == "/problems/forbidden"
        assert "3.00" not in response.text

    async with sessions() as session:
        organization = await budgets.get_budget(session, tenant.organization_id, "")
        ada = await budgets.get_budget(session, tenant.organization_id, "ada")
    assert organization == BudgetLimits(weekly_usd=usd("3"))
    assert ada == BudgetLimits(per_chat_usd=usd("1"))


async def test_another_organizations_admin_never_sees_or_changes_a_budget(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    other = await make_tenant(sessions)
    for path, body in [
        (ORGANIZATION_BUDGET_URL, {"weeklyUsd": "12.34"}),
        ("/v1/budgets/users/ada", {"perChatUsd": "5.67"}),
    ]:
        response = await client.put(path, json=body, headers=tenant.headers)
        assert response.status_code == 200, response.text
    await settle(sessions, tenant.organization_id, "0.42", user_id="ada")

    for path in (ORGANIZATION_BUDGET_URL, "/v1/budgets/users/ada"):
        seen = await client.get(path, headers=other.headers)
        assert seen.status_code == 200, seen.text
        answer = seen.json()
        assert (answer["weeklyUsd"], answer["perChatUsd"]) == (None, None)
        assert answer["spentThisWeekUsd"] == "0.00"
        # The other organization's admin sets budgets of its own: the first organization's stay.
        changed = await client.put(path, json={"weeklyUsd": "1"}, headers=other.headers)
        assert changed.status_code == 200, changed.text

    organization = (await client.get(ORGANIZATION_BUDGET_URL, headers=tenant.headers)).json()
    ada = (await client.get("/v1/budgets/users/ada", headers=tenant.headers)).json()
    assert (organization["weeklyUsd"], organization["perChatUsd"]) == ("12.34", None)
    assert (ada["weeklyUsd"], ada["perChatUsd"], ada["spentThisWeekUsd"]) == (None, "5.67", "0.42")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"weeklyUsd": -1}', id="negative"),
        pytest.param('{"weeklyUsd": "-0.01"}', id="negative-string"),
        pytest.param('{"perChatUsd": "1.12345678901"}', id="eleven-decimal-places"),
        pytest.param('{"weeklyUsd": "1000000000.01"}', id="above-the-bound"),
        pytest.param('{"weeklyUsd": 1e400}', id="overflowing-number"),
        pytest.param('{"weeklyUsd": "twelve"}', id="not-a-number"),
        pytest.param('{"weeklyUsd": "NaN"}', id="nan"),
        pytest.param('{"weeklyUsd": "Infinity"}', id="infinity"),
        pytest.param('{"weeklyUsd": true}', id="boolean"),
        pytest.param('{"weeklyUsd": ""}', id="empty-string"),
        pytest.param('{"weekly_usd": 1}', id="snake-case-name"),
        pytest.param('{"weeklyUsd": 1, "monthlyUsd": 2}', id="unknown-field"),
        pytest.param("[]", id="not-an-object"),
        pytest.param("", id="no-body"),
    ],
)
async def test_invalid_budgets_are_validation_problems_and_change_nothing(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions, body: str
) -> None:
    await set_limits(sessions, tenant.organization_id, weekly="2", per_chat="1")
    headers = {**tenant.headers, "Content-Type": "application/json"}

    for path in (ORGANIZATION_BUDGET_URL, "/v1/budgets/users/ada"):
        response = await client.put(path, content=body, headers=headers)
        problem = assert_problem(response, 422)
        assert problem["type"] == "/problems/validation"

    async with sessions() as session:
        organization = await budgets.get_budget(session, tenant.organization_id, "")
        ada = await budgets.get_budget(session, tenant.organization_id, "ada")
    assert organization == BudgetLimits(weekly_usd=usd("2"), per_chat_usd=usd("1"))
    assert ada == BudgetLimits()


@pytest.mark.parametrize(
    "user_id",
    [" ada", "ada ", "a" * 201, "a%00b"],
    ids=["leading-space", "trailing", "long", "nul"],
)
async def test_a_user_id_no_key_could_have_is_a_validation_problem(
    client: httpx.AsyncClient, tenant: Tenant, user_id: str
) -> None:
    for method in ("GET", "PUT"):
        response = await client.request(
            method, f"/v1/budgets/users/{user_id}", json={"weeklyUsd": 1}, headers=tenant.headers
        )
        assert assert_problem(response, 422)["type"] == "/problems/validation"


# --- reservations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "owner", "weekly", "per_chat", "refused_elsewhere"),
    [
        ("organization.weekly", ORGANIZATION_BUDGET, "1.00", None, {"ada-other-chat", "bob"}),
        ("organization.perChat", ORGANIZATION_BUDGET, None, "1.00", set()),
        ("user.weekly", "ada", "1.00", None, {"ada-other-chat"}),
        ("user.perChat", "ada", None, "1.00", set()),
    ],
)
async def test_reserve_refuses_once_spend_reaches_each_budget(
    sessions: Sessions,
    budget: str,
    owner: str,
    weekly: str | None,
    per_chat: str | None,
    refused_elsewhere: set[str],
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, owner, weekly=weekly, per_chat=per_chat)
    await settle(
        sessions, organization_id, "0.6", accepted_at=WEDNESDAY, user_id="ada", chat_id="chat-1"
    )
    # Below the limit: accepted, and its reservation counts from now on.
    await reserve(sessions, organization_id, "0.5", user_id="ada", chat_id="chat-1")

    with pytest.raises(BudgetExhausted) as refused:
        await reserve(sessions, organization_id, "0.01", user_id="ada", chat_id="chat-1")

    exhausted = refused.value
    assert exhausted.budget == budget
    assert (exhausted.limit_usd, exhausted.spent_usd, exhausted.remaining_usd) == (
        usd("1"),
        usd("1.1"),
        usd("0"),
    )
    weekly_budget = budget.endswith(".weekly")
    assert exhausted.resets_at == (NEXT_MONDAY if weekly_budget else None)
    problem = budget_exceeded_error(exhausted)
    assert (problem.status_code, problem.problem_type) == (403, "/problems/budget-exceeded")
    assert problem.extra == {
        "budget": budget,
        "limitUsd": "1.00",
        "spentUsd": "1.10",
        "remainingUsd": "0.00",
        "resetsAt": "2026-03-16T00:00:00Z" if weekly_budget else None,
    }
    assert budget in problem.detail
    assert ("weekly" if weekly_budget else "per-chat") in problem.detail

    # The budget binds only the turns it covers.
    for case, user_id, chat_id in [("ada-other-chat", "ada", "chat-2"), ("bob", "bob", "chat-3")]:
        if case in refused_elsewhere:
            with pytest.raises(BudgetExhausted):
                await reserve(sessions, organization_id, "0.01", user_id=user_id, chat_id=chat_id)
        else:
            await reserve(sessions, organization_id, "0.01", user_id=user_id, chat_id=chat_id)
    # A turn of no known chat (and of no user) is held to the organization's weekly budget only.
    if budget == "organization.weekly":
        with pytest.raises(BudgetExhausted):
            await reserve(sessions, organization_id, "0.01")
    else:
        await reserve(sessions, organization_id, "0.01")


async def test_the_first_spent_budget_in_a_fixed_order_is_the_one_named(
    sessions: Sessions,
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly="5", per_chat="1")
    await set_limits(sessions, organization_id, "ada", weekly="1", per_chat="1")
    await settle(sessions, organization_id, "1", user_id="ada", chat_id="c", accepted_at=WEDNESDAY)

    with pytest.raises(BudgetExhausted) as refused:
        await reserve(sessions, organization_id, "0", user_id="ada", chat_id="c")
    assert refused.value.budget == "organization.perChat"

    with pytest.raises(BudgetExhausted) as refused:
        await reserve(sessions, organization_id, "0", user_id="ada", chat_id="other")
    assert refused.value.budget == "user.weekly"


async def test_a_zero_budget_refuses_every_turn_and_weekly_spend_resets_on_monday(
    sessions: Sessions,
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly="1")
    await settle(sessions, organization_id, "1", accepted_at=WEDNESDAY)
    with pytest.raises(BudgetExhausted):
        await reserve(sessions, organization_id, "0.5", now=NEXT_MONDAY - timedelta(microseconds=1))

    await reserve(sessions, organization_id, "0.5", now=NEXT_MONDAY)

    await set_limits(sessions, organization_id, "ada", weekly="0")
    with pytest.raises(BudgetExhausted) as refused:
        await reserve(sessions, organization_id, "0", user_id="ada", now=NEXT_MONDAY)
    assert (refused.value.budget, refused.value.spent_usd) == ("user.weekly", usd("0"))


@pytest.mark.parametrize("weekly", ["0.5", None], ids=["within-a-budget", "without-budgets"])
async def test_a_repeated_reserve_of_one_turn_counts_once_and_is_never_refused(
    sessions: Sessions, weekly: str | None
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly=weekly)
    turn_id = new_turn_id()

    async def reserve_the_turn() -> bool:
        async with sessions.begin() as session:
            return await budgets.reserve(
                session,
                organization_id=organization_id,
                user_id="ada",
                chat_id="c",
                turn_id=turn_id,
                model="mock/echo",
                estimate_usd=usd("0.6"),
                now=WEDNESDAY,
            )

    assert await reserve_the_turn() is True
    # The repeat of an accepted send: its own reservation does not refuse it, nor count twice.
    assert await reserve_the_turn() is False

    assert await spent_this_week(sessions, organization_id, now=WEDNESDAY) == usd("0.6")
    async with sessions() as session:
        rows = (
            await session.execute(
                select(UsageEntry).where(UsageEntry.organization_id == organization_id)
            )
        ).all()
    assert len(rows) == 1
    if weekly is not None:
        with pytest.raises(BudgetExhausted):
            await reserve(sessions, organization_id, "0.6", user_id="ada", chat_id="c")


async def test_twenty_concurrent_reservations_overrun_a_limit_by_at_most_one(
    settings: Settings, sessions: Sessions
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly="1.00")
    estimate = usd("0.30")
    attempts = 20
    # An engine of its own: every attempt holds a connection and an open transaction at once.
    engine = create_engine(settings.resolved_database_url, pool_size=attempts)
    concurrent = create_session_factory(engine)
    all_in_transactions = asyncio.Barrier(attempts)

    async def attempt() -> bool:
        async with concurrent.begin() as session:
            await session.execute(text("SELECT 1"))
            await all_in_transactions.wait()
            try:
                await budgets.reserve(
                    session,
                    organization_id=organization_id,
                    user_id="ada",
                    chat_id=None,
                    turn_id=new_turn_id(),
                    model="mock/echo",
                    estimate_usd=estimate,
                    now=WEDNESDAY,
                )
            except BudgetExhausted:
                return False
            return True

    try:
        accepted = await asyncio.gather(*(attempt() for _ in range(attempts)))
    finally:
        await engine.dispose()

    reserved = await spent_this_week(sessions, organization_id, now=WEDNESDAY)
    # Accepted while spent < 1.00: at 0, 0.30, 0.60 and 0.90.
    assert accepted.count(True) == 4
    assert reserved == estimate * 4
    assert usd("1.00") <= reserved < usd("1.00") + estimate


async def test_stale_reservations_stop_counting(sessions: Sessions) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly="1")
    lost = await reserve(sessions, organization_id, "1", now=WEDNESDAY - timedelta(hours=2))
    # The lost turn's reservation is 90 minutes old here: it no longer counts.
    await reserve(sessions, organization_id, "1", now=WEDNESDAY - timedelta(minutes=30))

    # The reservation of 30 minutes ago still counts, and alone.
    with pytest.raises(BudgetExhausted) as refused:
        await reserve(sessions, organization_id, "0.01", now=WEDNESDAY)
    assert refused.value.spent_usd == usd("1")

    # A lost turn settled late counts its cost again; an hour on, the other reservation is stale.
    await settle(sessions, organization_id, "0.25", turn_id=lost)
    later = WEDNESDAY + timedelta(minutes=31)
    assert await spent_this_week(sessions, organization_id, now=later) == usd("0.25")
    await reserve(sessions, organization_id, "0.01", now=later)


# --- settlement and release ------------------------------------------------------------------------


async def test_settle_replaces_the_reservation_and_is_idempotent(sessions: Sessions) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    turn_id = await reserve(sessions, organization_id, "0.5", user_id="ada", chat_id="c")
    tokens = TokenCounts(
        input_tokens=1200,
        cached_input_tokens=1000,
        cache_write_tokens=100,
        output_tokens=300,
        reasoning_tokens=120,
    )

    async def settle_the_turn() -> None:
        await settle(
            sessions,
            organization_id,
            "0.0123456789",
            user_id="ada",
            chat_id="c",
            model="mock/reasoner",
            tokens=tokens,
            turn_id=turn_id,
        )

    await settle_the_turn()
    first = await ledger_row(sessions, organization_id, turn_id)
    await settle_the_turn()
    second = await ledger_row(sessions, organization_id, turn_id)

    assert first.state == "settled"
    assert (first.cost_usd, first.reserved_usd) == (usd("0.0123456789"), usd("0.5"))
    assert first.model == "mock/reasoner"
    assert (
        first.input_tokens,
        first.cached_input_tokens,
        first.cache_write_tokens,
        first.output_tokens,
        first.reasoning_tokens,
    ) == (1200, 1000, 100, 300, 120)
    assert first.settled_at is not None
    columns = [column.key for column in UsageEntry.__table__.columns]
    assert {c: getattr(second, c) for c in columns} == {c: getattr(first, c) for c in columns}
    # The cost counts now, not the reservation.
    assert await spent_this_week(sessions, organization_id, now=WEDNESDAY) == usd("0.0123456789")

    # A turn settled without a reservation gets a settled row of its own.
    unreserved = await settle(sessions, organization_id, "0.1", user_id="bob", chat_id="d")
    row = await ledger_row(sessions, organization_id, unreserved)
    assert (row.state, row.reserved_usd, row.cost_usd) == ("settled", usd("0"), usd("0.1"))


async def test_release_gives_back_a_reservation_but_never_a_settled_turn(
    sessions: Sessions,
) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await set_limits(sessions, organization_id, weekly="1")
    ran = await settle(sessions, organization_id, "0.3", accepted_at=WEDNESDAY)
    never_ran = await reserve(sessions, organization_id, "0.7")
    with pytest.raises(BudgetExhausted):
        await reserve(sessions, organization_id, "0.5")

    async with sessions.begin() as session:
        assert await budgets.release(session, organization_id, never_ran) is True
        assert await budgets.release(session, organization_id, never_ran) is False
        assert await budgets.release(session, organization_id, ran) is False
        assert await budgets.release(session, organization_id, "no-such-turn") is False

    assert (await ledger_row(sessions, organization_id, never_ran)).state == "released"
    assert (await ledger_row(sessions, organization_id, ran)).state == "settled"
    assert await spent_this_week(sessions, organization_id, now=WEDNESDAY) == usd("0.3")
    await reserve(sessions, organization_id, "0.5")


async def test_chat_usage_sums_the_chats_settled_turns(sessions: Sessions) -> None:
    organization_id = (await make_tenant(sessions)).organization_id
    await settle(sessions, organization_id, "0.1", chat_id="c", tokens=TokenCounts(10, 1, 2, 5, 3))
    await settle(sessions, organization_id, "0.2", chat_id="c", tokens=TokenCounts(20, 0, 0, 7, 0))
    await settle(sessions, organization_id, "5", chat_id="other")
    await reserve(sessions, organization_id, "9", chat_id="c")

    async with sessions() as session:
        totals = await budgets.chat_usage(session, organization_id, "c")
        nothing = await budgets.chat_usage(session, organization_id, "no-such-chat")

    assert totals == budgets.UsageTotals(
        turns=2, tokens=TokenCounts(30, 1, 2, 12, 3), cost_usd=usd("0.3")
    )
    assert nothing == budgets.UsageTotals(turns=0, tokens=TokenCounts(), cost_usd=usd("0"))


# --- usage reports ---------------------------------------------------------------------------------

MONDAY = datetime(2026, 3, 9, 9, 0, tzinfo=UTC)
TUESDAY = datetime(2026, 3, 10, 23, 59, tzinfo=UTC)
REPORT_RANGE = {"from": "2026-03-09", "to": "2026-03-12T00:00:00Z"}


async def spend_a_week(sessions: Sessions, organization_id: str) -> None:
    """Settled turns over two days, and turns no report counts."""
    await settle(
        sessions,
        organization_id,
        "0.1",
        user_id="ada",
        model="p/a",
        tokens=TokenCounts(100, 10, 5, 50, 20),
        accepted_at=MONDAY,
    )
    await settle(
        sessions,
        organization_id,
        "0.2",
        user_id="ada",
        model="p/b",
        tokens=TokenCounts(200, 0, 0, 80, 0),
        accepted_at=MONDAY,
    )
    await settle(
        sessions,
        organization_id,
        "0.3",
        user_id="bob",
        model="p/a",
        tokens=TokenCounts(300, 30, 0, 90, 0),
        accepted_at=TUESDAY,
    )
    await settle(
        sessions,
        organization_id,
        "0.0000000001",
        model="p/b",
        tokens=TokenCounts(1, 0, 0, 1, 0),
        accepted_at=TUESDAY,
    )
    # Not counted: a running turn, a released one, and settled turns outside the range.
    await reserve(sessions, organization_id, "5", user_id="ada", now=MONDAY)
    released = await reserve(sessions, organization_id, "5", user_id="ada", now=MONDAY)
    async with sessions.begin() as session:
        await budgets.release(session, organization_id, released)
    for outside in (MONDAY - timedelta(hours=10), datetime(2026, 3, 12, tzinfo=UTC)):
        await settle(
            sessions, organization_id, "7", user_id="ada", model="p/a", accepted_at=outside
        )


def group(key: str | None, turns: int, tokens: tuple[int, ...], cost: str) -> dict[str, Any]:
    """A group as the report shows it; `tokens` are input, cached input, cache write, output and
    reasoning tokens."""
    names = (
        "inputTokens",
        "cachedInputTokens",
        "cacheWriteTokens",
        "outputTokens",
        "reasoningTokens",
    )
    return {"key": key, "turns": turns, **dict(zip(names, tokens, strict=True)), "costUsd": cost}


async def test_usage_report_groups_by_user_model_and_day_with_exact_sums(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    await spend_a_week(sessions, tenant.organization_id)

    async def report(group_by: str) -> dict[str, Any]:
        response = await client.get(
            "/v1/usage", params={**REPORT_RANGE, "groupBy": group_by}, headers=tenant.headers
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        assert (answer["from"], answer["to"]) == ("2026-03-09T00:00:00Z", "2026-03-12T00:00:00Z")
        assert (answer["groupBy"], answer["userId"]) == (group_by, None)
        assert answer["totalUsd"] == "0.6000000001"
        return answer

    assert (await report("user"))["groups"] == [
        group("ada", 2, (300, 10, 5, 130, 20), "0.30"),
        group("bob", 1, (300, 30, 0, 90, 0), "0.30"),
        group(None, 1, (1, 0, 0, 1, 0), "0.0000000001"),
    ]
    assert (await report("model"))["groups"] == [
        group("p/a", 2, (400, 40, 5, 140, 20), "0.40"),
        group("p/b", 2, (201, 0, 0, 81, 0), "0.2000000001"),
    ]
    assert (await report("day"))["groups"] == [
        group("2026-03-09", 2, (300, 10, 5, 130, 20), "0.30"),
        group("2026-03-10", 2, (301, 30, 0, 91, 0), "0.3000000001"),
    ]

    # The storage layer's sums are Decimals, exact.
    async with sessions() as session:
        by_user = await budgets.usage_report(
            session,
            tenant.organization_id,
            user_id=None,
            start=datetime(2026, 3, 9, tzinfo=UTC),
            end=datetime(2026, 3, 12, tzinfo=UTC),
            group_by="user",
        )
    assert [(item.key, item.cost_usd) for item in by_user] == [
        ("ada", Decimal("0.3")),
        ("bob", Decimal("0.3")),
        (None, Decimal("0.0000000001")),
    ]
    assert all(isinstance(item.cost_usd, Decimal) for item in by_user)

    # An admin narrows the report to one user.
    response = await client.get(
        "/v1/usage",
        params={**REPORT_RANGE, "groupBy": "model", "userId": "bob"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == [group("p/a", 1, (300, 30, 0, 90, 0), "0.30")]


async def test_a_users_key_sees_only_its_own_usage(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    await spend_a_week(sessions, tenant.organization_id)
    ada = bearer(await user_key(sessions, tenant.organization_id, "ada"))

    for params in ({}, {"userId": "ada"}):
        response = await client.get(
            "/v1/usage", params={**REPORT_RANGE, "groupBy": "model", **params}, headers=ada
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["userId"] == "ada"
        assert answer["groups"] == [
            group("p/a", 1, (100, 10, 5, 50, 20), "0.10"),
            group("p/b", 1, (200, 0, 0, 80, 0), "0.20"),
        ]
        assert answer["totalUsd"] == "0.30"

    response = await client.get("/v1/usage", params={**REPORT_RANGE, "userId": "bob"}, headers=ada)
    assert "0.30" not in assert_problem(response, 403)["detail"]
    # A key of the organization that is neither an admin's nor a user's reads no usage.
    member = bearer(await user_key(sessions, tenant.organization_id, None))
    assert_problem(await client.get("/v1/usage", params=REPORT_RANGE, headers=member), 403)
    # Another organization's admin sees none of it.
    other = await make_tenant(sessions)
    response = await client.get(
        "/v1/usage", params={**REPORT_RANGE, "userId": "ada"}, headers=other.headers
    )
    assert response.status_code == 200, response.text
    assert (response.json()["groups"], response.json()["totalUsd"]) == ([], "0.00")


async def test_usage_defaults_to_this_week_so_far(
    client: httpx.AsyncClient, tenant: Tenant, sessions: Sessions
) -> None:
    await settle(sessions, tenant.organization_id, "0.05", user_id="ada", model="p/a")
    before = datetime.now(UTC)

    response = await client.get("/v1/usage", headers=tenant.headers)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["from"] == iso(budgets.week_start(before))
    assert before <= datetime.fromisoformat(answer["to"]) <= datetime.now(UTC)
    assert answer["groupBy"] == "day"
    assert answer["groups"] == [group(before.date().isoformat(), 1, (0, 0, 0, 0, 0), "0.05")]


@pytest.mark.parametrize(
    ("params", "where"),
    [
        pytest.param({"from": "2026-03-10", "to": "2026-03-10"}, "to", id="empty-range"),
        pytest.param({"from": "2026-03-10", "to": "2026-03-09"}, "to", id="backwards"),
        pytest.param({"from": "2025-03-09", "to": "2026-03-11"}, "to", id="longer-than-366-days"),
        pytest.param({"from": "2999-01-01"}, "to", id="from-after-now"),
        pytest.param({"from": "last week"}, "from", id="not-a-date"),
        pytest.param({"from": "0001-01-01T00:00:00+01:00"}, "from", id="before-year-one-in-utc"),
        pytest.param({"groupBy": "week"}, "groupBy", id="unknown-grouping"),
        pytest.param({"userId": ""}, "userId", id="empty-user"),
        pytest.param({"group_by": "day"}, "group_by", id="unknown-parameter"),
    ],
)
async def test_bad_usage_parameters_are_validation_problems(
    client: httpx.AsyncClient, tenant: Tenant, params: dict[str, str], where: str
) -> None:
    response = await client.get("/v1/usage", params=params, headers=tenant.headers)

    problem = assert_problem(response, 422)
    assert problem["type"] == "/problems/validation"
    assert problem["errors"][0]["loc"] == ["query", where]


async def test_usage_range_reads_offsets_as_utc_and_allows_exactly_366_days(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.get(
        "/v1/usage",
        params={"from": "2026-03-10T00:00:00+01:00", "to": "2027-03-10T23:00:00"},
        headers=tenant.headers,
    )

    assert response.status_code == 200, response.text
    assert (response.json()["from"], response.json()["to"]) == (
        "2026-03-09T23:00:00Z",
        "2027-03-10T23:00:00Z",
    )
