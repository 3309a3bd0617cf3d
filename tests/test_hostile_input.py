"""Hostile input: JSON bodies nested too deep or holding too many items, floods of validation errors,
requests the HTTP server cannot parse, methods a path does not answer, HEAD. Each gets a fast, clear
4xx problem, and the api keeps answering everyone else meanwhile.

The api of this module runs with the console log renderer (`DURACHAT_LOG_JSON=false`, the default),
where rendering one such request's traceback once kept the api from answering anything for minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog

from api.schemas import _unstorable_text_at
from core.logging import configure_logging
from core.settings import Settings
from devstack.ports import free_port_block
from tests.conftest import RunningServices, Tenant, process_environment
from tests.support.chat_api import assert_problem
from tests.support.processes import ServiceProcess, wait_until_ready
from tests.support.sse import chunks_of, collect_sse, iter_sse, text_of

# Generous: these bound a hang, they do not measure speed.
REQUEST_TIMEOUT_SECONDS = 20
# A turn long enough to stream all through the hostile requests: 60 words, 50 ms apart.
STEADY_TURN = {"model": "local/lorem", "providerOptions": {"local": {"words": 60, "delayMs": 50}}}
JSON_HEADERS = {"Content-Type": "application/json"}


def nested_arrays(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


def many_keys(count: int) -> str:
    return json.dumps({"message": "hi", **{str(i): 0 for i in range(count)}}, separators=(",", ":"))


# The probes that froze the api or answered 500 or megabytes: each is refused before any deep work.
HOSTILE_BODIES: dict[str, tuple[str, str]] = {
    "a 955-deep array in an unknown key": (
        '{"message": "hi", "unknownKey": ' + nested_arrays(955) + "}",
        "maxDepth",
    ),
    "providerOptions 700 levels deep": (
        '{"message": "hi", "providerOptions": {"local": {"a": ' + nested_arrays(700) + "}}}",
        "maxDepth",
    ),
    "10,000 levels": (nested_arrays(10_000), "maxDepth"),
    "objects 80 deep in a message": (
        '{"messages": [{"role": "user", "content": "hi", "metadata": '
        + '{"a": ' * 80
        + "1"
        + "}" * 80
        + "}]}",
        "maxDepth",
    ),
    "100,000 unknown keys": (many_keys(100_000), "maxItems"),
}


@pytest.fixture(scope="module")
def console_api_url(
    settings: Settings,
    running_services: RunningServices,  # the worker that runs this module's turns
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """An api of its own with the console log renderer, whatever the environment of the suite says."""
    port = free_port_block()
    console = settings.model_copy(update={"api_port": port, "log_json": False})
    process = ServiceProcess(
        "api", process_environment(console), tmp_path_factory.mktemp("console")
    )
    process.start()
    url = f"http://{settings.api_host}:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.stop()


@pytest.fixture
async def api(console_api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=console_api_url, timeout=REQUEST_TIMEOUT_SECONDS) as http:
        yield http


async def new_chat(api: httpx.AsyncClient, tenant: Tenant, message: str) -> str:
    response = await api.post(
        "/v1/chats", params={"stream": "false"}, json={"message": message}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    chat_id: str = response.json()["chatId"]
    return chat_id


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
async def test_a_body_past_the_json_bounds_gets_a_short_400_problem(
    api: httpx.AsyncClient, tenant: Tenant, name: str
) -> None:
    body, limit = HOSTILE_BODIES[name]
    assert len(body) < 1_000_000  # under the size limit: the shape alone is refused
    response = await api.post("/v1/chats", content=body, headers={**tenant.headers, **JSON_HEADERS})
    problem = assert_problem(response, 400)
    assert problem["type"] == "/problems/bad-request"
    assert problem[limit] == {"maxDepth": 64, "maxItems": 10_000}[limit]
    assert len(response.content) < 2_000


async def test_the_api_keeps_answering_while_hostile_bodies_arrive(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await new_chat(api, tenant, "steady as she goes")
    hostile_done = asyncio.Event()

    async def bystander() -> int:
        """Reads the way other clients do until every hostile body is answered; each read must succeed."""
        rounds = 0
        while not hostile_done.is_set() or rounds < 3:
            health = await api.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            chat = await api.get(f"/v1/chats/{chat_id}", headers=tenant.headers)
            assert chat.status_code == 200, chat.text
            assert chat.json()["id"] == chat_id
            assert chat.json()["messages"][0]["parts"][0]["text"] == "steady as she goes"
            rounds += 1
        return rounds

    async def streamed_turn() -> str:
        """A turn streamed to its end through it all."""
        async with api.stream(
            "POST", "/v1/chats", json={"message": "go", **STEADY_TURN}, headers=tenant.headers
        ) as response:
            assert response.status_code == 200
            chunks = chunks_of(await collect_sse(response))
        assert chunks[-1]["type"] == "finish"
        return text_of(chunks)

    async def hostile() -> list[int]:
        statuses = []
        try:
            for body, _ in HOSTILE_BODIES.values():
                response = await api.post(
                    "/v1/chats", content=body, headers={**tenant.headers, **JSON_HEADERS}
                )
                statuses.append(response.status_code)
            # Many validation errors, under the item bound: a capped 422.
            response = await api.post(
                "/v1/chats", content=many_keys(9_000), headers={**tenant.headers, **JSON_HEADERS}
            )
            statuses.append(response.status_code)
        finally:
            hostile_done.set()
        return statuses

    async with asyncio.timeout(120):
        rounds, text, statuses = await asyncio.gather(bystander(), streamed_turn(), hostile())
    assert statuses == [400] * len(HOSTILE_BODIES) + [422]
    assert rounds >= 3
    assert len(text.split()) == 60


async def test_a_validation_problem_lists_the_first_errors_and_counts_them_all(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    response = await api.post(
        "/v1/chats", content=many_keys(5_000), headers={**tenant.headers, **JSON_HEADERS}
    )
    problem = assert_problem(response, 422)
    assert problem["type"] == "/problems/validation"
    assert problem["errorCount"] == 5_000
    assert len(problem["errors"]) == 20
    assert all(error["type"] == "extra_forbidden" for error in problem["errors"])
    assert problem["detail"].endswith("(and 4999 more)")
    assert len(response.content) < 5_000


def test_the_storable_text_check_finds_text_at_any_depth() -> None:
    value: Any = "bad\x00text"
    for _ in range(5_000):
        value = {"k": [value]}
    assert _unstorable_text_at(value) == ".".join(["k", "0"] * 5_000)
    assert _unstorable_text_at({"fine": [{"text": "ok"}] * 3}) is None


@pytest.mark.parametrize("content_length", ["18446744073709551616", "-1"])
async def test_a_content_length_the_server_cannot_read_gets_a_problem(
    console_api_url: str, content_length: str
) -> None:
    host, port = console_api_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/chats HTTP/1.1\r\nHost: durachat\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {content_length}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
            raw = await reader.read()  # the server answers, then closes the connection
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert status_line.startswith("HTTP/1.1 400")
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert problem["status"] == 400
    assert problem["type"] == "/problems/bad-request"
    assert problem["title"]
    assert "Content-Length" in problem["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/chats", "GET, HEAD, POST"),
        ("PUT", "/v1/chats/{chat_id}", "DELETE, GET, HEAD, PATCH, POST"),
        ("GET", "/v1/chats/{chat_id}/stop", "POST"),
        ("DELETE", "/v1/chats/{chat_id}/stream", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
    ],
)
async def test_a_method_the_path_does_not_answer_gets_405_listing_every_one_it_does(
    api: httpx.AsyncClient, tenant: Tenant, method: str, path: str, allowed: str
) -> None:
    response = await api.request(method, path.format(chat_id="some-chat"), headers=tenant.headers)
    assert response.headers["allow"] == allowed
    problem = assert_problem(response, 405)
    assert problem["type"] == "/problems/method-not-allowed"
    assert allowed in problem["detail"]


async def test_head_answers_wherever_get_does_with_its_headers_and_no_body(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await new_chat(api, tenant, "head first")
    for path, headers in [
        ("/healthz", {}),
        ("/v1/chats", tenant.headers),
        (f"/v1/chats/{chat_id}", tenant.headers),
        (f"/v1/chats/{chat_id}/stream", tenant.headers),  # nothing active: 204
        ("/v1/chats/no-such-chat", tenant.headers),
        ("/openapi.json", {}),
    ]:
        get = await api.get(path, headers=headers)
        head = await api.head(path, headers=headers)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        for name in ("content-type", "content-length"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)


async def test_head_of_a_live_stream_answers_its_headers_and_ends(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    async with api.stream(
        "POST", "/v1/chats", json={"message": "go", **STEADY_TURN}, headers=tenant.headers
    ) as sent:
        assert sent.status_code == 200
        chat_id = sent.headers["x-chat-id"]
        await anext(iter_sse(sent))  # the turn runs
        head = await api.head(f"/v1/chats/{chat_id}/stream", headers=tenant.headers)
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("text/event-stream")
    assert head.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert head.content == b""


async def test_an_unknown_path_is_a_not_found_problem_of_the_family(
    api: httpx.AsyncClient,
) -> None:
    problem = assert_problem(await api.get("/v1/no-such-thing"), 404)
    assert problem["type"] == "/problems/not-found"


LOCAL_ONLY_TEXT = "text only a local variable holds"


class _Deep(Exception):
    pass


def _dive(depth: int, payload: Any) -> None:
    if depth == 0:
        raise _Deep("at the bottom")
    _dive(depth - 1, payload)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """The process's own logging set up again after a test that configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


@pytest.mark.parametrize("log_json", [False, True])
@pytest.mark.usefixtures("restored_logging")
def test_a_logged_traceback_is_plain_and_bounded_however_deep(
    capsys: pytest.CaptureFixture[str], log_json: bool
) -> None:
    configure_logging(Settings(log_json=log_json))  # its handler writes to the captured stderr
    # A local variable nested deep in every frame: what pretty tracebacks spent minutes rendering.
    payload: Any = LOCAL_ONLY_TEXT
    for _ in range(30):
        payload = [payload]
    try:
        _dive(100, payload)
    except _Deep:
        structlog.get_logger("tests.hostile_input").exception("tests.deep_failure")
    output = capsys.readouterr().err
    traceback_text = json.loads(output)["exception"] if log_json else output
    assert "Traceback (most recent call last)" in traceback_text
    assert "frames elided" in traceback_text
    assert "_Deep: at the bottom" in traceback_text
    assert LOCAL_ONLY_TEXT not in output  # no local variable rendered
    assert len(output) < 20_000
