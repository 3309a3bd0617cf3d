"""Small helpers for driving the chat api in tests: send, read, wait for a turn to settle, check a problem answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.support.sse import SseEvent, collect_sse


async def send_and_collect(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    body: dict[str, Any],
    path: str = "/v1/chats",
) -> tuple[httpx.Response, list[SseEvent]]:
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response, []
        return response, await collect_sse(response)


async def get_chat(
    client: httpx.AsyncClient, headers: dict[str, str], chat_id: str
) -> dict[str, Any]:
    response = await client.get(f"/v1/chats/{chat_id}", headers=headers)
    assert response.status_code == 200, response.text
    chat: dict[str, Any] = response.json()
    return chat


async def wait_for_settled_answer(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    chat_id: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """The chat's last message once it is no longer streaming."""
    deadline = time.monotonic() + timeout
    while True:
        chat = await get_chat(client, headers, chat_id)
        last: dict[str, Any] = chat["messages"][-1]
        if last["role"] == "assistant" and last["status"] != "streaming":
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"the answer did not settle in {timeout}s: {last}")
        await asyncio.sleep(0.05)


def stored_text(message: dict[str, Any], kind: str = "text") -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == kind)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return problem
