"""Turn outcomes through a real worker and a provider speaking the OpenAI wire format: reasoning,
provider rejections, retried failures with a stream reset, and what operators see in Temporal
(search attributes, and failed turns as failed workflows)."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from core.settings import Settings
from storage.models import Turn
from tests.conftest import Tenant
from tests.support.chat_api import assert_problem, get_chat, send_and_collect, stored_text
from tests.support.openai_server import OpenAICompatibleServer
from tests.support.sse import chunks_of, text_of


async def test_openai_compatible_provider_streams_reasoning_then_text(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    model = "mock/reasoning-the-answer-is-42"
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "what is it?", "model": model}
    )
    assert response.status_code == 200
    chunks = chunks_of(events)
    kinds = [chunk["type"] for chunk in chunks]
    assert kinds.index("reasoning-start") < kinds.index("reasoning-end") < kinds.index("text-start")
    assert text_of(chunks) == "the answer is 42"
    answer = (await get_chat(client, tenant.headers, response.headers["x-chat-id"]))["messages"][-1]
    assert [part["type"] for part in answer["parts"]] == ["step-start", "reasoning", "text"]
    assert stored_text(answer, "reasoning") == "".join(
        c["delta"] for c in chunks if c["type"] == "reasoning-delta"
    )
    assert answer["metadata"]["usage"]["outputTokens"] > 0
    sent = provider_server.requests_for("reasoning-the-answer-is-42")[-1]
    assert sent.authorization == "Bearer sk-test-provider-key"
    assert sent.messages[-1] == {"role": "user", "content": "what is it?"}


async def test_provider_rejection_fails_at_once_with_an_error_chunk(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    before = len(provider_server.requests_for("fail-401"))
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "hi", "model": "mock/fail-401"}
    )
    assert response.status_code == 200
    chunks = chunks_of(events)
    assert chunks[-1]["type"] == "error"
    assert "sk-test-provider-key" not in chunks[-1]["errorText"]
    assert len(provider_server.requests_for("fail-401")) == before + 1, "a 4xx is not retried"
    answer = (await get_chat(client, tenant.headers, response.headers["x-chat-id"]))["messages"][-1]
    assert answer["status"] == "failed"
    assert answer["metadata"]["error"] == chunks[-1]["errorText"]
    async with sessions() as session:
        turn = await session.get(Turn, chunks[0]["messageMetadata"]["turnId"])
    assert turn is not None
    assert turn.status == "failed"
    assert turn.error


async def test_retryable_failure_resets_the_stream_and_completes(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    options = {"local": {"delayMs": 0, "failAfterWords": 2, "failTimes": 1}}
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "one two three four five", "providerOptions": options}
    )
    chunks = chunks_of(events)
    kinds = [chunk["type"] for chunk in chunks]
    reset = kinds.index("reset-step")
    assert "text-delta" in kinds[:reset], "the failed attempt streamed something first"
    assert kinds[-1] == "finish"
    after_reset = chunks[reset + 1 :]
    assert text_of(after_reset) == "one two three four five"
    answer = (await get_chat(client, tenant.headers, response.headers["x-chat-id"]))["messages"][-1]
    assert stored_text(answer) == "one two three four five"
    async with sessions() as session:
        turn = await session.get(Turn, chunks[0]["messageMetadata"]["turnId"])
    assert turn is not None
    assert turn.attempts == 2
    assert turn.status == "completed"


async def test_flaky_provider_is_retried_by_temporal(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    model = "flaky-1"
    provider_server.reset()
    _response, events = await send_and_collect(
        client, tenant.headers, {"message": "steady now", "model": f"mock/{model}"}
    )
    assert text_of(chunks_of(events)) == "steady now"
    assert len(provider_server.requests_for(model)) == 2


async def test_operators_find_the_turn_by_search_attributes(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    response, events = await send_and_collect(
        client, tenant.headers, {"message": "find me", "providerOptions": {"local": {"delayMs": 0}}}
    )
    chat_id = response.headers["x-chat-id"]
    turn_id = chunks_of(events)[0]["messageMetadata"]["turnId"]
    temporal = await Client.connect(settings.resolved_temporal_address)
    handle = temporal.get_workflow_handle(f"turn-{turn_id}")
    # The stream ends once the answer is stored; the workflow records its final status just after.
    await handle.result()
    description = await handle.describe()
    attributes = {
        key.name: value
        for key, value in description.typed_search_attributes
        if key.name.startswith("Durachat")
    }
    assert attributes == {
        "DurachatOrganizationId": tenant.organization_id,
        "DurachatChatId": chat_id,
        "DurachatTurnId": turn_id,
        "DurachatModel": "local/echo",
        "DurachatProvider": "local",
        "DurachatStatus": "completed",
    }
    # The activities are visible by name in the turn's history: generation and titling as
    # activity tasks, the session steps and the webhook announcement as local activity markers.
    history = await handle.fetch_history()
    activities = {
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
    }
    assert activities == {"generate_reply", "title_chat"}
    local_activities = {
        json.loads(event.marker_recorded_event_attributes.details["data"].payloads[0].data)[
            "activity_type"
        ]
        for event in history.events
        if event.HasField("marker_recorded_event_attributes")
        and event.marker_recorded_event_attributes.marker_name == "core_local_activity"
    }
    assert local_activities == {
        "claim_session",
        "store_user_message",
        "persist_assistant_message",
        "announce_event",
    }


async def test_a_failed_turn_closes_its_workflow_as_failed_and_others_as_completed(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    temporal = await Client.connect(settings.resolved_temporal_address)
    failed = await client.post(
        "/v1/chats?stream=false",
        json={"message": "hi", "model": "mock/fail-400"},
        headers=tenant.headers,
    )
    problem = assert_problem(failed, 502)
    # Every answer of an accepted send names its chat and turn, a failure's too.
    chat_id, turn_id = failed.headers["x-chat-id"], failed.headers["x-turn-id"]
    assert (problem["chatId"], problem["turnId"]) == (chat_id, turn_id)

    handle = temporal.get_workflow_handle(f"turn-{turn_id}")
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "TurnFailed"
    assert cause.message == problem["detail"]
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.FAILED
    # Its outcome was stored and its stream ended before the workflow failed; it is not retried.
    answer = (await get_chat(client, tenant.headers, chat_id))["messages"][-1]
    assert answer["status"] == "failed"
    history = await handle.fetch_history()
    assert (
        sum(
            event.HasField("workflow_execution_started_event_attributes")
            for event in history.events
        )
        == 1
    )
    found = [
        execution.id
        async for execution in temporal.list_workflows(
            f'ExecutionStatus="Failed" AND DurachatChatId="{chat_id}"'
        )
    ]
    assert found == [f"turn-{turn_id}"]

    # A stopped turn and a completed one close as completed.
    completed = await client.post(
        f"/v1/chats/{chat_id}?stream=false",
        json={
            "message": "fine",
            "model": "local/echo",
            "providerOptions": {"local": {"delayMs": 0}},
        },
        headers=tenant.headers,
    )
    assert completed.status_code == 200, completed.text
    completed_handle = temporal.get_workflow_handle(f"turn-{completed.json()['turnId']}")
    await completed_handle.result()
    assert (await completed_handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    async with client.stream(
        "POST",
        f"/v1/chats/{chat_id}",
        json={
            "message": "long",
            "model": "local/lorem",
            "providerOptions": {"local": {"words": 200, "delayMs": 30}},
        },
        headers=tenant.headers,
    ) as running:
        stopped_turn_id = running.headers["x-turn-id"]
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        assert stop.json()["stopped"] is True
        await running.aread()
    stopped_handle = temporal.get_workflow_handle(f"turn-{stopped_turn_id}")
    assert (await stopped_handle.result())["status"] == "aborted"
    assert (await stopped_handle.describe()).status == WorkflowExecutionStatus.COMPLETED


async def test_the_json_answer_of_a_send_has_the_same_shape_as_a_chat_read(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/chats?stream=false",
        json={"message": "same shape", "providerOptions": {"local": {"delayMs": 0}}},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    answer = response.json()["message"]
    assert answer["siblingIds"] == [answer["id"]]
    read = (await get_chat(client, tenant.headers, response.json()["chatId"]))["messages"][-1]
    assert answer == read
