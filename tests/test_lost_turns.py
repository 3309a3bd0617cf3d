"""A turn whose workflow an operator terminated: its chat is not busy forever. The next send, a stop
or a chat change finds the workflow closed, fails the turn (its saved answer stays), ends its stream
and wakes the chat's queue."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from core.contracts import CHAT_RELEASED_SIGNAL, ChatReleased
from core.settings import Settings
from storage import chats
from tests.conftest import Tenant
from tests.support.chat_api import get_chat, stored_text, wait_for_settled_answer
from tests.support.database import until_a_backend_waits_for_a_lock
from tests.support.sse import SseEvent, chunks_of, iter_sse

LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 2000, "delayMs": 20}}}


@pytest.fixture
async def temporal(settings: Settings) -> Client:
    return await Client.connect(settings.resolved_temporal_address)


async def turns_of(client: httpx.AsyncClient, tenant: Tenant, chat_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


@dataclass(frozen=True)
class TerminatedTurn:
    chat_id: str
    turn_id: str
    cursor: str  # the last one the client received
    received_text: str


@contextlib.asynccontextmanager
async def terminated_turn(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> AsyncIterator[TerminatedTurn]:
    """A long turn that streamed a few words, then had its workflow terminated by an operator."""
    async with client.stream(
        "POST", "/v1/chats", json={"message": "a long answer", **LONG}, headers=tenant.headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        chat_id, turn_id = response.headers["x-chat-id"], response.headers["x-turn-id"]
        events: AsyncIterator[SseEvent] = iter_sse(response)
        cursor = ""
        deltas: list[str] = []
        while len(deltas) < 5:
            event = await anext(events)
            cursor = event.id or cursor
            if event.chunk["type"] == "text-delta":
                deltas.append(event.chunk["delta"])
        handle = temporal.get_workflow_handle(f"turn-{turn_id}")
        await handle.terminate(reason="operator: stuck turn")
        assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
    # Nothing has looked at the turn since: it still holds the chat.
    assert (await get_chat(client, tenant.headers, chat_id))["activeTurnId"] == turn_id
    yield TerminatedTurn(chat_id, turn_id, cursor, "".join(deltas))


async def _workflow_tasks_done(handle: WorkflowHandle[Any, Any]) -> list[int]:
    history = await handle.fetch_history()
    return [
        event.event_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]


def assert_lost(turn: dict[str, Any]) -> None:
    assert turn["status"] == "failed", turn
    assert "terminated" in turn["error"], turn


async def test_the_next_send_releases_a_terminated_turn_and_runs(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> None:
    async with terminated_turn(client, tenant, temporal) as lost_turn:
        chat_id = lost_turn.chat_id
        response = await client.post(
            f"/v1/chats/{chat_id}",
            json={"message": "are you there", "model": "local/echo"},
            params={"stream": "false"},
            headers=tenant.headers,
        )
        assert response.status_code == 200, response.text

        chat = await get_chat(client, tenant.headers, chat_id)
        assert chat["activeTurnId"] is None
        lost_answer, _user, answer = chat["messages"][1:]
        assert stored_text(answer) == "are you there"
        assert lost_answer["metadata"]["error"].startswith("the turn's workflow was terminated")
        # The lost answer keeps what its stream delivered (the client saw the start of it).
        assert lost_answer["status"] == "failed"
        assert stored_text(lost_answer).startswith(lost_turn.received_text)
        [later, lost] = await turns_of(client, tenant, chat_id)
        assert_lost(lost)
        assert lost["id"] == lost_turn.turn_id
        assert later["status"] == "completed"

        # A client resuming the lost turn's stream is told it ended, instead of waiting forever.
        async with client.stream(
            "GET",
            f"/v1/chats/{chat_id}/stream",
            headers={**tenant.headers, "Last-Event-ID": lost_turn.cursor},
        ) as resumed:
            chunks = chunks_of([event async for event in iter_sse(resumed)])
        assert chunks[-1]["type"] == "error", chunks[-3:]
        assert "terminated" in chunks[-1]["errorText"]


async def test_stop_releases_a_terminated_turn_and_wakes_the_queue(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> None:
    async with terminated_turn(client, tenant, temporal) as lost_turn:
        chat_id = lost_turn.chat_id
        queued = await client.post(
            f"/v1/chats/{chat_id}",
            json={"message": "next in line", "model": "local/echo", "ifBusy": "queue"},
            params={"stream": "false"},
            headers=tenant.headers,
            timeout=60,
        )
        # The queued send itself found the holder's workflow closed, released it, and ran.
        assert queued.status_code == 200, queued.text
        assert stored_text((await get_chat(client, tenant.headers, chat_id))["messages"][-1]) == (
            "next in line"
        )
        assert_lost((await turns_of(client, tenant, chat_id))[-1])

    async with terminated_turn(client, tenant, temporal) as lost_turn:
        chat_id = lost_turn.chat_id
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        assert stop.status_code == 200, stop.text
        assert stop.json() == {"stopped": False, "turnId": None}
        assert (await get_chat(client, tenant.headers, chat_id))["activeTurnId"] is None
        assert_lost((await turns_of(client, tenant, chat_id))[-1])


async def test_releasing_a_turn_while_its_attempt_saves_its_answer_does_not_deadlock(
    client: httpx.AsyncClient,
    tenant: Tenant,
    temporal: Client,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The terminated turn's attempt can still be running on its worker, and a stop makes it save
    its answer (message row, then turn row) while the api releases the turn. The release waits for
    the attempt's transaction instead of deadlocking with it."""
    async with terminated_turn(client, tenant, temporal) as lost_turn:
        async with sessions() as session:
            turn = await chats.get_turn_by_id(session, tenant.organization_id, lost_turn.turn_id)
            assert turn is not None
        saving = sessions()
        async with saving.begin():
            # The attempt's save, halfway: the message row is locked.
            assert await chats.save_assistant_parts(
                saving,
                tenant.organization_id,
                turn.assistant_message_id,
                [{"type": "text", "text": "saved by the attempt"}],
                turn_id=turn.id,
                attempt=turn.attempts,
            )
            release = asyncio.create_task(_release(sessions, tenant, lost_turn.turn_id))
            await until_a_backend_waits_for_a_lock(sessions)
            # The save's second half: the turn row (the release must not hold it).
            await chats.record_attempt(saving, tenant.organization_id, turn.id, turn.attempts)
        await saving.close()
        await release
        [lost] = await turns_of(client, tenant, lost_turn.chat_id)
        assert_lost(lost)
        chat = await get_chat(client, tenant.headers, lost_turn.chat_id)
        assert chat["activeTurnId"] is None
        assert chat["messages"][-1]["status"] == "failed"


