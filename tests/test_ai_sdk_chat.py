"""The AI SDK's chat state machine (`AbstractChat`, what `useChat` wraps) against the api, as a new
user's app would drive it: `regenerate()` with no arguments, the README's transport, resuming a chat
that does not exist yet, and the response headers a browser app on another origin can read."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant, make_tenant
from tests.support.ai_client import JS_DIR, ai_client_available, run_ai_client
from tests.support.chat_api import get_chat, stored_text

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

README = Path(__file__).resolve().parent.parent / "README.md"
FAST = {"providerOptions": {"local": {"delayMs": 0}}}
# The origin the suite's api admits for CORS (DURACHAT_CORS_ORIGINS in tests/conftest.py).
APP_ORIGIN = "http://app.durachat.test"


def readme_prepare_send_messages_request() -> str:
    """The `prepareSendMessagesRequest` function of the README's useChat example, as its source."""
    match = re.search(
        r"prepareSendMessagesRequest: (\(.*?\) => \(\{\n.*?\n  \}\)),\n", README.read_text(), re.S
    )
    assert match, "the README's useChat example has a prepareSendMessagesRequest"
    return match.group(1)


def chat_command(
    api_url: str, tenant: Tenant, chat_id: str, actions: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "mode": "chat",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": chat_id,
        "actions": actions,
        "body": FAST,
        **extra,
    }


def texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(message["role"], stored_text(message)) for message in messages]


