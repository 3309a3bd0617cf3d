"""Many streams through one api process: 300 open at once all complete with the whole answer while the
api keeps answering, on a number of Redis connections that does not grow with the streams; and a
Redis pool too small for the moment answers 503 with `Retry-After` at once instead of hanging.

Each test runs its own api replica (its settings differ from the session's api) against the session's
Postgres, Redis, Temporal and worker, the way `tests/test_limits.py` runs its replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from core.settings import Settings
from devstack.ports import free_port_block
from tests.conftest import RunningServices, Tenant, process_environment
from tests.support.chat_api import assert_problem, get_chat, send_and_collect, stored_text
from tests.support.processes import ServiceProcess, wait_until_ready
from tests.support.sse import SseEvent, assembled_text, chunks_of, iter_sse, text_of

# Limits that would refuse a load from one key are off: this is about what the process holds.
LIMITS_OFF: dict[str, Any] = {
    "send_rate_limit": "",
    "stream_open_rate_limit": "",
    "max_open_streams_per_key": 0,
    "max_active_turns_per_organization": 0,
}
TURNS = 25
RESUMES_PER_TURN = 12  # 300 resumed streams, besides the sends' own
# Turns that run for minutes unless stopped, so every stream is still open when the last one opens
# however slow the machine; the test stops them once it has checked the api with all of them open.
# Four words a second keeps the test's own client (it parses every event of 325 streams) ahead.
PACED = {"model": "local/lorem", "providerOptions": {"local": {"words": 1000, "delayMs": 250}}}
FAST = {"local": {"delayMs": 0}}
# Generous bounds on waiting for conditions on a loaded 2-core machine; never expected to be reached.
OPEN_ALL_SECONDS = 60
FINISH_ALL_SECONDS = 90


@dataclass
class Replica:
    process: ServiceProcess
    url: str
    settings: Settings


def start_replica(settings: Settings, log_dir: Any, overrides: dict[str, Any]) -> Iterator[Replica]:
    port = free_port_block()
    replica_settings = settings.model_copy(update={**overrides, "api_port": port})
    process = ServiceProcess("api", process_environment(replica_settings), log_dir)
    process.start()
    url = f"http://{settings.api_host}:{port}"
    try:
        wait_until_ready(url, process)
        yield Replica(process, url, replica_settings)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def roomy_api(
    settings: Settings,
    running_services: RunningServices,  # the worker that runs its turns
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replica]:
    yield from start_replica(settings, tmp_path_factory.mktemp("roomy-api"), LIMITS_OFF)


@pytest.fixture(scope="module")
def tiny_pool_api(
    settings: Settings,
    running_services: RunningServices,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replica]:
    # One pooled connection, given up on after 0.2 s; the usual limits stay on, so each send's
    # first Redis command is its rate-limit hit.
    overrides = {"redis_max_connections": 1, "redis_pool_timeout_seconds": 0.2}
    yield from start_replica(settings, tmp_path_factory.mktemp("tiny-pool-api"), overrides)


def redis_port(settings: Settings) -> int:
    port = urlparse(settings.resolved_redis_url).port
    assert port is not None
    return port


def redis_connections_of(process: ServiceProcess, port: int) -> list[int]:
    """The local ports of the process's open connections to Redis."""
    assert process.process is not None
    return [
        connection.laddr.port
        for connection in psutil.Process(process.process.pid).net_connections("tcp")
        if connection.raddr
        and connection.raddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    ]


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s")
        await asyncio.sleep(0.05)


@dataclass
class StreamTally:
    """How many streams have shown their first event, and how many have ended."""

    opened: int = 0
    ended: int = 0
    all_opened: asyncio.Event = field(default_factory=asyncio.Event)
    ended_before_all_opened: int = 0

    def open_one(self, expected: int) -> None:
        self.opened += 1
        if self.opened == expected:
            self.all_opened.set()

    def end_one(self) -> None:
        self.ended += 1
        if not self.all_opened.is_set():
            self.ended_before_all_opened += 1


async def read_stream(
    response: httpx.Response, tally: StreamTally, expected: int
) -> list[SseEvent]:
    assert response.status_code == 200, (await response.aread()).decode()
    events: list[SseEvent] = []
    async for event in iter_sse(response):
        if not events:
            tally.open_one(expected)
        events.append(event)
    tally.end_one()
    return events


def assert_whole_stream(events: list[SseEvent], stored: str) -> None:
    assert events[-1].data == "[DONE]"
    chunks = chunks_of(events)
    assert chunks[0]["type"] == "start"
    assert chunks[-1]["type"] == "finish"
    ids = [event.id for event in events[:-1]]
    assert None not in ids, "every event has a cursor"
    assert len(ids) == len(set(ids)), "every event once"
    # Under this load a generation attempt can miss its heartbeat and be retried; the retry's
    # `reset-step` tells clients to drop the failed attempt's text, so compare what they assemble.
    assert assembled_text(chunks) == stored, "the stream carries exactly the stored answer"


