"""A local server speaking Ollama's native chat API (`POST /api/chat`, NDJSON), scripted by model name.

The production adapter runs against it unchanged, through the real `ollama` SDK. It runs uvicorn in
a background thread on a free 127.0.0.1 port (`BackgroundApp`).

Behaviour follows the model name (`script_for_model`), or a `Script` registered with `script()`:

    echo                  streams the last user message back, word by word
    reply-<words>         streams <words> with hyphens read as spaces: reply-hello-world
    thinking-<words>      `message.thinking` lines first, then the reply
    length-<words>        the reply, finished with done_reason "length"
    slow / slow-<ms>      1000 words, one line per 50 ms (or <ms>): for stop and timeout tests
    fail-<status>         always that HTTP status with Ollama's `{"error": "..."}` body
    midstream-error       3 lines, then an `{"error": ...}` line inside the 200 stream
    drop                  3 lines, then the connection is cut before the `done` line
    truncated             3 lines, then the body ends cleanly without a `done` line
    garbage               3 lines, then one that is not JSON, as a proxy's page would be
    anything else         404 `model 'x' not found`, as Ollama answers a model not pulled

Every line is one JSON object followed by `\\n`, as `application/x-ndjson`; the last one has
`done: true`, `done_reason` and the token counts (omitted when zero, as Ollama does).
`options.num_predict` caps the reply in words and finishes it with "length". Images must be bare
base64 strings (anything else is Ollama's 400). Every request is recorded (`requests`), with whether
its stream finished or the client left early.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.background_app import BackgroundApp

_PIECE = re.compile(r"\s*\S+\s*|\s+\Z")

MIDSTREAM_ERROR = "an error was encountered while running the model"

_ERRORS: dict[int, str] = {
    400: "invalid request",
    401: "unauthorized",
    403: "forbidden",
    404: "model '{model}' not found",
    429: "too many requests, please try again later",
    500: "llama runner process has terminated: exit status 2",
    502: "bad gateway: the cloud model could not be reached",
    503: "server busy, please try again.  maximum pending requests exceeded",
}


@dataclass(frozen=True)
class Script:
    """How the server answers one model."""

    reply: str | None = None  # None: echo the last user message
    thinking: str = ""
    done_reason: str = "stop"
    line_delay: float = 0.0  # seconds between lines
    fail_status: int | None = None
    error_after_lines: int | None = None  # an `{"error": ...}` line after n content lines
    drop_after_lines: int | None = None  # cut the connection after n content lines
    end_after_lines: int | None = None  # end the body cleanly after n lines, with no `done`
    garbage_after_lines: int | None = None  # a line that is not JSON after n content lines


def script_for_model(model: str) -> Script | None:
    """The Script a model name asks for, or None for a model that is not pulled."""
    name, _, argument = model.partition("-")
    words = argument.replace("-", " ")
    if model == "echo":
        return Script()
    if name == "reply" and argument:
        return Script(reply=words)
    if name == "thinking" and argument:
        return Script(reply=words, thinking=f"The user wants {words}. I will answer.")
    if name == "length" and argument:
        return Script(reply=words, done_reason="length")
    if model == "slow" or (name == "slow" and argument.isdigit()):
        delay = int(argument) / 1000 if argument else 0.05
        return Script(reply=" ".join(f"w{index}" for index in range(1000)), line_delay=delay)
    if name == "fail" and argument.isdigit():
        return Script(fail_status=int(argument))
    if model == "midstream-error":
        return Script(reply="this answer breaks off early", error_after_lines=3)
    if model == "drop":
        return Script(reply="this answer is cut off by a dropped connection", drop_after_lines=3)
    if model == "truncated":
        return Script(reply="this answer simply stops short", end_after_lines=3)
    if model == "garbage":
        return Script(reply="this answer turns into a proxy page", garbage_after_lines=3)
    return None


@dataclass
class RecordedRequest:
    """One request the server received, as it arrived."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]
    finished: threading.Event = field(default_factory=threading.Event)  # whole body sent
    disconnected: threading.Event = field(default_factory=threading.Event)  # client left early

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages", [])
        return list(messages) if isinstance(messages, list) else []

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def raw_images(self) -> list[str]:
        """Every `messages[].images` entry, exactly as it arrived, in order."""
        return [
            image
            for message in self.messages
            if isinstance(message, dict)
            for image in message.get("images") or []
        ]

    def images(self) -> list[bytes]:
        """The decoded bytes of every image in the request, in order."""
        return [base64.b64decode(image, validate=True) for image in self.raw_images()]


class _DroppedConnection(Exception):
    """Raised inside a streaming body so uvicorn aborts the connection mid-response."""


