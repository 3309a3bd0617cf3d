"""Limits: oversized bodies (413), long messages (400), per-key rate limits for sends and stream opens,
the cap on open streams per key and on running turns per organization (429 with Retry-After).

Two extra api processes with low limits share the session's Postgres, Redis, Temporal and worker, the
way replicas behind a load balancer share them: whatever one counts, the other sees.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from devstack.ports import free_port_block
from storage import api_keys
from storage.limits import StreamLeases
from storage.models import Chat
from tests.conftest import RunningServices, Tenant, make_tenant, process_environment
from tests.support.chat_api import assert_problem, send_and_collect, wait_for_settled_answer
from tests.support.processes import ServiceProcess, wait_until_ready
from tests.support.sse import SseEvent, iter_sse

LOW_LIMITS: dict[str, Any] = {
    "max_request_bytes": 4096,
    # Sends may carry files (`data:` URLs), so their bodies are bounded by the upload limit.
    "max_upload_request_bytes": 4096,
    "max_message_chars": 1000,
    "send_rate_limit": "6/minute",
    "stream_open_rate_limit": "6/minute",
    "max_open_streams_per_key": 2,
    "max_active_turns_per_organization": 2,
    # Renewed every second, so a stream that stays open for seconds shows it keeps its slot.
    "stream_lease_seconds": 3,
}
# 400 words, 50 ms apart: a turn that runs for twenty seconds unless stopped.
LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 400, "delayMs": 50}}}


def start_limited_api(settings: Settings, log_dir: Any) -> tuple[ServiceProcess, str]:
    port = free_port_block()
    limited = settings.model_copy(update={**LOW_LIMITS, "api_port": port})
    process = ServiceProcess("api", process_environment(limited), log_dir)
    process.start()
    return process, f"http://{settings.api_host}:{port}"


@dataclass
class Replicas:
    a: httpx.AsyncClient
    b: httpx.AsyncClient


@pytest.fixture(scope="module")
def replica_urls(
    settings: Settings,
    running_services: RunningServices,  # the worker that runs their turns
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    started = [
        start_limited_api(settings, tmp_path_factory.mktemp(f"limited-api-{name}")) for name in "ab"
    ]
    try:
        for process, url in started:
            wait_until_ready(url, process)
        yield started[0][1], started[1][1]
    finally:
        for process, _ in started:
            process.stop()


@pytest.fixture
async def replicas(replica_urls: tuple[str, str]) -> AsyncIterator[Replicas]:
    url_a, url_b = replica_urls
    async with (
        httpx.AsyncClient(base_url=url_a, timeout=30) as a,
        httpx.AsyncClient(base_url=url_b, timeout=30) as b,
    ):
        yield Replicas(a, b)


async def second_key(sessions: async_sessionmaker[AsyncSession], tenant: Tenant) -> Tenant:
    """Another API key of the same organization."""
    async with sessions.begin() as session:
        created = await api_keys.create_key(session, tenant.organization_id, is_admin=True)
    return Tenant(tenant.organization_id, created.id, created.secret)


def assert_too_many(response: httpx.Response, limit: str, *, most_seconds: int = 60) -> None:
    problem = assert_problem(response, 429)
    assert problem["type"] == "/problems/too-many-requests"
    assert problem["limit"] == limit
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= most_seconds
    assert problem["retryAfter"] == retry_after


async def chats_of(sessions: async_sessionmaker[AsyncSession], organization_id: str) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(Chat).where(Chat.organization_id == organization_id)
        )
    return int(count or 0)


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    tenant: Tenant,
    body: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[SseEvent]]]:
    """An SSE response held open (its first event read) until the block ends, as a client would."""
    async with client.stream(method, url, json=body, headers=tenant.headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        events = iter_sse(response)
        await anext(events)
        yield response, events


async def start_long_turn(client: httpx.AsyncClient, tenant: Tenant) -> str:
    """Start a long turn and leave its stream at once; the turn runs on. Returns the chat id."""
    async with open_stream(client, "POST", "/v1/chats", tenant, {"message": "go", **LONG}) as (
        response,
        _,
    ):
        return response.headers["x-chat-id"]


async def eventually(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s")
        await asyncio.sleep(0.05)


async def stop(client: httpx.AsyncClient, tenant: Tenant, chat_id: str) -> None:
    response = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
    assert response.status_code == 200, response.text
    await wait_for_settled_answer(client, tenant.headers, chat_id)


async def test_body_over_the_limit_with_content_length_is_413_and_nothing_is_stored(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    chat_id = uuid.uuid4().hex
    body = json.dumps({"id": chat_id, "message": "x" * 5000}).encode()
    response = await replicas.a.post(
        "/v1/chats",
        content=body,
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert response.request.headers["content-length"] == str(len(body))
    problem = assert_problem(response, 413)
    assert problem["type"] == "/problems/content-too-large"
    assert problem["maxBytes"] == 4096
    assert (await replicas.a.get(f"/v1/chats/{chat_id}", headers=tenant.headers)).status_code == 404
    assert await chats_of(sessions, tenant.organization_id) == 0


async def test_chunked_body_over_the_limit_is_413_and_one_under_it_goes_through(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    def chunked(payload: dict[str, Any]) -> Callable[[], AsyncIterator[bytes]]:
        encoded = json.dumps(payload).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(encoded), 256):
                yield encoded[start : start + 256]

        return chunks

    headers = {**tenant.headers, "content-type": "application/json"}
    oversized = uuid.uuid4().hex
    response = await replicas.a.post(
        "/v1/chats",
        content=chunked({"id": oversized, "message": "x" * 20_000})(),
        headers=headers,
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413)
    assert (
        await replicas.a.get(f"/v1/chats/{oversized}", headers=tenant.headers)
    ).status_code == 404
    assert await chats_of(sessions, tenant.organization_id) == 0

    # The body held by the limiter reaches the app whole.
    fits = uuid.uuid4().hex
    async with replicas.a.stream(
        "POST",
        "/v1/chats",
        content=chunked({"id": fits, "message": "y " * 400})(),
        headers=headers,
    ) as accepted:
        assert accepted.status_code == 200
        assert accepted.headers["x-chat-id"] == fits
        events = [event async for event in iter_sse(accepted)]
    assert events[-1].data == "[DONE]"
    assert await chats_of(sessions, tenant.organization_id) == 1


async def test_message_longer_than_the_limit_is_a_clear_400_and_nothing_is_stored(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    chat_id = uuid.uuid4().hex
    response = await replicas.b.post(
        "/v1/chats", json={"id": chat_id, "message": "y" * 1001}, headers=tenant.headers
    )
    problem = assert_problem(response, 400)
    assert problem["type"] == "/problems/bad-request"
    assert "1000 characters" in problem["detail"]
    assert await chats_of(sessions, tenant.organization_id) == 0


async def test_send_rate_limit_is_per_key_and_shared_by_replicas(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    chat_id = None
    for index in range(6):
        client = replicas.a if index % 2 == 0 else replicas.b
        path = f"/v1/chats/{chat_id}" if chat_id else "/v1/chats"
        response, events = await send_and_collect(
            client, tenant.headers, {"message": f"message {index}"}, path
        )
        assert response.status_code == 200, response.text
        assert events[-1].data == "[DONE]"
        chat_id = response.headers["x-chat-id"]

    # Each replica saw three sends; together they are the key's six a minute.
    for client in (replicas.a, replicas.b):
        refused = await client.post(
            f"/v1/chats/{chat_id}", json={"message": "one more"}, headers=tenant.headers
        )
        assert_too_many(refused, "sends")
    # Every way of starting a turn counts as a send.
    chat = (await replicas.a.get(f"/v1/chats/{chat_id}", headers=tenant.headers)).json()
    last_user, last_answer = chat["messages"][-2:]
    assert_too_many(
        await replicas.b.post(
            f"/v1/chats/{chat_id}/messages/{last_answer['id']}/regenerate", headers=tenant.headers
        ),
        "sends",
    )
    assert_too_many(
        await replicas.a.post(
            f"/v1/chats/{chat_id}/messages/{last_user['id']}/edit",
            json={"content": "edited"},
            headers=tenant.headers,
        ),
        "sends",
    )
    assert (
        len(
            (await replicas.a.get(f"/v1/chats/{chat_id}", headers=tenant.headers)).json()[
                "messages"
            ]
        )
        == 12
    )

    # Another key, even of the same organization, has its own budget; reading is not limited.
    other = await second_key(sessions, tenant)
    response, _ = await send_and_collect(replicas.b, other.headers, {"message": "hello"})
    assert response.status_code == 200, response.text


async def test_stream_open_rate_limit_is_per_key_and_shared_by_replicas(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    response, _ = await send_and_collect(replicas.a, tenant.headers, {"message": "hi"})
    chat_id = response.headers["x-chat-id"]
    await wait_for_settled_answer(replicas.a, tenant.headers, chat_id)
    path = f"/v1/chats/{chat_id}/stream"
    for index in range(6):
        client = replicas.a if index % 2 == 0 else replicas.b
        assert (await client.get(path, headers=tenant.headers)).status_code == 204
    for client in (replicas.a, replicas.b):
        assert_too_many(await client.get(path, headers=tenant.headers), "streamOpens")

    # Sends have a budget of their own, and other keys are not affected.
    response, _ = await send_and_collect(
        replicas.b, tenant.headers, {"message": "still fine"}, f"/v1/chats/{chat_id}"
    )
    assert response.status_code == 200, response.text
    other = await second_key(sessions, tenant)
    assert (await replicas.a.get(path, headers=other.headers)).status_code == 204


async def test_open_streams_are_capped_per_key_and_a_slot_frees_when_the_client_leaves(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession], redis: Redis
) -> None:
    leases = StreamLeases.key(tenant.organization_id, tenant.key_id)
    async with AsyncExitStack() as streams:
        # Two open streams: a send's (on replica a) and a resume's (on replica b).
        send, _ = await streams.enter_async_context(
            open_stream(replicas.a, "POST", "/v1/chats", tenant, {"message": "go", **LONG})
        )
        chat_id = send.headers["x-chat-id"]
        path = f"/v1/chats/{chat_id}/stream"
        async with open_stream(replicas.b, "GET", path, tenant):
            held = dict(await redis.zrange(leases, 0, -1, withscores=True))
            assert len(held) == 2

            async def renewed() -> bool:
                now = dict(await redis.zrange(leases, 0, -1, withscores=True))
                return now.keys() == held.keys() and all(now[k] > held[k] for k in held)

            # Streams that stay open keep their slots, renewed past their first lease.
            await eventually(renewed, "the renewal of both leases")

            assert_too_many(
                await replicas.a.get(path, headers=tenant.headers), "openStreams", most_seconds=5
            )
            refused = await replicas.b.post(
                "/v1/chats", json={"message": "a third stream"}, headers=tenant.headers
            )
            assert_too_many(refused, "openStreams", most_seconds=5)
            assert await chats_of(sessions, tenant.organization_id) == 1

            # Another key of the organization has slots of its own.
            other = await second_key(sessions, tenant)
            async with open_stream(replicas.a, "GET", path, other):
                pass

        # The resume's client went away: its slot comes back.
        async def one_left() -> bool:
            return await redis.zcard(leases) == 1

        await eventually(one_left, "the release of the closed stream's slot")
        async with open_stream(replicas.a, "GET", path, tenant):
            pass
    await stop(replicas.a, tenant, chat_id)


async def test_a_dead_api_process_gives_its_stream_slots_back(
    replicas: Replicas,
    tenant: Tenant,
    settings: Settings,
    redis: Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    doomed, url = start_limited_api(settings, tmp_path_factory.mktemp("doomed-api"))
    try:
        wait_until_ready(url, doomed)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client, AsyncExitStack() as held:
            send, _ = await held.enter_async_context(
                open_stream(client, "POST", "/v1/chats", tenant, {"message": "go", **LONG})
            )
            chat_id = send.headers["x-chat-id"]
            path = f"/v1/chats/{chat_id}/stream"
            await held.enter_async_context(open_stream(client, "GET", path, tenant))
            assert_too_many(
                await replicas.a.get(path, headers=tenant.headers), "openStreams", most_seconds=5
            )
            # The process dies with both streams open: nothing releases their slots.
            doomed.kill()
    finally:
        doomed.stop()

    leases = StreamLeases.key(tenant.organization_id, tenant.key_id)

    async def lapsed() -> bool:
        return not await redis.exists(leases)

    await eventually(lapsed, "the expiry of the dead process's leases")
    async with open_stream(replicas.a, "GET", path, tenant):
        pass
    await stop(replicas.a, tenant, chat_id)


async def test_running_turns_are_capped_per_organization(
    replicas: Replicas, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> None:
    running = [
        await start_long_turn(replicas.a, tenant),
        await start_long_turn(replicas.b, tenant),
    ]
    try:
        refused = await replicas.a.post(
            "/v1/chats", json={"message": "a third turn", **LONG}, headers=tenant.headers
        )
        assert_too_many(refused, "activeTurns", most_seconds=5)
        # The cap is the organization's: its other keys are refused too...
        colleague = await second_key(sessions, tenant)
        refused = await replicas.b.post(
            "/v1/chats", json={"message": "a third turn", **LONG}, headers=colleague.headers
        )
        assert_too_many(refused, "activeTurns", most_seconds=5)
        assert await chats_of(sessions, tenant.organization_id) == 2

        # ...while another organization is not affected.
        stranger = await make_tenant(sessions)
        other_chat = await start_long_turn(replicas.a, stranger)
        await stop(replicas.a, stranger, other_chat)

        # A turn that ends frees its place.
        await stop(replicas.a, tenant, running.pop(0))
        running.append(await start_long_turn(replicas.b, tenant))
    finally:
        for chat_id in running:
            await stop(replicas.a, tenant, chat_id)


async def test_a_repeated_send_or_an_interrupt_at_the_cap_is_not_refused(
    replicas: Replicas, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)  # its own organization and key: a cap and rate of its own
    repeat_headers = {**tenant.headers, "Idempotency-Key": uuid.uuid4().hex}
    body = {"message": "go", **LONG}
    async with replicas.a.stream("POST", "/v1/chats", json=body, headers=repeat_headers) as sent:
        assert sent.status_code == 200
        first_chat, first_turn = sent.headers["x-chat-id"], sent.headers["x-turn-id"]
    second_chat = await start_long_turn(replicas.b, tenant)
    try:
        # At the cap, the same send again attaches to its running turn instead of being refused.
        async with replicas.b.stream(
            "POST", "/v1/chats", json=body, headers=repeat_headers
        ) as repeated:
            assert repeated.status_code == 200, await repeated.aread()
            assert repeated.headers["x-turn-id"] == first_turn
            assert repeated.headers["x-chat-id"] == first_chat

        # An interrupt takes the place of the turn it stops.
        interrupt = await replicas.a.post(
            f"/v1/chats/{second_chat}",
            json={"message": "instead", "model": "local/echo", "ifBusy": "interrupt"},
            params={"stream": "false"},
            headers=tenant.headers,
            timeout=60,
        )
        assert interrupt.status_code == 200, interrupt.text
        assert interrupt.json()["message"]["status"] == "complete"

        # A turn that would be one more is still refused.
        await stop(replicas.a, tenant, second_chat)
        another_long = await start_long_turn(replicas.a, tenant)
        refused = await replicas.b.post(
            "/v1/chats", json={"message": "one too many", **LONG}, headers=tenant.headers
        )
        assert_too_many(refused, "activeTurns", most_seconds=5)
        await stop(replicas.a, tenant, another_long)
    finally:
        await stop(replicas.a, tenant, first_chat)
