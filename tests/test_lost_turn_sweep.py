"""The lost-turn sweep: a turn whose workflow an operator terminated is released while nothing touches
its chat, so its open stream ends (`error`, then `[DONE]`) on its own; and the sweep keeps working
after Postgres was down.

A worker of its own sweeps with a short release bound (2 s) beside the session's worker, on the
same task queue, so it is also one of several replicas sweeping at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from core.settings import Settings
from devstack.embedded import EmbeddedPostgres
from devstack.stack import ServiceStack
from tests.conftest import Tenant, process_environment
from tests.support.processes import ServiceProcess
from tests.support.sse import SseEvent, chunks_of, iter_sse

# 2000 words 20 ms apart: the turn would run for 40 s if nobody ended it.
LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 2000, "delayMs": 20}}}
RELEASE_WITHIN_SECONDS = 2
# Generous: the bound is 2 s here, and before the sweep such a stream never ended at all.
STREAM_END_TIMEOUT_S = 60


def report(scenario: str, **figures: object) -> None:
    details = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[lost-turn-sweep] {scenario}: {details}")


def wait_for_log(process: ServiceProcess, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log_tail(200_000):
        assert process.process is not None
        assert process.process.poll() is None, process.log_tail()
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{process.log_tail()}"
        time.sleep(0.05)


@pytest.fixture
def sweeping_worker(settings: Settings, tmp_path: Path) -> Iterator[ServiceProcess]:
    environment = {
        **process_environment(settings),
        "DURACHAT_LOST_TURN_RELEASE_SECONDS": str(RELEASE_WITHIN_SECONDS),
    }
    worker = ServiceProcess("worker", environment, tmp_path)
    worker.start()
    try:
        wait_for_log(worker, "worker.started")
        yield worker
    finally:
        worker.stop()


@pytest.fixture
async def temporal(settings: Settings) -> Client:
    return await Client.connect(settings.resolved_temporal_address)


@dataclass(frozen=True)
class EndedStream:
    chat_id: str
    turn_id: str
    after_termination: list[SseEvent]
    seconds_to_end: float


async def stream_of_a_terminated_turn(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client
) -> EndedStream:
    """Start a long turn, terminate its workflow once it streams, then only keep reading."""
    body = {"message": "a long answer", **LONG}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        assert response.status_code == 200, await response.aread()
        chat_id, turn_id = response.headers["x-chat-id"], response.headers["x-turn-id"]
        events: AsyncIterator[SseEvent] = iter_sse(response)
        deltas = 0
        while deltas < 5:
            deltas += (await anext(events)).chunk["type"] == "text-delta"
        await temporal.get_workflow_handle(f"turn-{turn_id}").terminate(
            reason="operator: stuck turn"
        )
        terminated_at = time.monotonic()
        try:
            async with asyncio.timeout(STREAM_END_TIMEOUT_S):
                rest = [event async for event in events]
        except TimeoutError:
            raise AssertionError(
                f"the terminated turn's stream was still open {STREAM_END_TIMEOUT_S}s later"
            ) from None
    return EndedStream(chat_id, turn_id, rest, time.monotonic() - terminated_at)


async def assert_released(
    client: httpx.AsyncClient, tenant: Tenant, ended: EndedStream
) -> dict[str, Any]:
    assert ended.after_termination[-1].data == "[DONE]"
    last = chunks_of(ended.after_termination)[-1]
    assert last["type"] == "error", last
    assert "terminated" in last["errorText"]
    turns = await client.get(f"/v1/chats/{ended.chat_id}/turns", headers=tenant.headers)
    [turn] = turns.json()["items"]
    assert turn["id"] == ended.turn_id
    assert turn["status"] == "failed"
    assert "terminated" in turn["error"]
    chat = await client.get(f"/v1/chats/{ended.chat_id}", headers=tenant.headers)
    assert chat.json()["activeTurnId"] is None
    return turn


async def test_a_terminated_turns_open_stream_ends_on_its_own(
    client: httpx.AsyncClient, tenant: Tenant, temporal: Client, sweeping_worker: ServiceProcess
) -> None:
    ended = await stream_of_a_terminated_turn(client, tenant, temporal)
    report("terminated turn", termination_to_stream_end_s=round(ended.seconds_to_end, 2))

    await assert_released(client, tenant, ended)


async def test_the_sweep_goes_on_after_a_postgres_outage(
    client: httpx.AsyncClient,
    tenant: Tenant,
    temporal: Client,
    sweeping_worker: ServiceProcess,
    service_stack: ServiceStack,
) -> None:
    postgres = next(s for s in service_stack.services if isinstance(s, EmbeddedPostgres))
    await asyncio.to_thread(postgres.stop)
    try:
        await asyncio.to_thread(wait_for_log, sweeping_worker, "turn.sweep_failed")
    finally:
        # From the main thread: an embedded server dies with the thread that started it.
        postgres.start()
        await asyncio.to_thread(postgres.wait_ready, 60)

    ended = await stream_of_a_terminated_turn(client, tenant, temporal)
    report("after a Postgres outage", termination_to_stream_end_s=round(ended.seconds_to_end, 2))

    await assert_released(client, tenant, ended)