async def test_regenerate_with_no_arguments_answers_again_on_a_chat_the_client_created(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(
        chat_command(
            api_url,
            tenant,
            chat_id,
            [{"do": "send", "text": "say it twice"}, {"do": "regenerate"}],
        )
    )
    assert result["error"] is None, result
    assert result["status"] == "ready"
    assert texts(result["messages"]) == [("user", "say it twice"), ("assistant", "say it twice")]
    assert [response["status"] for response in result["responses"]] == [200, 200]

    stored = await get_chat(client, tenant.headers, chat_id)
    user, answer = stored["messages"]
    # The regenerated answer sits beside the first one, and is what the client shows.
    assert answer["id"] == result["messages"][-1]["id"]
    assert len(answer["siblingIds"]) == 2
    assert answer["siblingIds"][-1] == answer["id"]
    assert user["id"] == stored["messages"][0]["id"]


async def test_regenerate_with_no_arguments_on_a_chat_loaded_from_the_api(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/chats?stream=false", json={"message": "loaded later", **FAST}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    chat_id = response.json()["chatId"]
    loaded = (await get_chat(client, tenant.headers, chat_id))["messages"]

    result = await run_ai_client(
        chat_command(api_url, tenant, chat_id, [{"do": "regenerate"}], messages=loaded)
    )
    assert result["error"] is None, result
    assert texts(result["messages"]) == [("user", "loaded later"), ("assistant", "loaded later")]
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert stored[-1]["id"] == result["messages"][-1]["id"] != loaded[-1]["id"]
    assert stored[-1]["siblingIds"] == [loaded[-1]["id"], stored[-1]["id"]]


async def test_regenerate_with_no_arguments_answers_again_after_a_failed_turn(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/chats?stream=false",
        json={"message": "try me", "model": "mock/fail-400"},
        headers=tenant.headers,
    )
    assert response.status_code == 502, response.text
    chat_id = response.headers["x-chat-id"]
    loaded = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [message["status"] for message in loaded] == ["complete", "failed"]

    result = await run_ai_client(
        chat_command(
            api_url,
            tenant,
            chat_id,
            [{"do": "regenerate"}],
            messages=loaded,
            body={"model": "local/echo", **FAST},
        )
    )
    assert result["error"] is None, result
    assert texts(result["messages"]) == [("user", "try me"), ("assistant", "try me")]
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert stored[-1]["status"] == "complete"
    assert stored[-1]["siblingIds"] == [loaded[-1]["id"], stored[-1]["id"]]


async def test_the_readme_transport_sends_only_the_new_message_and_regenerates(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(
        chat_command(
            api_url,
            tenant,
            chat_id,
            [
                {"do": "send", "text": "one"},
                {"do": "send", "text": "two"},
                {"do": "regenerate"},
                {"do": "send", "text": "three"},
            ],
            prepareSendMessagesRequest=readme_prepare_send_messages_request(),
        )
    )
    assert result["error"] is None, result
    expected = [
        ("user", "one"),
        ("assistant", "one"),
        ("user", "two"),
        ("assistant", "two"),
        ("user", "three"),
        ("assistant", "three"),
    ]
    assert texts(result["messages"]) == expected
    stored = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert texts(stored) == expected
    assert [message["id"] for message in stored if message["role"] == "assistant"] == [
        message["id"] for message in result["messages"] if message["role"] == "assistant"
    ]


async def test_resume_on_the_first_load_of_a_new_chat_finds_nothing_to_resume(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant, sessions: Any
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(chat_command(api_url, tenant, chat_id, [{"do": "resume"}]))
    assert result["error"] is None, result
    assert result["status"] == "ready"
    assert [response["status"] for response in result["responses"]] == [204]

    # Another tenant's chat answers the same as a chat that does not exist: nothing leaks.
    response = await client.post(
        "/v1/chats?stream=false", json={"message": "mine", **FAST}, headers=tenant.headers
    )
    owned_chat_id = response.json()["chatId"]
    stranger = await make_tenant(sessions)
    for headers in (stranger.headers, tenant.headers):
        resumed = await client.get(f"/v1/chats/{owned_chat_id}/stream", headers=headers)
        assert resumed.status_code == 204
    unknown = await client.get(f"/v1/chats/{chat_id}/stream", headers=stranger.headers)
    assert unknown.status_code == 204

    # A cursor names a stream: one the caller does not own stays a 404.
    turn_id = response.json()["turnId"]
    cursor = {"Last-Event-ID": f"{turn_id}:0-1"}
    mine = await client.get(
        f"/v1/chats/{owned_chat_id}/stream", headers={**tenant.headers, **cursor}
    )
    assert mine.status_code == 200
    theirs = await client.get(
        f"/v1/chats/{owned_chat_id}/stream", headers={**stranger.headers, **cursor}
    )
    assert theirs.status_code == 404


async def test_a_browser_app_on_another_origin_reads_every_documented_header(
    api_url: str, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    slow = {"model": "local/lorem", "providerOptions": {"local": {"words": 20, "delayMs": 50}}}
    result = await run_ai_client(
        {
            **chat_command(api_url, tenant, chat_id, [{"do": "send", "text": "hi"}]),
            "body": slow,
            "origin": APP_ORIGIN,
        }
    )
    assert result["error"] is None, result
    [send] = result["responses"]
    visible = send["browserVisibleHeaders"]
    assert visible["x-chat-id"] == chat_id
    assert visible["x-turn-id"] == result["messages"][-1]["metadata"]["turnId"]
    assert visible["x-request-id"]
    assert visible["x-vercel-ai-ui-message-stream"] == "v1"

    # A queued send's position, and a rate limit's Retry-After, are readable too.
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        cors = {**tenant.headers, "Origin": APP_ORIGIN}
        async with http.stream(
            "POST", "/v1/chats", json={"message": "busy", **slow}, headers=cors
        ) as running:
            busy_chat_id = running.headers["x-chat-id"]
            queued = await http.post(
                f"/v1/chats/{busy_chat_id}?stream=false",
                json={"message": "after", "ifBusy": "queue", **FAST},
                headers={**cors, "Accept": "application/json"},
            )
            exposed = {
                name.strip().lower()
                for name in queued.headers["access-control-expose-headers"].split(",")
            }
            assert queued.headers["x-queue-position"] == "1"
            assert queued.headers["access-control-allow-origin"] == APP_ORIGIN
            assert {"x-queue-position", "retry-after", "x-turn-id", "x-chat-id"} <= exposed
            await running.aread()


def test_the_readme_names_the_node_version_the_ai_package_declares() -> None:
    engines = json.loads((JS_DIR / "node_modules" / "ai" / "package.json").read_text())["engines"]
    assert f"`node {engines['node']}`" in README.read_text()