class OllamaServer:
    """`with OllamaServer() as server:` then point an adapter at `server.base_url`."""

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key  # when set, other bearer tokens get a 401, as ollama.com answers
        self._scripts: dict[str, Script] = {}
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._background: BackgroundApp | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, model: str, script: Script) -> None:
        """Answer `model` with `script`, taking precedence over the model-name conventions."""
        with self._lock:
            self._scripts[model] = script

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget recorded requests (scripts stay)."""
        with self._lock:
            self._requests.clear()

    def providers_entry(self, models: list[str]) -> dict[str, Any]:
        """One `DURACHAT_PROVIDERS` entry configuring this server as an Ollama provider."""
        entry: dict[str, Any] = {"type": "ollama", "base_url": self.base_url, "models": models}
        if self.api_key:
            entry["api_key"] = self.api_key
        return entry

    def start(self) -> None:
        self._background = BackgroundApp(self._app(), name="Ollama test server")
        self._background.start()
        self.port = self._background.port

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def __enter__(self) -> OllamaServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/api/chat", self._chat, methods=["POST"])])

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        record = RecordedRequest(
            path=request.url.path,
            headers={key.lower(): value for key, value in request.headers.items()},
            body=body if isinstance(body, dict) else {},
        )
        with self._lock:
            self._requests.append(record)
        if not isinstance(body, dict):
            return _error(400, "invalid character in request body")
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            return _error(401, _ERRORS[401])
        model = record.model
        if not model:
            return _error(400, "model is required")
        bad_image = _bad_image(record)
        if bad_image is not None:
            return _error(400, bad_image)
        with self._lock:
            script = self._scripts.get(model) or script_for_model(model)
        if script is None:
            return _error(404, _ERRORS[404].format(model=model))
        if script.fail_status is not None:
            template = _ERRORS.get(script.fail_status, "error")
            return _error(script.fail_status, template.format(model=model))

        reply = script.reply if script.reply is not None else _last_user_text(record.messages)
        pieces = _PIECE.findall(reply)
        done_reason = script.done_reason
        options = body.get("options")
        cap = options.get("num_predict") if isinstance(options, dict) else None
        if isinstance(cap, int) and 0 <= cap < len(pieces):
            pieces, done_reason = pieces[:cap], "length"
        thinking = _PIECE.findall(script.thinking)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in record.messages)
        output_tokens = len("".join(pieces).split()) + len(thinking)
        final = _final_fields(model, done_reason, prompt_tokens, output_tokens)

        if body.get("stream") is False:
            message = {"role": "assistant", "content": "".join(pieces)}
            if thinking:
                message["thinking"] = "".join(thinking)
            return JSONResponse({**final, "message": message})
        lines = _stream_lines(script, model, thinking, pieces, final)
        return StreamingResponse(
            self._paced(record, script, lines), media_type="application/x-ndjson"
        )

    async def _paced(
        self, record: RecordedRequest, script: Script, lines: list[bytes | None]
    ) -> AsyncIterator[bytes]:
        try:
            for index, line in enumerate(lines):
                if line is None:
                    raise _DroppedConnection
                if index and script.line_delay:
                    await asyncio.sleep(script.line_delay)
                yield line
            record.finished.set()
        finally:
            # Starlette cancels this generator when the client disconnects mid-stream.
            if not record.finished.is_set():
                record.disconnected.set()


def _stream_lines(
    script: Script,
    model: str,
    thinking: list[str],
    pieces: list[str],
    final: dict[str, Any],
) -> list[bytes | None]:
    """The NDJSON lines of one streamed answer; None marks where the connection drops."""

    def line(**message: str) -> bytes:
        return _line(
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", **message},
                "done": False,
            }
        )

    lines: list[bytes | None] = [line(content="", thinking=piece) for piece in thinking]
    for count, piece in enumerate(pieces):
        if count == script.error_after_lines:
            return [*lines, _line({"error": MIDSTREAM_ERROR})]
        if count == script.drop_after_lines:
            return [*lines, None]
        if count == script.end_after_lines:
            return lines
        if count == script.garbage_after_lines:
            return [*lines, b"<html><body>502 Bad Gateway</body></html>\n"]
        lines.append(line(content=piece))
    lines.append(_line({**final, "message": {"role": "assistant", "content": ""}}))
    return lines


def _final_fields(
    model: str, done_reason: str, prompt_tokens: int, output_tokens: int
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": done_reason,
        "total_duration": 5_000_000,
        "load_duration": 1_000_000,
    }
    # Ollama omits a metric that is zero, counts and durations alike.
    if prompt_tokens:
        fields |= {"prompt_eval_count": prompt_tokens, "prompt_eval_duration": 1_000_000}
    if output_tokens:
        fields |= {"eval_count": output_tokens, "eval_duration": 3_000_000}
    return fields


def _bad_image(record: RecordedRequest) -> str | None:
    # Go decodes `images` as []byte, so anything but standard base64 fails the request's JSON.
    for message in record.messages:
        images = message.get("images") if isinstance(message, dict) else None
        for image in images or []:
            if not isinstance(image, str):
                return "json: cannot unmarshal value into Go struct field Message.messages.images"
            try:
                base64.b64decode(image, validate=True)
            except binascii.Error:
                return "illegal base64 data at input byte 0"
    return None


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    return ""