async def _release(
    sessions: async_sessionmaker[AsyncSession], tenant: Tenant, turn_id: str
) -> None:
    async with sessions.begin() as session:
        await chats.end_lost_turn(session, tenant.organization_id, turn_id, "terminated", [])


async def test_a_chat_change_releases_a_terminated_turn(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> None:
    async with terminated_turn(client, tenant, temporal) as lost_turn:
        chat_id = lost_turn.chat_id
        truncated = await client.post(
            f"/v1/chats/{chat_id}/truncate", json={"keep": 0}, headers=tenant.headers
        )
        assert truncated.status_code == 200, truncated.text
        assert truncated.json() == {"kept": 0, "deleted": 2}
        assert (await get_chat(client, tenant.headers, chat_id))["messages"] == []


async def test_a_running_turn_is_not_released(client: httpx.AsyncClient, tenant: Tenant) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "a long answer", **LONG}, headers=tenant.headers
    ) as response:
        chat_id = response.headers["x-chat-id"]
        busy = await client.post(
            f"/v1/chats/{chat_id}/truncate", json={"keep": 0}, headers=tenant.headers
        )
        assert busy.status_code == 409, busy.text
        again = await client.post(
            f"/v1/chats/{chat_id}",
            json={"message": "too soon", "model": "local/echo"},
            params={"stream": "false"},
            headers=tenant.headers,
        )
        assert again.status_code == 409, again.text
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted", "a stop, not a release, ended it"


async def test_a_reset_turn_runs_on_in_its_new_run_and_keeps_its_chat(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> None:
    async with client.stream(
        "POST", "/v1/chats", json={"message": "a long answer", **LONG}, headers=tenant.headers
    ) as response:
        chat_id, turn_id = response.headers["x-chat-id"], response.headers["x-turn-id"]
    handle = temporal.get_workflow_handle(f"turn-{turn_id}")
    # The first workflow task claims the chat and stores the messages (local activities) and
    # schedules the generation; a reset to it would do all that again in the new run. A signal the
    # running turn ignores gives the history a second task to reset to: the new run carries on
    # from the generation without claiming the chat again, so the turn row keeps naming the old run.
    await handle.signal(CHAT_RELEASED_SIGNAL, ChatReleased(released_by_turn_id="none"))
    async with asyncio.timeout(10):
        while True:
            tasks_done = await _workflow_tasks_done(handle)
            if len(tasks_done) >= 2:
                break
            await asyncio.sleep(0.05)
    last_task_done = tasks_done[-1]
    # An operator's reset closes the run the turn row names (as terminated) and goes on in a new run.
    description = await handle.describe()
    await temporal.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=temporal.namespace,
            workflow_execution=WorkflowExecution(workflow_id=handle.id, run_id=description.run_id),
            reason="operator: replay the turn",
            workflow_task_finish_event_id=last_task_done,
            request_id=uuid.uuid4().hex,
        )
    )
    old_run = temporal.get_workflow_handle(handle.id, run_id=description.run_id)
    assert (await old_run.describe()).status == WorkflowExecutionStatus.TERMINATED
    [turn] = await turns_of(client, tenant, chat_id)
    assert turn["runId"] == description.run_id, "the turn row still names the terminated run"

    busy = await client.post(
        f"/v1/chats/{chat_id}",
        json={"message": "too soon", "model": "local/echo"},
        params={"stream": "false"},
        headers=tenant.headers,
    )
    assert busy.status_code == 409, busy.text
    stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
    assert stop.json() == {"stopped": True, "turnId": turn_id}
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted", "the new run ended the turn, not a release"
