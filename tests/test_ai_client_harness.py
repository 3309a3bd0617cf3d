"""The AI SDK client harness against a canned UI message stream server.

These tests pin two things before the real API exists: that `tests/js/ai_client.mjs` reports what
the `ai` package assembles, and how `ai` v7 itself behaves on the wire (request body and resume URL
of `DefaultChatTransport`, and `reset-step` semantics, which is how a retried generation attempt
drops its partial output). The server below is deliberately dumb: it replays fixed chunk lists.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.ai_client import ai_client_available, run_ai_client

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

Chunk = dict[str, Any]

METADATA = {"chatId": "chat-1", "turnId": "turn-1", "model": "local/echo"}
USAGE = {"inputTokens": 3, "outputTokens": 2}


def _text(part_id: str, *deltas: str) -> list[Chunk]:
    return [
        {"type": "text-start", "id": part_id},
        *({"type": "text-delta", "id": part_id, "delta": delta} for delta in deltas),
        {"type": "text-end", "id": part_id},
    ]


START: list[Chunk] = [
    {"type": "start", "messageId": "msg-1", "messageMetadata": METADATA},
    {"type": "start-step"},
]
FINISH: list[Chunk] = [
    {"type": "finish-step"},
    {"type": "finish", "finishReason": "stop", "messageMetadata": USAGE},
]
FAILED_ATTEMPT: list[Chunk] = [
    {"type": "text-start", "id": "t0"},
    {"type": "text-delta", "id": "t0", "delta": "garbled par"},
]

SCENARIOS: dict[str, list[Chunk]] = {
    "basic": [*START, *_text("t0", "Hel", "lo"), *FINISH],
    # A retried attempt: drop the partial text, then stream the new attempt in the same step. The
    # new attempt may reuse the part id because reset-step forgets the active parts.
    "reset": [*START, *FAILED_ATTEMPT, {"type": "reset-step"}, *_text("t0", "Hello"), *FINISH],
    # Same, but the server opens a new step after the reset: the old step-start part stays.
    "reset-then-start-step": [
        *START,
        *FAILED_ATTEMPT,
        {"type": "reset-step"},
        {"type": "start-step"},
        *_text("t0", "Hello"),
        *FINISH,
    ],
    # reset-step removes only the current step, never a finished earlier one.
    "reset-second-step": [
        *START,
        *_text("t0", "First"),
        {"type": "finish-step"},
        {"type": "start-step"},
        *FAILED_ATTEMPT,
        {"type": "reset-step"},
        *_text("t1", "Hello"),
        *FINISH,
    ],
    # A delta after reset-step without a fresh text-start is a protocol violation.
    "reset-without-text-start": [
        *START,
        *FAILED_ATTEMPT,
        {"type": "reset-step"},
        {"type": "text-delta", "id": "t0", "delta": "Hello"},
        *FINISH,
    ],
    "error-chunk": [
        *START,
        {"type": "text-start", "id": "t0"},
        {"type": "text-delta", "id": "t0", "delta": "Hel"},
        {"type": "error", "errorText": "provider exploded"},
    ],
    "unknown-chunk": [*START, {"type": "bogus-chunk"}, *_text("t0", "Hello"), *FINISH],
    # Sends a partial answer, then idles (with comment pings) until the client goes away.
    "hang": [
        *START,
        {"type": "text-start", "id": "t0"},
        {"type": "text-delta", "id": "t0", "delta": "Hel"},
    ],
}

EXPECTED_BASIC_MESSAGE = {
    "id": "msg-1",
    "role": "assistant",
    "metadata": {**METADATA, **USAGE},
    "parts": [{"type": "step-start"}, {"type": "text", "text": "Hello", "state": "done"}],
}

USER_MESSAGES = [{"id": "user-1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]
HEADERS = {"authorization": "Bearer test-key"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CannedServer:
    """A UI message stream endpoint at `{api}` plus the resume endpoint `{api}/{chatId}/stream`."""

    base_url: str
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnected: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1/chats"

    def requests_for(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]


def _make_handler(server: CannedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the body ends when the connection closes, so no chunked framing is needed.

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _record(self) -> RecordedRequest:
            length = int(self.headers.get("content-length") or 0)
            request = RecordedRequest(
                method=self.command,
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length),
            )
            server.requests.append(request)
            return request

        def do_POST(self) -> None:
            request = self._record()
            payload = json.loads(request.body)
            scenario = payload.get("scenario", "basic")
            if scenario == "not-found":
                self._problem(HTTPStatus.NOT_FOUND, "chat not found")
                return
            self._stream(SCENARIOS[scenario], chat_id=payload["id"], hang=scenario == "hang")

        def do_GET(self) -> None:
            self._record()
            prefix, _, chat_id = self.path.removesuffix("/stream").rpartition("/")
            if prefix != "/v1/chats" or not self.path.endswith("/stream"):
                self._problem(HTTPStatus.NOT_FOUND, "no such route")
            elif chat_id.startswith("idle"):
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()
            else:
                self._stream(SCENARIOS["basic"], chat_id=chat_id, hang=False)

        def _problem(self, status: HTTPStatus, detail: str) -> None:
            body = json.dumps(
                {"type": "about:blank", "title": status.phrase, "status": status, "detail": detail}
            ).encode()
            self.send_response(status)
            self.send_header("content-type", "application/problem+json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, chunks: list[Chunk], *, chat_id: str, hang: bool) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("x-vercel-ai-ui-message-stream", "v1")
            self.send_header("x-chat-id", chat_id)
            self.end_headers()
            # CRLF separators, cursor ids and a comment ping, as sse-starlette will send them.
            self.wfile.write(b": ping\r\n\r\n")
            for index, chunk in enumerate(chunks):
                data = json.dumps(chunk, separators=(",", ":"))
                self.wfile.write(f"id: 1700000000000-{index}\r\ndata: {data}\r\n\r\n".encode())
            self.wfile.flush()
            if hang:
                self._ping_until_disconnect(chat_id)
                return
            self.wfile.write(b"data: [DONE]\r\n\r\n")

        def _ping_until_disconnect(self, chat_id: str) -> None:
            event = server.disconnected.setdefault(chat_id, threading.Event())
            for _ in range(200):
                try:
                    self.wfile.write(b": ping\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    event.set()
                    return
                event.wait(0.05)

    return Handler


@pytest.fixture(scope="module")
def canned_server() -> Iterator[CannedServer]:
    canned = CannedServer(base_url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(canned))
    httpd.daemon_threads = True
    canned.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="canned-ui-stream", daemon=True)
    thread.start()
    try:
        yield canned
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def _send(server: CannedServer, chat_id: str, scenario: str, **extra: Any) -> dict[str, Any]:
    return await run_ai_client(
        {
            "mode": "send",
            "api": server.api,
            "headers": HEADERS,
            "chatId": chat_id,
            "messages": USER_MESSAGES,
            "trigger": "submit-message",
            "body": {"scenario": scenario},
            **extra,
        }
    )


async def test_send_assembles_the_message_and_reports_every_chunk(
    canned_server: CannedServer,
) -> None:
    result = await _send(canned_server, "chat-basic", "basic")

    assert result["error"] is None
    assert result["message"] == EXPECTED_BASIC_MESSAGE
    # Chunks come back exactly as sent: v7 parses them with loose schemas and adds no defaults.
    assert result["chunks"] == SCENARIOS["basic"]
    assert result["aborted"] is False


async def test_send_posts_the_default_transport_body(canned_server: CannedServer) -> None:
    await _send(canned_server, "chat-body", "basic")

    (request,) = canned_server.requests_for("/v1/chats")[-1:]
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == HEADERS["authorization"]
    # Extra body fields are spread first, then the transport's own keys; an undefined messageId is
    # dropped by JSON.stringify rather than sent as null.
    assert json.loads(request.body) == {
        "scenario": "basic",
        "id": "chat-body",
        "messages": USER_MESSAGES,
        "trigger": "submit-message",
    }


async def test_regenerate_sends_trigger_and_message_id(canned_server: CannedServer) -> None:
    await _send(
        canned_server, "chat-regen", "basic", trigger="regenerate-message", messageId="msg-0"
    )

    body = json.loads(canned_server.requests_for("/v1/chats")[-1].body)
    assert body["trigger"] == "regenerate-message"
    assert body["messageId"] == "msg-0"


@pytest.mark.parametrize(
    ("scenario", "expected_parts"),
    [
        pytest.param(
            "reset",
            [{"type": "step-start"}, {"type": "text", "text": "Hello", "state": "done"}],
            id="reset-keeps-the-step-start",
        ),
        pytest.param(
            "reset-then-start-step",
            [
                {"type": "step-start"},
                {"type": "step-start"},
                {"type": "text", "text": "Hello", "state": "done"},
            ],
            id="new-start-step-adds-a-second-step",
        ),
        pytest.param(
            "reset-second-step",
            [
                {"type": "step-start"},
                {"type": "text", "text": "First", "state": "done"},
                {"type": "step-start"},
                {"type": "text", "text": "Hello", "state": "done"},
            ],
            id="earlier-steps-survive",
        ),
    ],
)
async def test_reset_step_drops_the_partial_attempt(
    canned_server: CannedServer, scenario: str, expected_parts: list[dict[str, Any]]
) -> None:
    result = await _send(canned_server, f"chat-{scenario}", scenario)

    assert result["error"] is None
    assert result["message"]["parts"] == expected_parts
    assert "garbled" not in json.dumps(result["message"])


async def test_reset_step_forgets_open_parts(canned_server: CannedServer) -> None:
    result = await _send(canned_server, "chat-reset-no-start", "reset-without-text-start")

    assert "missing text part" in result["error"]
    # The client stops at the violation: the reset already emptied the step, nothing came after.
    assert result["message"]["parts"] == [{"type": "step-start"}]


async def test_error_chunk_is_reported_and_keeps_the_partial_message(
    canned_server: CannedServer,
) -> None:
    result = await _send(canned_server, "chat-error", "error-chunk")

    assert result["error"] == "provider exploded"
    assert result["chunks"][-1] == {"type": "error", "errorText": "provider exploded"}
    assert result["message"]["parts"][-1] == {"type": "text", "text": "Hel", "state": "streaming"}


async def test_unknown_chunk_type_is_rejected(canned_server: CannedServer) -> None:
    result = await _send(canned_server, "chat-unknown", "unknown-chunk")

    assert result["error"] is not None
    # The invalid chunk fails parsing before it reaches the assembler, and the stream ends there.
    assert result["chunks"] == START


async def test_http_error_is_reported_with_status_and_body(canned_server: CannedServer) -> None:
    result = await _send(canned_server, "chat-missing", "not-found")

    assert result["httpStatus"] == 404
    assert "chat not found" in result["error"]
    assert result["message"] is None
    assert result["chunks"] == []


async def test_abort_after_chunks_reports_the_partial_message_and_disconnects(
    canned_server: CannedServer,
) -> None:
    result = await _send(canned_server, "chat-hang", "hang", abortAfterChunks=4)

    assert result["aborted"] is True
    assert result["error"] is None
    assert result["chunks"] == SCENARIOS["hang"][:4]
    assert result["message"]["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": "Hel", "state": "streaming"},
    ]
    disconnected = canned_server.disconnected["chat-hang"]
    assert await asyncio.to_thread(disconnected.wait, 5), "server never saw the client go away"


async def test_reconnect_without_active_stream(canned_server: CannedServer) -> None:
    result = await run_ai_client(
        {"mode": "reconnect", "api": canned_server.api, "headers": HEADERS, "chatId": "idle-chat"}
    )

    assert result == {
        "message": None,
        "chunks": [],
        "error": None,
        "httpStatus": None,
        "aborted": False,
        "noActiveStream": True,
    }
    # The default resume request: GET {api}/{chatId}/stream, the transport's headers, no body, no
    # Last-Event-ID, so the server must replay the active message from its `start` chunk.
    (request,) = canned_server.requests_for("/v1/chats/idle-chat/stream")
    assert request.method == "GET"
    assert request.body == b""
    assert request.headers["authorization"] == HEADERS["authorization"]
    assert "last-event-id" not in request.headers
    assert "content-type" not in request.headers


async def test_reconnect_replays_the_active_message(canned_server: CannedServer) -> None:
    result = await run_ai_client(
        {"mode": "reconnect", "api": canned_server.api, "headers": HEADERS, "chatId": "live-chat"}
    )

    assert result["noActiveStream"] is False
    assert result["error"] is None
    assert result["message"] == EXPECTED_BASIC_MESSAGE
    assert result["chunks"] == SCENARIOS["basic"]
