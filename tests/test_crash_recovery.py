"""Crash recovery, each shown by a test that kills real processes.

This module runs on its own stack (Temporal, Postgres and Valkey on free ports in a temporary data
directory, its own api and worker processes, its own task queue), so killing and restarting things
here never disturbs the session-wide stack the other tests share.

Every scenario prints what it observed (`[crash-recovery] ...`, shown with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from devstack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedService
from devstack.ports import free_port_block
from devstack.stack import ServiceStack
from storage.db import create_engine, create_session_factory
from storage.migrations import upgrade_database
from storage.models import Attachment, Message, Turn, UsageEntry
from tests.conftest import REMOTE_FILES_HOST, Tenant, make_tenant, process_environment
from tests.support.ai_client import run_ai_client
from tests.support.chat_api import stored_text
from tests.support.file_server import FileServer
from tests.support.processes import ServiceProcess, wait_until_ready
from tests.support.sse import SseEvent, assembled_text, iter_sse, text_of

WORDS = 80
# 80 words, 50 ms apart: a turn of about 4 s, long enough to break something in the middle of it.
PACED = {"local": {"words": WORDS, "delayMs": 50}}
# About 8 s: an api started after the kill (a few seconds) still finds the turn live.
LONG_WORDS = 160
LONG = {"local": {"words": LONG_WORDS, "delayMs": 50}}
HEARTBEAT_TIMEOUT_S = 5.0


def report(scenario: str, **figures: object) -> None:
    details = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[crash-recovery] {scenario}: {details}")


# --- the module's own stack -----------------------------------------------------------------------


@dataclass
class CrashStack:
    """Services this module may kill: the embedded servers and every api / worker it started."""

    settings: Settings
    services: ServiceStack
    log_dir: Path
    api_url: str = ""
    processes: list[ServiceProcess] = field(default_factory=list)
    api: ServiceProcess | None = None
    worker: ServiceProcess | None = None

    @property
    def environment(self) -> dict[str, str]:
        return process_environment(self.settings)

    def service(self, kind: type[EmbeddedService]) -> Any:
        return next(service for service in self.services.services if isinstance(service, kind))

    @property
    def redis(self) -> EmbeddedRedis:
        redis: EmbeddedRedis = self.service(EmbeddedRedis)
        return redis

    @property
    def postgres(self) -> EmbeddedPostgres:
        postgres: EmbeddedPostgres = self.service(EmbeddedPostgres)
        return postgres

    def _process(self, role: str, environment: dict[str, str]) -> ServiceProcess:
        log_dir = self.log_dir / f"{role}-{len(self.processes) + 1}"
        log_dir.mkdir(parents=True)
        process = ServiceProcess(role, environment, log_dir)
        self.processes.append(process)
        process.start()
        return process

    def start_worker(self) -> ServiceProcess:
        self.worker = self._process("worker", self.environment)
        return self.worker

    def start_api(self) -> ServiceProcess:
        """Start an api on a fresh port and make it the one tests talk to."""
        port = free_port_block()
        self.api = self._process("api", {**self.environment, "DURACHAT_API_PORT": str(port)})
        self.api_url = f"http://{self.settings.api_host}:{port}"
        wait_until_ready(self.api_url, self.api)
        return self.api

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.log_path}\n{process.log_tail(3000)}" for process in self.processes
        )


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashStack]:
    settings = Settings(
        environment="test",
        data_dir=tmp_path_factory.mktemp("crash-data"),
        embedded_postgres_port=free_port_block(),
        embedded_redis_port=free_port_block(),
        embedded_temporal_port=free_port_block((0, 10, 11)),
        embedded_temporal_ui=False,
        embedded_s3_port=free_port_block(tuple(range(10))),
        temporal_task_queue=f"durachat-crash-{uuid.uuid4().hex[:8]}",
        stream_ping_seconds=1,
        outbound_allowed_hosts=[REMOTE_FILES_HOST],
        # Priced, so the usage ledger's settlement after a crash has a cost to get right.
        models=[{"id": "local/lorem", "promptPpm": "1.5", "completionPpm": "6"}],
    )
    services = ServiceStack(settings, redis_persistent=False)
    services.start()
    stack: CrashStack | None = None
    try:
        endpoints = services.endpoints
        upgrade_database(endpoints.database_url)
        settings = settings.model_copy(
            update={
                "database_url": endpoints.database_url,
                "redis_url": endpoints.redis_url,
                "temporal_address": endpoints.temporal_address,
                "s3_endpoint_url": endpoints.s3_endpoint_url,
            }
        )
        stack = CrashStack(settings, services, tmp_path_factory.mktemp("crash-logs"))
        stack.start_worker()
        stack.start_api()
        yield stack
    finally:
        if stack is not None:
            stack.stop_processes()
        services.stop()


@pytest.fixture(scope="module")
async def crash_sessions(
    crash_stack: CrashStack,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(crash_stack.settings.resolved_database_url, pool_size=2)
    yield create_session_factory(engine)
    await engine.dispose()


@pytest.fixture(scope="module")
async def crash_tenant(crash_sessions: async_sessionmaker[AsyncSession]) -> Tenant:
    return await make_tenant(crash_sessions)


@pytest.fixture(scope="module")
async def http(crash_stack: CrashStack) -> AsyncIterator[httpx.AsyncClient]:
    # Generous read timeout: a relay blocks up to 5 s per XREAD (with 1 s pings in between).
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        yield client


# --- reading a stream in the background -----------------------------------------------------------


@dataclass(frozen=True)
class Received:
    at: float
    event: SseEvent


class StreamReader:
    """Reads one SSE response in a background task, timestamping every event.

    With `resume_base` (an api url) it behaves like a client that reconnects: when the connection
    drops before `[DONE]`, it resumes with `Last-Event-ID` (the last id it saw) and records the drop.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        headers: dict[str, str],
        body: dict[str, Any] | None = None,
        *,
        resume_base: str | None = None,
        max_drops: int = 20,
    ) -> None:
        self.received: list[Received] = []
        self.status: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.body: bytes = b""
        self.error: BaseException | None = None
        self.drops: list[tuple[float, str]] = []
        self.ended_at: float | None = None
        self.opened = asyncio.Event()
        self._client = client
        self._headers = headers
        self._resume_base = resume_base
        self._max_drops = max_drops
        self._task = asyncio.create_task(self._read(method, url, body))

    @property
    def chat_id(self) -> str:
        assert self.response_headers is not None, "no response yet"
        return self.response_headers["x-chat-id"]

    @property
    def last_id(self) -> str:
        return next(item.event.id for item in reversed(self.received) if item.event.id)

    async def _read(self, method: str, url: str, body: dict[str, Any] | None) -> None:
        headers = self._headers
        try:
            while True:
                lost = await self._request(method, url, headers, body)
                if lost is None:
                    return
                self.drops.append((time.monotonic(), lost))
                if self._resume_base is None or len(self.drops) > self._max_drops:
                    return
                await asyncio.sleep(0.2)
                method, body = "GET", None
                url = f"{self._resume_base}/v1/chats/{self.chat_id}/stream"
                headers = {**self._headers, "Last-Event-ID": self.last_id}
        finally:
            self.ended_at = time.monotonic()
            self.opened.set()

    async def _request(
        self, method: str, url: str, headers: dict[str, str], body: dict[str, Any] | None
    ) -> str | None:
        """None when reading is over; otherwise how the connection was lost."""
        first = not self.opened.is_set()
        try:
            async with self._client.stream(method, url, json=body, headers=headers) as response:
                if first:
                    self.status = response.status_code
                    self.response_headers = response.headers
                    self.opened.set()
                if response.status_code != 200:
                    content = await response.aread()
                    if first:
                        self.body = content
                        return None
                    return f"resume answered {response.status_code} {content[:200]!r}"
                async for event in iter_sse(response):
                    self.received.append(Received(time.monotonic(), event))
        except httpx.HTTPError as error:
            self.error = error
            return f"{type(error).__name__}: {error}"
        return None if self.done else "the response ended without [DONE]"

    @property
    def events(self) -> list[SseEvent]:
        return [item.event for item in self.received]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [item.event.chunk for item in self.received if item.event.data != "[DONE]"]

    @property
    def types(self) -> list[str]:
        return [chunk["type"] for chunk in self.chunks]

    @property
    def done(self) -> bool:
        return any(item.event.data == "[DONE]" for item in self.received)

    def deltas(self) -> int:
        return self.types.count("text-delta")

    def first(self, kind: str, after: float = 0.0) -> Received:
        for item in self.received:
            if (
                item.at >= after
                and item.event.data != "[DONE]"
                and item.event.chunk["type"] == kind
            ):
                return item
        raise AssertionError(f"no {kind} after {after} in the stream: {self.types}")

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not condition():
            if self.ended_at is not None:
                raise AssertionError(
                    f"the stream ended first (status {self.status}, drops {self.drops}): "
                    f"{self.types[-10:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s")
            await asyncio.sleep(0.01)

    async def finish(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def started_wall(worker: ServiceProcess) -> float | None:
    """When the worker logged `worker.started` (its log lines start with an ISO UTC timestamp)."""
    for line in worker.log_tail(20_000).splitlines():
        if "worker.started" in line:
            return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    return None


def entry_seconds(event: SseEvent) -> float:
    """When Redis stored the event: its cursor is `<turn id>:<ms>-<seq>`."""
    assert event.id
    return int(event.id.rpartition(":")[2].partition("-")[0]) / 1000


def turn_id_of(chunks: list[dict[str, Any]]) -> str:
    turn_id: str = chunks[0]["messageMetadata"]["turnId"]
    return turn_id


async def settled_answer(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    chat_id: str,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """The chat's last message once it is no longer streaming; tolerates an api that is unwell."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = await client.get(f"{url}/v1/chats/{chat_id}", headers=headers)
        except httpx.HTTPError as error:
            last = error
        else:
            last = f"{response.status_code} {response.text[:300]}"
            if response.status_code == 200:
                message: dict[str, Any] = response.json()["messages"][-1]
                last = message
                if message["role"] == "assistant" and message["status"] != "streaming":
                    return message
        await asyncio.sleep(0.1)
    raise AssertionError(f"the answer did not settle in {timeout}s; last seen: {last}")


async def assistant_rows(
    sessions: async_sessionmaker[AsyncSession], turn_id: str
) -> tuple[list[Message], Turn]:
    async with sessions() as session:
        messages = (
            (
                await session.execute(
                    select(Message).where(Message.turn_id == turn_id, Message.role == "assistant")
                )
            )
            .scalars()
            .all()
        )
        turn = (await session.execute(select(Turn).where(Turn.id == turn_id))).scalar_one()
    return list(messages), turn


def start_turn(
    client: httpx.AsyncClient,
    stack: CrashStack,
    tenant: Tenant,
    *,
    reconnect: bool = False,
    options: dict[str, Any] = PACED,
) -> StreamReader:
    body = {"message": "tell me a story", "model": "local/lorem", "providerOptions": options}
    return StreamReader(
        client,
        "POST",
        f"{stack.api_url}/v1/chats",
        tenant.headers,
        body,
        resume_base=stack.api_url if reconnect else None,
        max_drops=200,
    )


async def assert_ai_client_assembles(
    chunks: list[dict[str, Any]], stored: dict[str, Any], *, from_start: bool = True
) -> None:
    """The real `ai` client, given every chunk a client received, assembles the stored message.

    A resume served from Postgres (`from_start=False`) has no `start`: the client already holds
    the message's id from before, so only the parts are compared.
    """
    result = await run_ai_client({"mode": "assemble", "chunks": chunks})
    assert result["error"] is None, result["error"]
    parts = stored["parts"]
    if from_start:
        assert result["message"]["id"] == stored["id"]
    else:
        # The client kept the open step from before; the resume sends what goes into it.
        parts = [part for part in parts if part["type"] != "step-start"]
    assert result["message"]["parts"] == parts


def last_index(types: list[str], kind: str) -> int:
    return len(types) - 1 - types[::-1].index(kind)


def drops_since(reader: StreamReader, since: float) -> list[str]:
    return [f"+{at - since:.2f}s {what[:90]}" for at, what in reader.drops]


# --- 1. worker killed mid-generation --------------------------------------------------------------


@dataclass
class WorkerCrash:
    sender: StreamReader  # the client that sent the message; resumes by cursor when dropped
    connected: StreamReader  # a second client that only stays connected
    killed_at: float
    killed_wall: float
    answer: dict[str, Any]
    messages: list[Message]
    turn: Turn


@pytest.fixture(scope="module")
async def worker_crash(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> WorkerCrash:
    sender = start_turn(http, crash_stack, crash_tenant, reconnect=True)
    await sender.wait_for(lambda: sender.deltas() >= 1)
    connected = StreamReader(
        http, "GET", f"{crash_stack.api_url}/v1/chats/{sender.chat_id}/stream", crash_tenant.headers
    )
    await sender.wait_for(lambda: sender.deltas() >= 15)
    await connected.wait_for(lambda: connected.deltas() >= 15)
    old_worker = crash_stack.worker
    assert old_worker is not None
    old_worker.kill()
    killed_at, killed_wall = time.monotonic(), time.time()
    new_worker = crash_stack.start_worker()

    await sender.finish(timeout=60)
    with contextlib.suppress(TimeoutError):
        await connected.finish(timeout=15)
    if connected.ended_at is None:
        await connected.cancel()
    answer = await settled_answer(http, crash_stack.api_url, crash_tenant.headers, sender.chat_id)
    messages, turn = await assistant_rows(crash_sessions, turn_id_of(sender.chunks))

    figures: dict[str, object] = {"attempts": turn.attempts, "stored_status": answer["status"]}
    types = sender.types
    if "reset-step" in types:
        reset = sender.first("reset-step", after=killed_at)
        delta = sender.first("text-delta", after=reset.at)
        figures |= {
            "deltas_before_kill": types[: last_index(types, "reset-step")].count("text-delta"),
            "kill_to_reset_step_written_s": round(entry_seconds(reset.event) - killed_wall, 2),
            "kill_to_first_post_reset_delta_written_s": round(
                entry_seconds(delta.event) - killed_wall, 2
            ),
            "kill_to_reset_step_received_s": round(reset.at - killed_at, 2),
            "kill_to_first_post_reset_delta_received_s": round(delta.at - killed_at, 2),
        }
    if sender.done:
        figures["kill_to_finish_received_s"] = round(sender.first("finish").at - killed_at, 2)
    started = started_wall(new_worker)
    figures["kill_to_new_worker_started_s"] = round(started - killed_wall, 2) if started else None
    figures["sender_drops"] = drops_since(sender, killed_at)
    figures["connected_client"] = f"done={connected.done} drops={drops_since(connected, killed_at)}"
    report("worker SIGKILL", **figures)
    return WorkerCrash(sender, connected, killed_at, killed_wall, answer, messages, turn)


async def test_worker_killed_mid_generation_turn_resumes_on_another_worker(
    worker_crash: WorkerCrash,
) -> None:
    sender = worker_crash.sender
    assert sender.status == 200
    assert sender.done, (sender.types[-5:], sender.drops)
    types = sender.types
    assert types[0] == "start"
    assert types[-1] == "finish"
    assert "reset-step" in types, "the retried attempt tells clients to drop the failed one's parts"
    assert "start-step" not in types[last_index(types, "reset-step") :]
    ids = [event.id for event in sender.events if event.data != "[DONE]"]
    assert len(ids) == len(set(ids)), "no event twice, also across reconnections"

    stored = stored_text(worker_crash.answer)
    assert worker_crash.answer["status"] == "complete"
    assert assembled_text(sender.chunks) == stored, "the full answer after the reset"
    assert len(stored.split()) == WORDS

    reset = sender.first("reset-step", after=worker_crash.killed_at)
    delta = sender.first("text-delta", after=reset.at)
    resumed_after = entry_seconds(delta.event) - worker_crash.killed_wall
    assert resumed_after < HEARTBEAT_TIMEOUT_S + 10, f"resumed {resumed_after:.1f}s after the kill"

    await assert_ai_client_assembles(sender.chunks, worker_crash.answer)

    assert len(worker_crash.messages) == 1, "exactly one assistant message for the turn"
    assert worker_crash.messages[0].status == "complete"
    assert worker_crash.turn.status == "completed"
    assert worker_crash.turn.attempts == 2


async def test_worker_killed_mid_generation_settles_the_ledger_exactly_once(
    worker_crash: WorkerCrash, crash_sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The turn's ledger row is settled once, at the cost its attempts recorded: the attempt that
    completed after the kill. (The killed attempt reported no usage before it died, so it has no
    entry: docs/decisions.md "Cost and budgets".)"""
    turn = worker_crash.turn
    async with crash_sessions() as session:
        entries = (
            await session.scalars(select(UsageEntry).where(UsageEntry.turn_id == turn.id))
        ).all()
    [entry] = entries
    assert entry.state == "settled"
    assert turn.cost_usd is not None
    assert turn.cost_usd > 0
    assert entry.cost_usd == turn.cost_usd
    assert entry.input_tokens == turn.input_tokens
    assert entry.output_tokens == turn.output_tokens
    log = turn.attempt_log or []
    assert sum(Decimal(attempt["costUsd"]) for attempt in log) == turn.cost_usd
    assert [attempt["outcome"] for attempt in log] == ["completed"]
    expected = (turn.input_tokens * Decimal("1.5") + turn.output_tokens * 6) / 1_000_000
    assert turn.cost_usd == expected


async def test_worker_killed_mid_generation_connected_client_stays_connected(
    worker_crash: WorkerCrash,
) -> None:
    """The api relays from Redis, so a client's connection outlives the worker; the stream is quiet
    for longer than the heartbeat timeout meanwhile, which the relay must ride out (pings)."""
    connected = worker_crash.connected
    assert connected.drops == [], drops_since(connected, worker_crash.killed_at)
    assert connected.done
    assert assembled_text(connected.chunks) == stored_text(worker_crash.answer)


# --- 2. api killed mid-stream ---------------------------------------------------------------------


async def test_api_killed_mid_stream_client_resumes_on_a_new_api(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> None:
    reader = start_turn(http, crash_stack, crash_tenant, options=LONG)
    await reader.wait_for(lambda: reader.deltas() >= 15)
    old_api = crash_stack.api
    assert old_api is not None
    old_api.kill()
    killed_at = time.monotonic()
    await reader.finish(timeout=10)
    first_part = [event for event in reader.events if event.data != "[DONE]"]
    assert not reader.done, "the old api died before the end of the turn"

    crash_stack.start_api()
    api_ready_at = time.monotonic()
    resumed = StreamReader(
        http,
        "GET",
        f"{crash_stack.api_url}/v1/chats/{reader.chat_id}/stream",
        {**crash_tenant.headers, "Last-Event-ID": reader.last_id},
    )
    await resumed.finish(timeout=30)
    rest = [event for event in resumed.events if event.data != "[DONE]"]
    live = [item for item in resumed.received if item.event.data != "[DONE]"]
    report(
        "api SIGKILL",
        client_saw=f"{len(first_part)} events, then {reader.drops[0][1] if reader.drops else '?'}",
        kill_to_new_api_ready_s=round(api_ready_at - killed_at, 2),
        resumed_events=len(rest),
        resumed_first_to_last_s=round(live[-1].at - live[0].at, 2) if live else None,
        kill_to_finish_received_s=round(live[-1].at - killed_at, 2) if live else None,
        resume_drops=resumed.drops,
    )
    assert resumed.status == 200, resumed.body
    assert resumed.drops == []
    assert resumed.done

    combined = first_part + rest
    ids = [event.id for event in combined]
    assert all(ids)
    assert len(ids) == len(set(ids)), "no event twice"
    chunks = [event.chunk for event in combined]
    assert chunks[0]["type"] == "start"
    assert chunks[-1]["type"] == "finish"
    assert "reset-step" not in [chunk["type"] for chunk in chunks]
    answer = await settled_answer(http, crash_stack.api_url, crash_tenant.headers, reader.chat_id)
    assert answer["status"] == "complete"
    assert text_of(chunks) == stored_text(answer), "no gap"
    await assert_ai_client_assembles(chunks, answer)
    assert len(stored_text(answer).split()) == LONG_WORDS
    messages, _turn = await assistant_rows(crash_sessions, turn_id_of(chunks))
    assert len(messages) == 1


# --- 3. Postgres down for a while -----------------------------------------------------------------


@dataclass
class PostgresOutage:
    reader: StreamReader
    answer: dict[str, Any]
    messages: list[Message]
    turn: Turn


async def postgres_outage(
    stack: CrashStack,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    outage_s: float,
) -> PostgresOutage:
    """Stop Postgres 1.5 s into a turn, start it again `outage_s` later on the same port and data."""
    postgres = stack.postgres
    posted_at = time.monotonic()
    reader = start_turn(http, stack, tenant, reconnect=True)
    await reader.wait_for(lambda: reader.deltas() >= 1)
    turn_id = turn_id_of(reader.chunks)
    await asyncio.sleep(max(0.0, posted_at + 1.5 - time.monotonic()))

    stopped_at = time.monotonic()
    try:
        await asyncio.to_thread(postgres.stop)
        down_at = time.monotonic()
        await asyncio.sleep(outage_s)
    finally:
        restart_at = time.monotonic()
        postgres.start()  # from the main thread, like the stack did
        await asyncio.to_thread(postgres.wait_ready, 60)
    back_at = time.monotonic()

    answer = await settled_answer(http, stack.api_url, tenant.headers, reader.chat_id)
    settled_at = time.monotonic()
    await reader.finish(timeout=30)
    messages, turn = await assistant_rows(sessions, turn_id)
    types = reader.types
    report(
        f"postgres outage of {outage_s:g} s",
        stopped_after_post_s=round(stopped_at - posted_at, 2),
        deltas_before_stop=sum(
            item.at < stopped_at
            and item.event.data != "[DONE]"
            and item.event.chunk["type"] == "text-delta"
            for item in reader.received
        ),
        stop_took_s=round(down_at - stopped_at, 2),
        down_s=round(back_at - down_at, 2),
        restart_took_s=round(back_at - restart_at, 2),
        back_to_settled_s=round(settled_at - back_at, 2),
        post_to_settled_s=round(settled_at - posted_at, 2),
        stored_status=answer["status"],
        stored_words=len(stored_text(answer).split()),
        error=answer["metadata"].get("error"),
        attempts=turn.attempts,
        reset_steps=types.count("reset-step"),
        stream_end=types[-1:],
        client_drops=len(reader.drops),
        first_drops=drops_since(reader, stopped_at)[:2],
    )
    return PostgresOutage(reader, answer, messages, turn)


def assert_completed_after_outage(outage: PostgresOutage) -> None:
    answer, reader = outage.answer, outage.reader
    assert answer["status"] == "complete", answer
    assert len(stored_text(answer).split()) == WORDS
    assert len(outage.messages) == 1
    assert outage.turn.status == "completed"
    assert reader.done
    assert reader.types[-1] == "finish"
    assert assembled_text(reader.chunks) == stored_text(answer)


async def test_postgres_down_for_a_while_mid_turn(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> None:
    outage = await postgres_outage(crash_stack, crash_tenant, crash_sessions, http, outage_s=5)
    assert_completed_after_outage(outage)
    await assert_ai_client_assembles(outage.reader.chunks, outage.answer)


async def test_postgres_down_longer_than_the_generation_retries_mid_turn(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> None:
    """Longer than all generation attempts' backoff (1 + 2 + 4 s): generation waits for the database
    in place instead of spending provider attempts, so the streamed answer is kept."""
    outage = await postgres_outage(crash_stack, crash_tenant, crash_sessions, http, outage_s=14)
    assert_completed_after_outage(outage)


# --- 5. queued turns across api and worker restarts ---------------------------------------------


async def test_queued_turns_survive_api_and_worker_kills_and_keep_their_order(
    crash_stack: CrashStack, crash_tenant: Tenant, http: httpx.AsyncClient
) -> None:
    reader = start_turn(http, crash_stack, crash_tenant, options=LONG)
    await reader.wait_for(lambda: reader.deltas() >= 5)
    chat_url = f"{crash_stack.api_url}/v1/chats/{reader.chat_id}"
    texts = ["one", "two", "three"]
    for position, text in enumerate(texts, start=1):
        body = {"message": text, "model": "local/echo", "ifBusy": "queue"}
        async with http.stream("POST", chat_url, json=body, headers=crash_tenant.headers) as sent:
            assert sent.status_code == 200
            assert sent.headers["x-queue-position"] == str(position)
        # The client goes away at once: a queued turn never depends on its sender.

    for process in (crash_stack.api, crash_stack.worker):
        assert process is not None
        process.kill()
    killed_at = time.monotonic()
    await reader.cancel()
    crash_stack.start_worker()
    crash_stack.start_api()

    deadline = time.monotonic() + 90
    chat: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await http.get(
            f"{crash_stack.api_url}/v1/chats/{reader.chat_id}", headers=crash_tenant.headers
        )
        chat = response.json()
        if (
            chat["activeTurnId"] is None
            and not chat["queuedTurnIds"]
            and len(chat["messages"]) == 8
        ):
            break
        await asyncio.sleep(0.2)
    report(
        "queued turns, api and worker SIGKILL",
        kill_to_all_answered_s=round(time.monotonic() - killed_at, 2),
        messages=len(chat.get("messages", [])),
    )
    messages = chat["messages"]
    assert chat["activeTurnId"] is None, chat
    assert chat["queuedTurnIds"] == [], chat
    assert messages[1]["status"] == "complete", "the interrupted turn resumed and finished"
    assert len(stored_text(messages[1]).split()) == LONG_WORDS
    assert [(m["role"], stored_text(m)) for m in messages[2:]] == [
        (role, text) for text in texts for role in ("user", "assistant")
    ]


# --- 4. Redis restarted without persistence -------------------------------------------------------
# Last in the module: after the restart the worker's Redis pool still holds connections to the old
# server, and the first use of one (a health-check PING after 10 s idle) raises ConnectionError and
# fails a generation attempt of whatever turn runs next, which would muddle the other scenarios.


async def _resume_with_cursor(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], cursor: str
) -> tuple[StreamReader, float]:
    started = time.monotonic()
    reader = StreamReader(client, "GET", url, {**headers, "Last-Event-ID": cursor})
    try:
        await reader.finish(timeout=20)
    except TimeoutError:
        await reader.cancel()
        raise AssertionError(
            f"a resume whose cursor is gone hung for 20 s: {reader.types}"
        ) from None
    return reader, time.monotonic() - started


def _describe(reader: StreamReader) -> str:
    types = reader.types
    errors = [chunk.get("errorText") for chunk in reader.chunks if chunk["type"] == "error"]
    return (
        f"status={reader.status} chunks={len(types)} first={types[:3]} last={types[-2:]} "
        f"done={reader.done} error_chunks={errors} drops={[what for _, what in reader.drops]} "
        f"body={reader.body[:200]!r}"
    )


def _stored_message_or_clear_error(reader: StreamReader, stored: str) -> bool:
    if reader.status is not None and reader.status >= 400:
        return True
    chunks = reader.chunks
    if any(chunk["type"] == "error" for chunk in chunks):
        return True
    return reader.done and chunks[-1]["type"] == "finish" and assembled_text(chunks) == stored


async def test_redis_restarted_without_persistence_mid_turn(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> None:
    redis = crash_stack.redis
    reader = start_turn(http, crash_stack, crash_tenant)
    await reader.wait_for(lambda: reader.deltas() >= 15)
    cursor = reader.last_id
    turn_id = turn_id_of(reader.chunks)
    stream_url = f"{crash_stack.api_url}/v1/chats/{reader.chat_id}/stream"

    stopped_at = time.monotonic()
    try:
        await asyncio.to_thread(redis.stop)
    finally:
        redis.start()  # from this (the main) thread: the server dies with the thread that spawned it
        await asyncio.to_thread(redis.wait_ready, 30)
    back_at = time.monotonic()

    # At once, while the turn's stream is gone from the new Redis.
    early, early_s = await _resume_with_cursor(http, stream_url, crash_tenant.headers, cursor)
    answer = await settled_answer(http, crash_stack.api_url, crash_tenant.headers, reader.chat_id)
    settled_at = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await reader.finish(timeout=15)
    if reader.ended_at is None:
        await reader.cancel()
    # After the turn ended.
    late, late_s = await _resume_with_cursor(http, stream_url, crash_tenant.headers, cursor)
    messages, turn = await assistant_rows(crash_sessions, turn_id)
    live_types = reader.types
    report(
        "redis restart",
        redis_stop_to_ready_s=round(back_at - stopped_at, 2),
        redis_back_to_settled_s=round(settled_at - back_at, 2),
        stored_status=answer["status"],
        stored_words=len(stored_text(answer).split()),
        error=answer["metadata"].get("error"),
        attempts=turn.attempts,
        live_client=(
            f"{len(live_types)} chunks, resets={live_types.count('reset-step')}, "
            f"done={reader.done}, last={live_types[-2:]}, drops={drops_since(reader, stopped_at)}"
        ),
        early_resume=f"took {early_s:.2f}s {_describe(early)}",
        late_resume=f"took {late_s:.2f}s {_describe(late)}",
    )

    assert answer["status"] == "complete", answer
    assert len(stored_text(answer).split()) == WORDS
    assert len(messages) == 1
    stored = stored_text(answer)
    assert _stored_message_or_clear_error(early, stored), _describe(early)
    assert _stored_message_or_clear_error(late, stored), _describe(late)
    if late.done and late.chunks[-1]["type"] == "finish":
        await assert_ai_client_assembles(late.chunks, answer, from_start=False)


# --- 5. worker killed while it fetches a remote file ----------------------------------------------


async def test_worker_killed_during_a_fetch_retries_it_without_duplicates(
    crash_stack: CrashStack,
    crash_tenant: Tenant,
    crash_sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
) -> None:
    photo = io.BytesIO()
    Image.effect_noise((600, 400), 64).convert("RGB").save(photo, format="PNG")
    body = photo.getvalue()
    with FileServer(REMOTE_FILES_HOST) as files:
        # About 0.2 s a 64 KiB piece: the download is still running when the worker dies.
        url = files.serve_slowly("/slow/photo.png", body, "image/png", piece_delay=0.2)
        sending = asyncio.create_task(
            http.post(
                f"{crash_stack.api_url}/v1/chats?stream=false",
                json={
                    "model": "local/echo",
                    "providerOptions": {"local": {"delayMs": 0}},
                    "messages": [
                        {
                            "id": f"m_{uuid.uuid4().hex[:8]}",
                            "role": "user",
                            "parts": [
                                {"type": "file", "mediaType": "image/png", "url": url},
                                {"type": "text", "text": "what is this"},
                            ],
                        }
                    ],
                },
                headers=crash_tenant.headers,
                timeout=120,
            )
        )
        deadline = time.monotonic() + 30
        while not files.requests:
            assert time.monotonic() < deadline, crash_stack.logs()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        old_worker = crash_stack.worker
        assert old_worker is not None
        old_worker.kill()
        crash_stack.start_worker()
        sent = await sending
        assert sent.status_code == 200, sent.text + crash_stack.logs()
        fetches = len(files.requests)
    answer = sent.json()
    assert answer["status"] == "completed"
    assert "[image: image/jpeg" in stored_text(answer["message"])
    async with crash_sessions() as session:
        rows = (
            (
                await session.execute(
                    select(Attachment).where(
                        Attachment.organization_id == crash_tenant.organization_id
                    )
                )
            )
            .scalars()
            .all()
        )
    [attachment] = rows
    assert (attachment.status, attachment.size) == ("stored", len(body))
    assert attachment.variant_name is not None
    report("worker SIGKILL during a fetch", fetches=fetches)
    assert fetches == 2
