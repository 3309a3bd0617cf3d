"""Choosing a model, the catalog, cost on every turn, budgets, `auto` routing, durable fallback and
context trimming, through the real api, worker, Temporal and Postgres.

The test stack's catalog (tests/conftest.py `catalog_for_tests`) prices `mock/echo`, makes the
mock provider's fault-injection models internal, and sets the strategic tier to a model that
always fails, with a working one beside it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import UsageEntry
from tests.conftest import FALLBACK_MODEL, FALLING_MODEL, PRICED_MODEL, Tenant
from tests.support.chat_api import assert_problem, get_chat, send_and_collect, stored_text
from tests.support.openai_server import OpenAICompatibleServer
from tests.support.sse import SseEvent

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
MILLION = Decimal(1_000_000)
# Sends answered with the finished turn as JSON rather than a stream.
JSON_ANSWER = {"stream": "false"}


def chunks(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in events if event.data and event.data != "[DONE]"]


def chunk_of(events: list[SseEvent], kind: str) -> dict[str, Any]:
    [found] = [chunk for chunk in chunks(events) if chunk["type"] == kind]
    return found


async def send(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], path: str = "/v1/chats"
) -> tuple[httpx.Response, list[SseEvent]]:
    response, events = await send_and_collect(client, tenant.headers, body, path)
    return response, events


async def turn_record(client: httpx.AsyncClient, tenant: Tenant, chat_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()["items"][0]
    return record


async def user_key(client: httpx.AsyncClient, admin: Tenant, user_id: str) -> Tenant:
    response = await client.post("/v1/keys", json={"userId": user_id}, headers=admin.headers)
    assert response.status_code == 201, response.text
    created = response.json()
    return Tenant(admin.organization_id, created["id"], created["secret"])


# --- the catalog -------------------------------------------------------------------------------


async def test_the_catalog_lists_usable_models_with_prices_and_is_searchable(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.get("/v1/models", params={"limit": 200}, headers=tenant.headers)
    assert response.status_code == 200, response.text
    page = response.json()
    by_id = {model["id"]: model for model in page["items"]}
    assert page["total"] == len(by_id)
    assert page["pricesAsOf"]
    priced = by_id[PRICED_MODEL]
    assert priced["promptPpm"] == "2.50"
    assert priced["completionPpm"] == "10.00"
    assert priced["cachedPromptPpm"] == "1.25"
    assert priced["tier"] == "everyday"
    assert priced["provider"]["id"] == "mock"
    assert "vision" in priced["capabilities"]
    # Every native provider's configured models, and none of the internal mock models.
    assert {"anthropic/echo", "google/echo", "ollama/echo", "groq/echo", "openrouter/echo"} <= set(
        by_id
    )
    assert "mock/slow" not in by_id
    assert by_id["anthropic/echo"]["provider"]["name"] == "Anthropic"

    async def ids(**params: Any) -> list[str]:
        answer = await client.get(
            "/v1/models", params={"limit": 200, **params}, headers=tenant.headers
        )
        assert answer.status_code == 200, answer.text
        return [model["id"] for model in answer.json()["items"]]

    assert await ids(q="LOREM") == ["local/lorem"]
    assert set(await ids(provider="claude")) == set(await ids(provider="anthropic")) > set()
    assert set(await ids(tier="strategic")) == {FALLING_MODEL, FALLBACK_MODEL}
    assert "local/lorem" not in await ids(capability="vision")
    assert "mock/slow" in await ids(includeInternal="true")
    first, second = await ids(limit=1), await ids(limit=1, offset=1)
    assert len(first) == len(second) == 1
    assert first != second
    assert_problem(
        await client.get("/v1/models", params={"tier": "legendary"}, headers=tenant.headers), 422
    )


# --- choosing the model ------------------------------------------------------------------------


async def test_the_model_follows_request_chat_user_organization_then_server_default(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    ada = await user_key(client, tenant, f"ada-{uuid.uuid4().hex[:6]}")

    async def model_of(body: dict[str, Any], key: Tenant = ada) -> str:
        response = await client.post(
            "/v1/chats", json=body, params=JSON_ANSWER, headers=key.headers
        )
        assert response.status_code == 200, response.text
        record = await turn_record(client, key, response.json()["chatId"])
        return str(record["model"])

    message = {"message": "which model answers?"}
    assert await model_of(message) == "local/echo"  # DURACHAT_DEFAULT_MODEL

    org_default = await client.put(
        "/v1/defaults/organization", json={"model": "local/lorem"}, headers=tenant.headers
    )
    assert org_default.status_code == 200, org_default.text
    assert await model_of(message) == "local/lorem"
    # Only admin keys set the organization's default.
    assert_problem(
        await client.put(
            "/v1/defaults/organization", json={"model": PRICED_MODEL}, headers=ada.headers
        ),
        403,
    )

    mine = await client.put(
        "/v1/defaults/users/me", json={"model": "claude/echo"}, headers=ada.headers
    )
    assert mine.status_code == 200
    assert mine.json() == {"model": "anthropic/echo"}
    assert await model_of(message) == "anthropic/echo"
    assert_problem(
        await client.put("/v1/defaults/users/bob", json={"model": None}, headers=ada.headers), 403
    )

    created = await client.post(
        "/v1/chats",
        json={**message, "model": PRICED_MODEL},
        params=JSON_ANSWER,
        headers=ada.headers,
    )
    chat_id = created.json()["chatId"]
    settings = await client.patch(
        f"/v1/chats/{chat_id}", json={"model": "google/echo"}, headers=ada.headers
    )
    assert settings.status_code == 200, settings.text
    assert await model_of(message, ada) == "anthropic/echo"  # a new chat has no chat model
    continued = await client.post(
        f"/v1/chats/{chat_id}",
        json=message,
        params=JSON_ANSWER,
        headers=ada.headers,
    )
    assert continued.status_code == 200, continued.text
    assert (await turn_record(client, ada, chat_id))["model"] == "google/echo"
    # `provider: "default"` is the caller's default, passing over the chat's model.
    again = await client.post(
        f"/v1/chats/{chat_id}",
        json={**message, "provider": "default"},
        params=JSON_ANSWER,
        headers=ada.headers,
    )
    assert again.status_code == 200, again.text
    assert (await turn_record(client, ada, chat_id))["model"] == "anthropic/echo"

    assert await model_of({**message, "model": "ollama/echo"}) == "ollama/echo"
    assert await model_of({**message, "provider": "groq"}) == "groq/echo"
    assert await model_of({**message, "tier": "everyday"}) == "local/lorem"


async def test_unknown_models_and_providers_are_refused_naming_what_is_available(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    for body, says in [
        ({"model": "nope/model"}, "unknown provider"),
        ({"model": "anthropic/claude-9"}, "has no model"),
        ({"provider": "mistral"}, "unknown provider"),
    ]:
        response = await client.post(
            "/v1/chats", json={"message": "hi", **body}, headers=tenant.headers
        )
        problem = assert_problem(response, 400)
        assert says in problem["detail"]
        assert "local/echo" in problem["availableModels"]
    both = await client.post(
        "/v1/chats",
        json={"message": "hi", "model": "local/echo", "tier": "everyday"},
        headers=tenant.headers,
    )
    assert both.status_code in (400, 422), both.text
    listed = await client.get("/v1/chats", headers=tenant.headers)
    assert listed.json()["total"] == 0  # nothing was started


# --- cost -------------------------------------------------------------------------------------


async def test_a_turns_exact_cost_is_in_the_stream_the_turn_record_the_message_and_the_chat(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response, events = await send(
        client, tenant, {"message": "price this answer please", "model": PRICED_MODEL}
    )
    assert response.status_code == 200, response.text
    finish = chunk_of(events, "finish")["messageMetadata"]
    usage = finish["usage"]
    expected = (
        Decimal(usage["inputTokens"]) * Decimal("2.50") + Decimal(usage["outputTokens"]) * 10
    ) / MILLION
    assert expected > 0
    assert Decimal(finish["cost"]) == expected

    chat_id = chunk_of(events, "start")["messageMetadata"]["chatId"]
    record = await turn_record(client, tenant, chat_id)
    assert Decimal(record["costUsd"]) == expected
    assert record["usage"]["inputTokens"] == usage["inputTokens"]
    [attempt] = record["attemptLog"]
    assert attempt["model"] == PRICED_MODEL
    assert attempt["outcome"] == "completed"
    chat = await get_chat(client, tenant.headers, chat_id)
    assert Decimal(chat["messages"][-1]["metadata"]["cost"]) == expected

    second, more = await send(client, tenant, {"message": "and this one"}, f"/v1/chats/{chat_id}")
    assert second.status_code == 200
    second_cost = Decimal(chunk_of(more, "finish")["messageMetadata"]["cost"])
    totals = (await get_chat(client, tenant.headers, chat_id))["usage"]
    assert Decimal(totals["costUsd"]) == expected + second_cost
    assert totals["turns"] == 2


# --- budgets ----------------------------------------------------------------------------------


async def test_a_spent_weekly_budget_refuses_sends_with_403_and_says_when_it_resets(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    budget = await client.put(
        "/v1/budgets/organization", json={"weeklyUsd": "0.00001"}, headers=tenant.headers
    )
    assert budget.status_code == 200, budget.text
    first, _ = await send(client, tenant, {"message": "spend it all", "model": PRICED_MODEL})
    assert first.status_code == 200

    refused = await client.post(
        "/v1/chats", json={"message": "one more", "model": PRICED_MODEL}, headers=tenant.headers
    )
    problem = assert_problem(refused, 403)
    assert problem["type"].endswith("budget-exceeded")
    assert problem["budget"] == "organization.weekly"
    assert Decimal(problem["remainingUsd"]) == 0
    assert problem["resetsAt"]
    listed = await client.get("/v1/chats", headers=tenant.headers)
    assert listed.json()["total"] == 1  # the refused send started nothing


async def test_concurrent_sends_near_a_limit_overrun_it_by_at_most_one_reservation(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # A reservation of mock/echo is about 0.041 USD (4,096 answer tokens at 10 USD a million);
    # answers cost far less, so spend is mostly reservations while the turns run.
    limit = Decimal("0.1")
    response = await client.put(
        "/v1/budgets/organization", json={"weeklyUsd": str(limit)}, headers=tenant.headers
    )
    assert response.status_code == 200
    body = {"message": "all at once", "model": PRICED_MODEL}
    answers = await asyncio.gather(
        *(
            client.post("/v1/chats", json=body, params=JSON_ANSWER, headers=tenant.headers)
            for _ in range(20)
        )
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) == {200, 403}, statuses
    refusals = [answer.json() for answer in answers if answer.status_code == 403]
    assert {problem["budget"] for problem in refusals} == {"organization.weekly"}
    async with sessions() as session:
        entries = (
            await session.scalars(
                select(UsageEntry).where(UsageEntry.organization_id == tenant.organization_id)
            )
        ).all()
    # Every accepted turn settled exactly once, at its turn's recorded cost; what was spent stays
    # within the limit plus one reservation. (How reservations serialise under concurrent
    # transactions is shown at the ledger itself in tests/test_budgets.py.)
    assert len(entries) == statuses.count(200)
    assert all(entry.state == "settled" for entry in entries)
    largest_reservation = max(entry.reserved_usd for entry in entries)
    assert sum(entry.cost_usd or 0 for entry in entries) <= limit + largest_reservation


# --- routing, fallback and context ------------------------------------------------------------


async def test_auto_picks_a_vision_model_for_an_image_and_says_why(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    _, plain = await send(client, tenant, {"message": "just words", "model": "auto"})
    start = chunk_of(plain, "start")["messageMetadata"]
    assert start["model"] == "local/lorem"
    assert start["modelChoice"]["requested"] == "auto"

    _, pictured = await send(
        client,
        tenant,
        {
            "model": "auto",
            "messages": [
                {
                    "role": "user",
                    "id": "m1",
                    "parts": [
                        {"type": "text", "text": "what is in this picture?"},
                        {
                            "type": "file",
                            "mediaType": "image/png",
                            "url": f"data:image/png;base64,{PNG_1PX}",
                        },
                    ],
                }
            ],
        },
    )
    start = chunk_of(pictured, "start")["messageMetadata"]
    assert start["model"] == PRICED_MODEL
    assert "image" in start["modelChoice"]["reason"]
    record = await turn_record(client, tenant, start["chatId"])
    assert record["modelChoice"]["model"] == PRICED_MODEL
    assert record["modelChoice"]["requested"] == "auto"


async def test_a_model_that_keeps_failing_falls_back_durably_to_the_next_of_its_tier(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response, events = await send(client, tenant, {"message": "keep going", "tier": "strategic"})
    assert response.status_code == 200
    kinds = [chunk["type"] for chunk in chunks(events)]
    assert "reset-step" in kinds
    assert kinds[-1] == "finish"
    start = chunk_of(events, "start")["messageMetadata"]
    assert start["model"] == FALLING_MODEL
    chat = await get_chat(client, tenant.headers, start["chatId"])
    answer = chat["messages"][-1]
    assert answer["status"] == "complete"
    assert stored_text(answer) == "the fallback answered"
    record = await turn_record(client, tenant, start["chatId"])
    assert record["status"] == "completed"
    assert record["model"] == FALLBACK_MODEL
    assert record["modelChoice"]["fallbacks"][0] == FALLBACK_MODEL
    tried = [(attempt["model"], attempt["outcome"]) for attempt in record["attemptLog"]]
    assert tried[-1] == (FALLBACK_MODEL, "completed")
    assert (FALLING_MODEL, "failed") in tried


async def test_a_history_too_long_for_the_context_window_loses_its_oldest_messages(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    model = "mock/reply-hello-from-the-provider"  # a 4,000-token window in the test catalog
    filler = "word " * 2_000  # about 2,500 tokens a message
    history = [
        {"role": role, "id": f"h{index}", "parts": [{"type": "text", "text": f"{index} {filler}"}]}
        for index, role in enumerate(["user", "assistant"] * 3)
    ]
    latest = {"role": "user", "id": "latest", "parts": [{"type": "text", "text": "and now?"}]}
    response, events = await send(client, tenant, {"model": model, "messages": [*history, latest]})
    assert response.status_code == 200, response.text
    chat_id = chunk_of(events, "start")["messageMetadata"]["chatId"]
    record = await turn_record(client, tenant, chat_id)
    assert record["messagesLeftOut"] >= 5
    assert (
        chunk_of(events, "finish")["messageMetadata"]["messagesLeftOut"]
        == record["messagesLeftOut"]
    )
    sent = provider_server.requests_for("reply-hello-from-the-provider")[-1].messages
    assert sent[-1]["content"] == "and now?"
    assert len(sent) == 7 - record["messagesLeftOut"]
