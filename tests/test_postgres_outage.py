"""A Postgres outage on the session stack: the api keeps answering `/healthz`, reads fail fast with a
503 problem, the open stream of a live turn keeps flowing from Redis and completes without being
generated again, and `/readyz` is 200 soon after Postgres is back.

The outage stops the session's own Postgres (the one every api and worker of the suite uses), so
it is restarted whatever happens, from the main thread (an embedded server dies with the thread
that started it). Figures are printed (`[postgres-outage] ...`, shown with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from devstack.embedded import EmbeddedPostgres
from devstack.stack import ServiceStack
from tests.conftest import Tenant
from tests.support.chat_api import get_chat, stored_text
from tests.test_crash_recovery import StreamReader

WORDS = 200
# 200 words 50 ms apart: a turn of about 10 s, which outlasts the outage below.
LIVE_TURN = {
    "message": "a long story",
    "model": "local/lorem",
    "providerOptions": {"local": {"words": WORDS, "delayMs": 50}},
}
# Generous bounds on outcomes, not timing assertions: before, a read took 16 s and then failed 500.
REQUEST_TIMEOUT_S = 20.0


def report(**figures: object) -> None:
    print("\n[postgres-outage] " + ", ".join(f"{name}={value}" for name, value in figures.items()))


def session_postgres(stack: ServiceStack) -> EmbeddedPostgres:
    return next(service for service in stack.services if isinstance(service, EmbeddedPostgres))


@contextlib.asynccontextmanager
async def postgres_stopped(postgres: EmbeddedPostgres) -> AsyncIterator[None]:
    """Postgres is down inside the block and serving again after it, whatever the block did."""
    await asyncio.to_thread(postgres.stop)
    try:
        yield
    finally:
        postgres.start()
        await asyncio.to_thread(postgres.wait_ready, 60)


async def wait_until_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> httpx.Response:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await client.get("/readyz", timeout=5)
            if last.status_code == 200:
                return last
        except httpx.HTTPError as error:
            last = error
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz was not 200 within {timeout}s after Postgres returned: {last}")


async def test_postgres_outage_leaves_the_api_answering_and_live_streams_flowing(
    client: httpx.AsyncClient, tenant: Tenant, service_stack: ServiceStack
) -> None:
    read_back = await client.post(
        "/v1/chats",
        json={"message": "read me during the outage", "model": "local/echo"},
        params={"stream": "false"},
        headers=tenant.headers,
    )
    assert read_back.status_code == 200, read_back.text
    chat_id = read_back.json()["chatId"]
    reader = StreamReader(client, "POST", "/v1/chats", tenant.headers, LIVE_TURN, max_drops=0)
    await reader.wait_for(lambda: reader.deltas() >= 5)

    postgres = session_postgres(service_stack)
    async with postgres_stopped(postgres):
        stopped_at = time.monotonic()
        deltas_at_stop = reader.deltas()

        health = [(await client.get("/healthz", timeout=5)).status_code for _ in range(3)]

        asked = time.monotonic()
        read = await client.get(
            f"/v1/chats/{chat_id}", headers=tenant.headers, timeout=REQUEST_TIMEOUT_S
        )
        read_s = time.monotonic() - asked

        # Tokens keep coming from Redis while Postgres is down.
        await reader.wait_for(lambda: reader.deltas() >= deltas_at_stop + 20, timeout=30)
        deltas_during_outage = reader.deltas() - deltas_at_stop
        health.append((await client.get("/healthz", timeout=5)).status_code)
    back_at = time.monotonic()
    ready = await wait_until_ready(client)
    ready_s = time.monotonic() - back_at

    await reader.finish(timeout=60)
    chat = await get_chat(client, tenant.headers, reader.chat_id)
    turns = await client.get(f"/v1/chats/{reader.chat_id}/turns", headers=tenant.headers)
    [turn] = turns.json()["items"]
    report(
        outage_s=round(back_at - stopped_at, 2),
        chat_read_status=read.status_code,
        chat_read_s=round(read_s, 3),
        deltas_during_outage=deltas_during_outage,
        postgres_back_to_readyz_200_s=round(ready_s, 3),
        attempts=turn["attempts"],
    )

    assert health == [200, 200, 200, 200]
    assert read.status_code == 503, read.text
    assert read.headers["content-type"].startswith("application/problem+json")
    assert int(read.headers["retry-after"]) > 0
    problem = read.json()
    assert problem["status"] == 503
    assert problem["type"] == "/problems/database-unavailable"
    assert ready.json()["status"] == "ready"

    assert reader.status == 200
    assert reader.done, reader.types[-5:]
    assert reader.types[-1] == "finish"
    assert "reset-step" not in reader.types, "the answer was not generated again"
    answer = chat["messages"][-1]
    assert answer["status"] == "complete"
    assert len(stored_text(answer).split()) == WORDS
    assert turn["status"] == "completed"
    assert turn["attempts"] == 1

    after = await client.get(f"/v1/chats/{chat_id}", headers=tenant.headers)
    assert after.status_code == 200, after.text
