"""Approvals that wait durably: a toolkit tool marked as needing approval pauses its turn until a
person decides (the AI SDK way, or through the approvals endpoint), the timeout ends it as denied,
and the wait survives a restart of the api and the worker. Real Temporal, Postgres and Valkey, a
local MCP server, the mock provider scripted to call the tool, and the real `ai` client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import api_keys
from tests.conftest import REMOTE_FILES_HOST, RunningServices, Tenant, make_tenant
from tests.support.ai_client import ai_client_available, run_ai_client
from tests.support.chat_api import get_chat, wait_for_settled_answer
from tests.support.mcp_server import McpTestServer
from tests.support.openai_server import OpenAICompatibleServer, Script
from tests.support.processes import wait_until_ready
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

TOKEN = "mcp-approvals-token"
LOOKUP = "glossary__lookup"


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    # On the one private address the test stack's outbound guard lets through.
    with McpTestServer(REMOTE_FILES_HOST, token=TOKEN) as server:
        yield server


@pytest.fixture
async def toolkit_id(client: httpx.AsyncClient, tenant: Tenant, mcp_server: McpTestServer) -> str:
    response = await client.post(
        "/v1/toolkits",
        json={
            "name": "glossary",
            "url": mcp_server.url,
            "token": TOKEN,
            "approvalTools": ["lookup"],
        },
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    identifier: str = response.json()["id"]
    return identifier


@pytest.fixture
def asks_to_look_up(provider_server: OpenAICompatibleServer) -> str:
    term = f"durable-{uuid.uuid4().hex[:6]}"
    provider_server.script(
        "tools-approval",
        Script(
            tool_steps=[[(LOOKUP, {"term": term})]],
            text_before_calls="I will look it up. ",
            reply="Here is what the glossary says.",
        ),
    )
    return term


def lookups(server: McpTestServer, term: str) -> int:
    return sum(
        1 for call in server.calls if call.tool == "lookup" and call.arguments.get("term") == term
    )


def the_call(message: dict[str, Any]) -> dict[str, Any]:
    (part,) = [part for part in message["parts"] if part["type"] == "dynamic-tool"]
    return part


async def start_turn(
    client: httpx.AsyncClient, tenant: Tenant, toolkit_id: str, **extra: Any
) -> tuple[str, list[dict[str, Any]]]:
    """Send; read the response to its pausing `finish`; return the chat id and the chunks."""
    chunks: list[dict[str, Any]] = []
    async with client.stream(
        "POST",
        "/v1/chats",
        json={
            "message": "what does durable mean?",
            "model": "mock/tools-approval",
            "toolkitIds": [toolkit_id],
            **extra,
        },
        headers=tenant.headers,
    ) as response:
        assert response.status_code == 200
        chat_id = response.headers["x-chat-id"]
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chat_id, chunks


async def pending(client: httpx.AsyncClient, tenant: Tenant, chat_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/chats/{chat_id}/approvals", headers=tenant.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def test_an_approved_call_runs_and_the_same_message_continues_in_the_ai_client(
    api_url: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(
        {
            "mode": "chat",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
            "body": {"model": "mock/tools-approval", "toolkitIds": [toolkit_id]},
            "actions": [
                {"do": "send", "text": "what does durable mean?"},
                {"do": "approve", "approved": True},
            ],
        }
    )
    assert result["error"] is None, result
    answer = result["messages"][-1]
    call = the_call(answer)
    assert call["toolName"] == LOOKUP
    assert call["state"] == "output-available"
    assert call["approval"]["approved"] is True
    assert asks_to_look_up in call["output"]["text"]
    assert answer["parts"][-1]["text"] == "Here is what the glossary says."
    assert [message["role"] for message in result["messages"]] == ["user", "assistant"]
    assert lookups(mcp_server, asks_to_look_up) == 1
    stored = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert stored["id"] == answer["id"]
    assert stored["parts"] == answer["parts"]
    assert await pending(client, tenant, chat_id) == []


async def test_a_denied_call_never_runs_and_the_model_goes_on_without_it(
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
    provider_server: OpenAICompatibleServer,
) -> None:
    chat_id, chunks = await start_turn(client, tenant, toolkit_id)
    request = next(chunk for chunk in chunks if chunk["type"] == "tool-approval-request")
    assert chunks[-1]["type"] == "finish"
    assert chunks[-1]["finishReason"] == "tool-calls", "the response ends while the turn waits"
    (waiting,) = await pending(client, tenant, chat_id)
    assert waiting["id"] == request["approvalId"]
    assert waiting["toolName"] == LOOKUP
    assert waiting["input"] == {"term": asks_to_look_up}

    decided = await client.post(
        f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
        json={"approved": False, "reason": "not now"},
        headers=tenant.headers,
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "denied"
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    call = the_call(answer)
    assert call["state"] == "output-denied"
    assert call["approval"] == {"id": waiting["id"], "approved": False, "reason": "not now"}
    assert answer["parts"][-1]["text"] == "Here is what the glossary says."
    assert lookups(mcp_server, asks_to_look_up) == 0
    told = provider_server.requests_for("tools-approval")[-1].tool_history().last_output() or ""
    assert "denied" in told
    assert "not now" in told

    again = await client.post(
        f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
        json={"approved": True},
        headers=tenant.headers,
    )
    assert again.status_code == 409, "a second decision changes nothing"
    assert lookups(mcp_server, asks_to_look_up) == 0


async def test_an_approval_nobody_decides_ends_as_denied_after_its_timeout(
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
) -> None:
    chat_id, _chunks = await start_turn(client, tenant, toolkit_id, approvalTimeoutSeconds=2)
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    call = the_call(answer)
    assert call["state"] == "output-denied"
    assert call["approval"]["approved"] is False
    assert answer["status"] == "complete"
    assert lookups(mcp_server, asks_to_look_up) == 0
    response = await client.get(f"/v1/chats/{chat_id}/approvals?status=all", headers=tenant.headers)
    assert [item["status"] for item in response.json()["items"]] == ["expired"]


async def test_decisions_from_another_user_or_organization_are_404(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
) -> None:
    chat_id, _chunks = await start_turn(client, tenant, toolkit_id)
    (waiting,) = await pending(client, tenant, chat_id)
    other_tenant = await make_tenant(sessions)
    async with sessions.begin() as session:
        colleague = await api_keys.create_key(session, tenant.organization_id, user_id="colleague")
    strangers = [
        other_tenant.headers,
        {"Authorization": f"Bearer {colleague.secret}"},
    ]
    for headers in strangers:
        response = await client.post(
            f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
            json={"approved": True},
            headers=headers,
        )
        assert response.status_code == 404, response.text
    assert lookups(mcp_server, asks_to_look_up) == 0
    # The owner still decides.
    decided = await client.post(
        f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
        json={"approved": True},
        headers=tenant.headers,
    )
    assert decided.status_code == 200
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert the_call(answer)["state"] == "output-available"
    assert lookups(mcp_server, asks_to_look_up) == 1


async def test_an_approval_waits_across_a_restart_of_the_api_and_the_worker(
    client: httpx.AsyncClient,
    api_url: str,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
    running_services: RunningServices,
) -> None:
    chat_id, _chunks = await start_turn(client, tenant, toolkit_id)
    (waiting,) = await pending(client, tenant, chat_id)
    running_services.worker.kill()
    running_services.api.kill()
    await asyncio.sleep(1)  # nothing is up: the turn waits in Temporal alone
    running_services.worker.start()
    running_services.api.start()
    await asyncio.to_thread(wait_until_ready, api_url, running_services.api)
    started = time.monotonic()
    decided = await client.post(
        f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
        json={"approved": True},
        headers=tenant.headers,
    )
    assert decided.status_code == 200, decided.text
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id, timeout=60)
    print(f"\n[approvals] answered {time.monotonic() - started:.1f}s after the restart's decision")
    assert the_call(answer)["state"] == "output-available"
    assert answer["parts"][-1]["text"] == "Here is what the glossary says."
    assert lookups(mcp_server, asks_to_look_up) == 1
    chat = await get_chat(client, tenant.headers, chat_id)
    assert chat["activeTurnId"] is None


async def test_a_chats_toolkits_are_offered_to_sends_that_name_none(
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    provider_server: OpenAICompatibleServer,
) -> None:
    provider_server.script("tools-agent", Script(reply="plain"))
    first = await client.post(
        "/v1/chats?stream=false",
        json={"message": "hello", "model": "mock/tools-agent"},
        headers=tenant.headers,
    )
    chat_id = first.json()["chatId"]
    refused = await client.patch(
        f"/v1/chats/{chat_id}", json={"toolkitIds": ["tk_nope"]}, headers=tenant.headers
    )
    assert refused.status_code == 400
    patched = await client.patch(
        f"/v1/chats/{chat_id}", json={"toolkitIds": [toolkit_id]}, headers=tenant.headers
    )
    assert patched.json()["toolkitIds"] == [toolkit_id]
    await client.post(
        f"/v1/chats/{chat_id}?stream=false",
        json={"message": "again", "model": "mock/tools-agent"},
        headers=tenant.headers,
    )
    offered = {
        tool["function"]["name"] for tool in provider_server.requests_for("tools-agent")[-1].tools
    }
    assert offered == {
        "glossary__add",
        "glossary__lookup",
        "glossary__fail",
        "glossary__slow",
        "glossary__secret_admin",
    }


async def test_a_stop_while_an_approval_waits_ends_the_turn_and_the_call_never_runs(
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
    mcp_server: McpTestServer,
) -> None:
    chat_id, _chunks = await start_turn(client, tenant, toolkit_id)
    (waiting,) = await pending(client, tenant, chat_id)
    stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
    assert stop.json()["stopped"] is True
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted"
    call = the_call(answer)
    assert call["state"] == "output-denied"
    assert call["approval"]["reason"] == "the turn was stopped"
    assert lookups(mcp_server, asks_to_look_up) == 0
    assert await pending(client, tenant, chat_id) == []
    late = await client.post(
        f"/v1/chats/{chat_id}/approvals/{waiting['id']}",
        json={"approved": True},
        headers=tenant.headers,
    )
    assert late.status_code == 409


async def test_a_paused_turn_announces_approval_requested_to_webhooks(
    client: httpx.AsyncClient,
    tenant: Tenant,
    toolkit_id: str,
    asks_to_look_up: str,
) -> None:
    with WebhookReceiver(REMOTE_FILES_HOST) as receiver:
        path = "/hooks/approvals"
        created = await client.post(
            "/v1/webhooks",
            json={"url": receiver.route(path, None), "events": ["approval.requested"]},
            headers=tenant.headers,
        )
        assert created.status_code == 201, created.text
        receiver.set_secret(path, created.json()["secret"])
        chat_id, _chunks = await start_turn(client, tenant, toolkit_id)
        (waiting,) = await pending(client, tenant, chat_id)
        async with asyncio.timeout(30):
            while not receiver.accepted(path):  # noqa: ASYNC110 - the receiver runs in a thread
                await asyncio.sleep(0.05)
        (request,) = receiver.accepted(path)
        data = request.payload["data"]
        assert request.payload["type"] == "approval.requested"
        assert data["chatId"] == chat_id
        assert [item["id"] for item in data["approvals"]] == [waiting["id"]]
        assert data["approvals"][0]["toolName"] == LOOKUP
