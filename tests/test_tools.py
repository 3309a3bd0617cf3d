"""Tools in the durable turn, end to end: the agent loop over real Temporal, Postgres and Valkey, the
mock provider scripted to call tools, a SearXNG-shaped search server, local pages through the
outbound guard, and the real `ai` client assembling what it reads."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.schemas import ToolOptionsIn
from api.turn_tools import plan_tools
from core.contracts import turn_workflow_id
from core.errors import BadRequestError
from core.ui_chunks import stored_message_chunks
from tests.conftest import REMOTE_FILES_HOST, RunningServices, Tenant
from tests.support.ai_client import ai_client_available, run_ai_client
from tests.support.chat_api import (
    assert_problem,
    get_chat,
    send_and_collect,
    wait_for_settled_answer,
)
from tests.support.file_server import FileServer
from tests.support.openai_server import OpenAICompatibleServer, Script
from tests.support.search_server import SearchHit, SearchServer
from tests.support.sse import iter_sse

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

ARTICLE = b"""<html><head><title>Durable turns</title></head><body>
<nav>Home | About</nav>
<article><h1>Durable turns</h1>
<p>A durable turn survives a worker crash because every step is recorded in workflow history.</p>
<p>Tool calls that completed are never run again.</p></article>
<footer>Copyright</footer></body></html>"""


@pytest.fixture(scope="module")
def pages() -> Iterator[FileServer]:
    """Local pages the worker's web_fetch reaches (the test stack lets only this loopback host
    through the outbound guard)."""
    with FileServer(REMOTE_FILES_HOST) as server:
        server.serve("/article.html", ARTICLE, "text/html; charset=utf-8")
        yield server


def user_message(text: str) -> dict[str, Any]:
    return {
        "id": f"u-{uuid.uuid4().hex[:8]}",
        "role": "user",
        "parts": [{"type": "text", "text": text}],
    }


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    return {key: message[key] for key in ("id", "role", "parts")}


def send_command(
    api_url: str, tenant: Tenant, chat_id: str, messages: list[dict[str, Any]], body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "mode": "send",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": chat_id,
        "messages": messages,
        "trigger": "submit-message",
        "body": body,
    }


def tool_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        part
        for part in message["parts"]
        if part["type"] == "dynamic-tool" or part["type"].startswith("tool-")
    ]


async def test_a_two_step_answer_with_search_and_fetch_is_assembled_by_the_ai_client_as_stored(
    api_url: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
    pages: FileServer,
) -> None:
    page_url = f"{pages.base_url}/article.html"
    query = f"durable turns {uuid.uuid4().hex[:6]}"
    search_server.results_for(
        query, [SearchHit(title="Durable turns", url=page_url, content="How turns survive")]
    )
    provider_server.script(
        "tools-agent",
        Script(
            tool_steps=[[("web_search", {"query": query})], [("web_fetch", {"url": page_url})]],
            text_before_calls="Let me look. ",
            reply="Completed tool calls are never run again.",
        ),
    )
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    result = await run_ai_client(
        send_command(
            api_url,
            tenant,
            chat_id,
            [user_message("how do durable turns survive crashes?")],
            {"model": "mock/tools-agent", "web": True},
        )
    )
    assert result["error"] is None, result
    assembled = result["message"]
    kinds = [part["type"] for part in assembled["parts"]]
    assert kinds == [
        "step-start",
        "text",
        "tool-web_search",
        "step-start",
        "source-url",
        "text",
        "tool-web_fetch",
        "step-start",
        "source-url",
        "text",
    ], kinds
    search, fetch = tool_parts(assembled)
    assert search["state"] == "output-available"
    assert search["input"] == {"query": query}
    assert search["output"]["results"][0]["url"] == page_url
    assert fetch["state"] == "output-available"
    assert "never run again" in fetch["output"]["text"]
    assert "Home | About" not in fetch["output"]["text"], "navigation is not main text"
    assert assembled["parts"][-1]["text"] == "Completed tool calls are never run again."
    assert assembled["metadata"]["finishReason"] == "stop"
    assert assembled["metadata"]["steps"] == 3

    chunk_types = [chunk["type"] for chunk in result["chunks"]]
    assert chunk_types.count("start-step") == 3
    assert chunk_types.count("finish-step") == 3
    statuses = [chunk for chunk in result["chunks"] if chunk["type"] == "data-status"]
    assert [status["data"]["text"] for status in statuses] == [
        f"searching the web for “{query}”",
        f"reading {REMOTE_FILES_HOST}",
    ]
    assert all(status["transient"] for status in statuses), "status is shown, never stored"

    stored = (await get_chat(client, tenant.headers, chat_id))["messages"][-1]
    assert comparable(stored) == comparable(assembled)

    # The model read the tool results back, in its own wire format, on the steps that followed.
    histories = [request.tool_history() for request in provider_server.requests_for("tools-agent")]
    assert [history.rounds for history in histories][-3:] == [0, 1, 2]


async def test_the_step_bound_ends_the_turn_without_running_the_last_steps_calls(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
) -> None:
    query = f"bounded {uuid.uuid4().hex[:6]}"
    provider_server.script(
        "tools-many",
        Script(tool_steps=[[("web_search", {"query": query})]] * 5, reply="never reached"),
    )
    response, events = await send_and_collect(
        client,
        tenant.headers,
        {"message": "search forever", "model": "mock/tools-many", "web": True, "maxSteps": 2},
    )
    assert response.status_code == 200
    chunks = [event.chunk for event in events if event.data != "[DONE]"]
    finish = next(chunk for chunk in chunks if chunk["type"] == "finish")
    assert finish["finishReason"] == "length"
    assert finish["messageMetadata"]["stepLimitReached"] is True
    answer = await wait_for_settled_answer(client, tenant.headers, response.headers["x-chat-id"])
    first, second = tool_parts(answer)
    assert first["state"] == "output-available"
    assert second["state"] == "output-error"
    assert "limit of 2 steps" in second["errorText"]
    asked = [r for r in search_server.requests_to("searxng") if r.params.get("q") == query]
    assert len(asked) == 1, "the refused call never ran"


@pytest.mark.parametrize(
    "address",
    ["http://127.0.0.1:{port}/article.html", "http://169.254.169.254/latest/meta-data/"],
)
async def test_web_fetch_refuses_private_addresses_and_the_model_reads_why(
    address: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    pages: FileServer,
) -> None:
    url = address.format(port=pages.base_url.rsplit(":", 1)[1])
    provider_server.script(
        "tools-agent", Script(tool_steps=[[("web_fetch", {"url": url})]], reply="could not read it")
    )
    seen = len(pages.requests)
    response, _events = await send_and_collect(
        client,
        tenant.headers,
        {"message": "read the internal page", "model": "mock/tools-agent", "web": True},
    )
    answer = await wait_for_settled_answer(client, tenant.headers, response.headers["x-chat-id"])
    (fetch,) = tool_parts(answer)
    assert fetch["state"] == "output-error"
    assert "not allowed" in fetch["errorText"]
    assert len(pages.requests) == seen, "nothing reached the refused address"
    last = provider_server.requests_for("tools-agent")[-1].tool_history()
    assert "not allowed" in (last.last_output() or "")


async def test_a_client_side_tool_round_trip_through_the_ai_client(
    api_url: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
) -> None:
    provider_server.script(
        "tools-client",
        Script(tool_steps=[[("getWeather", {"city": "Paris"})]], reply="It is sunny in Paris."),
    )
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    weather_tool = {
        "name": "getWeather",
        "description": "The weather in a city",
        "inputSchema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    result = await run_ai_client(
        {
            "mode": "chat",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
            "body": {"model": "mock/tools-client", "tools": [weather_tool]},
            "actions": [
                {"do": "send", "text": "what is the weather in Paris?"},
                {"do": "tool-output", "output": {"weather": "sunny", "celsius": 24}},
            ],
        }
    )
    assert result["error"] is None, result
    assert result["status"] == "ready"
    answer = result["messages"][-1]
    (call,) = tool_parts(answer)
    assert call["type"] == "tool-getWeather"
    assert call["state"] == "output-available"
    assert call["output"] == {"weather": "sunny", "celsius": 24}
    assert answer["parts"][-1] == {"type": "text", "text": "It is sunny in Paris.", "state": "done"}
    stored = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert comparable(stored) == comparable(answer)
    # The model read the client's output back.
    history = provider_server.requests_for("tools-client")[-1].tool_history()
    assert "sunny" in (history.last_output() or "")


async def test_tool_inputs_are_checked_against_their_schema_before_they_reach_the_client(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    provider_server.script(
        "tools-client",
        Script(tool_steps=[[("getWeather", {"town": "Paris"})]], reply="I could not ask."),
    )
    response, events = await send_and_collect(
        client,
        tenant.headers,
        {
            "message": "weather?",
            "model": "mock/tools-client",
            "tools": [
                {
                    "name": "getWeather",
                    "inputSchema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                }
            ],
        },
    )
    types = [event.chunk["type"] for event in events if event.data != "[DONE]"]
    assert "tool-input-error" in types
    assert "tool-input-available" not in types
    answer = await wait_for_settled_answer(client, tenant.headers, response.headers["x-chat-id"])
    (call,) = tool_parts(answer)
    assert call["state"] == "output-error"
    assert "'city' is a required property" in call["errorText"]
    assert answer["parts"][-1]["text"] == "I could not ask."


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"model": "mock/echo", "web": True}, "cannot call tools"),
        ({"model": "mock/tools-agent", "web": True, "maxSteps": 51}, "maxSteps may be at most 50"),
        ({"model": "mock/tools-agent", "toolkitIds": ["tk_missing"]}, "no such toolkits"),
        ({"model": "mock/tools-agent", "functions": ["x__y"]}, "toolkitIds"),
    ],
)
async def test_tool_sets_that_cannot_work_are_refused_before_any_turn(
    body: dict[str, Any], detail: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/chats", json={"message": "hi", **body}, headers=tenant.headers
    )
    problem = assert_problem(response, 400)
    assert detail in problem["detail"]


@pytest.mark.parametrize(
    "tool",
    [
        {"name": "bad name!", "inputSchema": {"type": "object"}},
        {"name": "ok", "inputSchema": {"type": "string"}},
        {"name": "ok", "inputSchema": {"type": "object", "properties": {"a": {"type": 7}}}},
    ],
)
async def test_malformed_client_tools_are_refused(
    tool: dict[str, Any], client: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await client.post(
        "/v1/chats",
        json={"message": "hi", "model": "mock/tools-client", "tools": [tool]},
        headers=tenant.headers,
    )
    assert response.status_code in (400, 422), response.text


async def test_fifty_tool_calls_in_one_turn_keep_workflow_history_small(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
    settings: Any,
) -> None:
    tag = uuid.uuid4().hex[:6]
    steps = [
        [("web_search", {"query": f"{tag} {step} a"}), ("web_search", {"query": f"{tag} {step} b"})]
        for step in range(25)
    ]
    for step in range(25):
        for half in "ab":
            search_server.results_for(
                f"{tag} {step} {half}",
                [
                    SearchHit(
                        title=f"hit {i}", url=f"https://example.com/{step}/{i}", content="x" * 400
                    )
                    for i in range(5)
                ],
            )
    provider_server.script("tools-many", Script(tool_steps=steps, reply="searched fifty times"))
    response, _events = await send_and_collect(
        client,
        tenant.headers,
        {"message": "search a lot", "model": "mock/tools-many", "web": True, "maxSteps": 30},
    )
    assert response.status_code == 200
    answer = await wait_for_settled_answer(
        client, tenant.headers, response.headers["x-chat-id"], timeout=120
    )
    calls = tool_parts(answer)
    assert len(calls) == 50
    assert all(call["state"] == "output-available" for call in calls)
    assert answer["metadata"]["steps"] == 26

    temporal = await Client.connect(
        settings.resolved_temporal_address, namespace=settings.temporal_namespace
    )
    history = await temporal.get_workflow_handle(
        turn_workflow_id(response.headers["x-turn-id"])
    ).fetch_history()
    events_count = len(history.events)
    size = sum(len(event.SerializeToString()) for event in history.events)
    largest = max(len(event.SerializeToString()) for event in history.events)
    print(
        f"\n[tools] 50 calls: {events_count} history events, {size} bytes, largest event {largest} bytes"
    )
    # Tool inputs and outputs (50 searches of 5 results, about 2.5 KB each) stay in Postgres:
    # history holds ids and small descriptors only.
    assert size < 250_000, "Temporal warns at 10 MB and stops at 50 MB"
    assert largest < 8_000


async def test_a_stop_during_a_tool_call_cancels_it_and_keeps_what_came_before(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    pages: FileServer,
) -> None:
    pages.serve_slowly("/slow.html", ARTICLE * 2000, "text/html", piece_delay=0.5)
    slow_url = f"{pages.base_url}/slow.html"
    provider_server.script(
        "tools-slow",
        Script(
            tool_steps=[[("web_fetch", {"url": slow_url})]],
            text_before_calls="Reading the page first.",
            reply="never reached",
        ),
    )
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "read it", "model": "mock/tools-slow", "web": True},
        headers=tenant.headers,
    ) as response:
        chat_id = response.headers["x-chat-id"]
        async for line in response.aiter_lines():
            if '"type":"data-status"' in line:
                break
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        assert stop.json()["stopped"] is True
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert answer["status"] == "aborted"
    assert answer["parts"][1] == {
        "type": "text",
        "text": "Reading the page first.",
        "state": "done",
    }
    (fetch,) = tool_parts(answer)
    assert fetch["state"] == "input-available", "the cancelled call has no outcome"


async def test_a_worker_killed_mid_tool_reruns_only_that_tool(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
    pages: FileServer,
    running_services: RunningServices,
) -> None:
    path = f"/slow-{uuid.uuid4().hex[:6]}.html"
    # About 3 s to read: long enough to kill the worker in the middle of it.
    pages.serve_slowly(path, ARTICLE + b" " * (64 * 1024 * 6), "text/html", piece_delay=0.5)
    query = f"crash {uuid.uuid4().hex[:6]}"
    search_server.results_for(query, [SearchHit(title="t", url="https://example.com", content="c")])
    provider_server.script(
        "tools-slow",
        Script(
            tool_steps=[
                [("web_search", {"query": query})],
                [("web_fetch", {"url": pages.base_url + path})],
            ],
            reply="read it after the crash",
        ),
    )
    model_requests = len(provider_server.requests_for("tools-slow"))
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "go", "model": "mock/tools-slow", "web": True},
        headers=tenant.headers,
    ) as streaming:
        chat_id = streaming.headers["x-chat-id"]
    await _wait_until(lambda: pages.requests.count(path) == 1, "the fetch to start")
    running_services.worker.kill()
    running_services.worker.start()
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id, timeout=90)
    assert answer["status"] == "complete", answer
    search, fetch = tool_parts(answer)
    assert search["state"] == "output-available"
    assert fetch["state"] == "output-available"
    assert answer["parts"][-1]["text"] == "read it after the crash"
    assert pages.requests.count(path) == 2, "the interrupted fetch ran once more"
    asked = [r for r in search_server.requests_to("searxng") if r.params.get("q") == query]
    assert len(asked) == 1, "the completed search was not run again"
    rounds = [r.tool_history().rounds for r in provider_server.requests_for("tools-slow")]
    assert rounds[model_requests:] == [0, 1, 2], "no model step ran twice"


async def _wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    try:
        async with asyncio.timeout(timeout):
            # The servers record requests from their own threads: polling is all there is.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"waited {timeout}s for {what}") from None


async def test_web_true_without_a_search_backend_is_refused_saying_so(settings: Any) -> None:
    unconfigured = SimpleNamespace(settings=settings.model_copy(update={"searxng_url": None}))
    with pytest.raises(BadRequestError, match="web search is not configured"):
        await plan_tools(
            unconfigured,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            ToolOptionsIn.model_validate({"web": True}),
            "mock/tools-agent",
        )


async def test_a_chats_web_setting_offers_the_web_tools_to_sends_that_do_not_say(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
) -> None:
    query = f"chat setting {uuid.uuid4().hex[:6]}"
    search_server.results_for(
        query, [SearchHit(title="t", url="https://example.com/a", content="c")]
    )
    provider_server.script(
        "tools-agent", Script(tool_steps=[[("web_search", {"query": query})]], reply="found it")
    )
    first, _events = await send_and_collect(
        client, tenant.headers, {"message": "hello", "model": "mock/tools-agent"}
    )
    chat_id = first.headers["x-chat-id"]
    offered = provider_server.requests_for("tools-agent")[-1].tools
    assert offered == [], "no tools unless the send or the chat asks"
    await wait_for_settled_answer(client, tenant.headers, chat_id)
    patched = await client.patch(f"/v1/chats/{chat_id}", json={"web": True}, headers=tenant.headers)
    assert patched.json()["web"] is True
    response, _events = await send_and_collect(
        client,
        tenant.headers,
        {"message": "search", "model": "mock/tools-agent"},
        f"/v1/chats/{chat_id}",
    )
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)
    (search,) = tool_parts(answer)
    assert search["state"] == "output-available"
    names = {
        tool["function"]["name"] for tool in provider_server.requests_for("tools-agent")[-1].tools
    }
    assert names == {"web_search", "web_fetch"}
    assert response.status_code == 200
    # A send that says `web: false` turns them off for itself.
    await send_and_collect(
        client,
        tenant.headers,
        {"message": "no tools", "model": "mock/tools-agent", "web": False},
        f"/v1/chats/{chat_id}",
    )
    assert provider_server.requests_for("tools-agent")[-1].tools == []


async def test_a_worker_killed_mid_step_resets_only_that_step(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
    running_services: RunningServices,
) -> None:
    query = f"mid step {uuid.uuid4().hex[:6]}"
    search_server.results_for(
        query, [SearchHit(title="t", url="https://example.com/b", content="c")]
    )
    provider_server.script(
        "tools-slow",
        Script(
            tool_steps=[[("web_search", {"query": query})]],
            reply=" ".join(f"word{i}" for i in range(120)),
            chunk_delay=0.05,
        ),
    )
    before = len(provider_server.requests_for("tools-slow"))
    chunks: list[dict[str, Any]] = []
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "go", "model": "mock/tools-slow", "web": True},
        headers=tenant.headers,
        timeout=httpx.Timeout(60.0),
    ) as response:
        chat_id = response.headers["x-chat-id"]
        killed = False
        async for event in iter_sse(response):
            if event.data == "[DONE]":
                break
            chunks.append(event.chunk)
            deltas = [c for c in chunks if c["type"] == "text-delta"]
            if not killed and len(deltas) >= 10:
                # The second step is streaming: the search of the first is done and stored.
                running_services.worker.kill()
                running_services.worker.start()
                killed = True
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id, timeout=60)
    assert answer["status"] == "complete"
    kinds = [part["type"] for part in answer["parts"]]
    assert kinds == ["step-start", "tool-web_search", "step-start", "source-url", "text"], kinds
    assert answer["parts"][-1]["text"].split() == [f"word{i}" for i in range(120)]
    assert "reset-step" in [chunk["type"] for chunk in chunks]
    asked = [r for r in search_server.requests_to("searxng") if r.params.get("q") == query]
    assert len(asked) == 1, "the first step's search did not run again"
    rounds = [r.tool_history().rounds for r in provider_server.requests_for("tools-slow")[before:]]
    assert rounds == [0, 1, 1], "only the interrupted step was generated again"
    assembled = await run_ai_client({"mode": "assemble", "chunks": chunks})
    assert assembled["message"]["parts"] == answer["parts"]


async def test_a_stored_message_with_tools_replays_as_chunks_the_ai_client_assembles_the_same(
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    search_server: SearchServer,
) -> None:
    """When Redis no longer holds a finished turn's stream, it is served from Postgres as chunks."""
    query = f"replay {uuid.uuid4().hex[:6]}"
    search_server.results_for(
        query, [SearchHit(title="t", url="https://example.com/r", content="c")]
    )
    provider_server.script(
        "tools-agent",
        Script(
            tool_steps=[
                [("web_search", {"query": query}), ("web_fetch", {"url": "http://10.0.0.1/"})]
            ],
            text_before_calls="Looking. ",
            reply="Done looking.",
        ),
    )
    response, _events = await send_and_collect(
        client, tenant.headers, {"message": "look", "model": "mock/tools-agent", "web": True}
    )
    stored = await wait_for_settled_answer(client, tenant.headers, response.headers["x-chat-id"])
    chunks = stored_message_chunks(
        stored["id"], stored["parts"], stored["metadata"], stored["status"], resuming=False
    )
    assembled = await run_ai_client({"mode": "assemble", "chunks": chunks})
    assert assembled["error"] is None, assembled
    assert assembled["message"]["parts"] == stored["parts"]