async def test_300_concurrent_streams_complete_while_the_api_keeps_answering(
    roomy_api: Replica, running_services: RunningServices, tenant: Tenant
) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(FINISH_ALL_SECONDS)
    async with httpx.AsyncClient(base_url=roomy_api.url, timeout=timeout, limits=limits) as http:
        tally = StreamTally()
        expected_streams = TURNS * RESUMES_PER_TURN
        chat_ids: list[str] = []
        turns_started = asyncio.Event()

        async def send() -> tuple[str, list[SseEvent]]:
            body = {"message": "go", **PACED}
            async with http.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as sent:
                chat_id = sent.headers["x-chat-id"]
                chat_ids.append(chat_id)
                if len(chat_ids) == TURNS:
                    turns_started.set()
                return chat_id, await read_stream(sent, StreamTally(), 0)

        async def resume(chat_id: str) -> tuple[str, list[SseEvent]]:
            path = f"/v1/chats/{chat_id}/stream"
            async with http.stream("GET", path, headers=tenant.headers) as resumed:
                return chat_id, await read_stream(resumed, tally, expected_streams)

        sends = [asyncio.create_task(send()) for _ in range(TURNS)]
        async with asyncio.timeout(OPEN_ALL_SECONDS):
            await turns_started.wait()
        resumes = [
            asyncio.create_task(resume(chat_id))
            for chat_id in chat_ids
            for _ in range(RESUMES_PER_TURN)
        ]
        async with asyncio.timeout(OPEN_ALL_SECONDS):
            await tally.all_opened.wait()
        assert tally.ended_before_all_opened == 0, "the streams were never all open at once"

        # With every stream open, the api answers and a new turn streams to its end; then stops
        # (answered while the streams are open too) end every stream.
        assert (await http.get("/healthz")).status_code == 200
        response, events = await send_and_collect(
            http, tenant.headers, {"message": "still here", "providerOptions": FAST}
        )
        assert response.status_code == 200
        assert text_of(chunks_of(events)) == "still here"
        # Redis connections: the pool's cap and the reader's own, however many streams are open.
        connections = redis_connections_of(roomy_api.process, redis_port(roomy_api.settings))
        cap = roomy_api.settings.redis_max_connections
        assert len(connections) <= cap + roomy_api.settings.stream_reader_connections
        assert tally.ended == 0

        # The stops go out on new connections. The test's own client may read the streams seconds
        # behind the api on a loaded machine, so a kept-alive connection it picks up can already be
        # past the api's keep-alive timeout, and a POST is not retried when the api closes it.
        async with httpx.AsyncClient(base_url=roomy_api.url, timeout=timeout) as stopper:
            stops = await asyncio.gather(
                *(
                    stopper.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
                    for chat_id in chat_ids
                )
            )
        assert [stop.json()["stopped"] for stop in stops] == [True] * TURNS
        async with asyncio.timeout(FINISH_ALL_SECONDS):
            finished = await asyncio.gather(*resumes)
            sent_events = await asyncio.gather(*sends)

        stored = {
            chat_id: stored_text((await get_chat(http, tenant.headers, chat_id))["messages"][-1])
            for chat_id in chat_ids
        }
    for chat_id, events in finished:
        assert_whole_stream(events, stored[chat_id])
        assert [chunk["type"] for chunk in chunks_of(events)[-2:]] == ["abort", "finish"]
    for chat_id, events in sent_events:
        assert_whole_stream(events, stored[chat_id])
    assert all(stored.values()), "every turn streamed words before it was stopped"


async def test_an_exhausted_redis_pool_is_a_503_with_retry_after_not_a_hang(
    tiny_pool_api: Replica, tenant: Tenant, redis: Redis
) -> None:
    port = redis_port(tiny_pool_api.settings)

    async def replica_is_waiting_on_redis() -> bool:
        ports = set(redis_connections_of(tiny_pool_api.process, port))
        clients = await redis.client_list()
        return any(
            int(client["addr"].rpartition(":")[2]) in ports and "b" in client["flags"]
            for client in clients
        )

    body = {"message": "one two", "providerOptions": FAST}
    async with httpx.AsyncClient(base_url=tiny_pool_api.url, timeout=30) as http:
        # Writes pause, so the first send's rate-limit hit holds the only pooled connection.
        await redis.client_pause(10_000, all=False)
        try:
            first = asyncio.create_task(send_and_collect(http, tenant.headers, body))
            await eventually(replica_is_waiting_on_redis, "the first send waiting on Redis", 10)

            second = await http.post("/v1/chats", json=body, headers=tenant.headers)
            healthz = await http.get("/healthz")
            still_paused = await replica_is_waiting_on_redis()
        finally:
            await redis.client_unpause()

        problem = assert_problem(second, 503)
        assert problem["type"] == "/problems/service-unavailable"
        assert int(second.headers["retry-after"]) >= 1
        assert problem["retryAfter"] == int(second.headers["retry-after"])
        assert healthz.status_code == 200
        assert still_paused, "the 503 came while the pool was still busy, not after it freed"

        # Once Redis answers again, the first send goes through as if nothing happened.
        response, events = await first
        assert response.status_code == 200
        assert text_of(chunks_of(events)) == "one two"
        again, _ = await send_and_collect(http, tenant.headers, body)
        assert again.status_code == 200
