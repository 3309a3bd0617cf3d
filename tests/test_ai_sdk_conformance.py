"""Conformance with the real `ai` npm package: DefaultChatTransport sends, readUIMessageStream
assembles, reconnectToStream resumes; the assembled message must equal what the api stores."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.support.ai_client import ai_client_available, run_ai_client
from tests.support.chat_api import get_chat, wait_for_settled_answer

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

FAST = {"local": {"delayMs": 0}}


def user_message(text: str) -> dict[str, Any]:
    return {
        "id": f"u-{uuid.uuid4().hex[:8]}",
        "role": "user",
        "parts": [{"type": "text", "text": text}],
    }


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """The UIMessage fields a client assembles (the api adds status and createdAt beside them)."""
    return {key: message[key] for key in ("id", "role", "parts", "metadata")}


def send_command(
    api_url: str,
    tenant: Tenant,
    chat_id: str,
    messages: list[dict[str, Any]],
    body: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "mode": "send",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": chat_id,
        "messages": messages,
        "trigger": "submit-message",
        "body": body,
        **extra,
    }


async def test_use_chat_round_trip_assembles_what_the_api_stores(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    first = user_message("hello from useChat")
    result = await run_ai_client(
        send_command(api_url, tenant, chat_id, [first], {"providerOptions": FAST})
    )
    assert result["error"] is None, result
    assembled = result["message"]
    assert [part["type"] for part in assembled["parts"]] == ["step-start", "text"]
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert comparable(stored[-1]) == assembled
    assert assembled["metadata"]["chatId"] == chat_id

    # useChat sends the whole conversation again with the next message; the server keeps its own history.
    second = user_message("and a follow-up")
    history = [first, assembled, second]
    result = await run_ai_client(
        send_command(api_url, tenant, chat_id, history, {"providerOptions": FAST})
    )
    assert result["error"] is None, result
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert len(stored) == 4
    assert comparable(stored[-1]) == result["message"]


async def test_reconnect_mid_turn_assembles_the_whole_message(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    body = {"model": "local/lorem", "providerOptions": {"local": {"words": 50, "delayMs": 40}}}
    dropped = await run_ai_client(
        send_command(api_url, tenant, chat_id, [user_message("tell me")], body, abortAfterChunks=6)
    )
    assert dropped["aborted"] is True
    resumed = await run_ai_client(
        {
            "mode": "reconnect",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
        }
    )
    assert resumed["error"] is None, resumed
    assert resumed["chunks"][0]["type"] == "start", "a resume replays from the start chunk"
    stored = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert comparable(stored) == resumed["message"]
    assert len(stored["parts"][-1]["text"].split()) == 50


async def test_reconnect_with_nothing_active_reports_no_stream(
    api_url: str, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    await run_ai_client(
        send_command(api_url, tenant, chat_id, [user_message("hi")], {"providerOptions": FAST})
    )
    resumed = await run_ai_client(
        {
            "mode": "reconnect",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
        }
    )
    assert resumed["noActiveStream"] is True


async def test_retried_attempt_never_garbles_the_assembled_message(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    body = {"providerOptions": {"local": {"delayMs": 0, "failAfterWords": 3, "failTimes": 2}}}
    text = "alpha beta gamma delta epsilon zeta"
    result = await run_ai_client(send_command(api_url, tenant, chat_id, [user_message(text)], body))
    assert result["error"] is None, result
    assert [chunk["type"] for chunk in result["chunks"]].count("reset-step") == 2
    assembled = result["message"]
    assert "".join(part.get("text", "") for part in assembled["parts"]) == text
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"][-1]
    assert comparable(stored) == assembled


async def test_provider_failure_reaches_the_client_as_an_error(
    api_url: str, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(
        send_command(api_url, tenant, chat_id, [user_message("hi")], {"model": "mock/fail-400"})
    )
    assert result["error"], result


async def test_concurrent_clients_each_get_their_own_complete_answer(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_ids = [f"chat_{uuid.uuid4().hex[:12]}" for _ in range(4)]
    results = await asyncio.gather(
        *(
            run_ai_client(
                send_command(
                    api_url,
                    tenant,
                    chat_id,
                    [user_message(f"n {index}")],
                    {"providerOptions": FAST},
                )
            )
            for index, chat_id in enumerate(chat_ids)
        )
    )
    for chat_id, result in zip(chat_ids, results, strict=True):
        stored = (await get_chat(client, tenant.headers, chat_id))["messages"][-1]
        assert comparable(stored) == result["message"]
