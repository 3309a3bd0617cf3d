"""A local server speaking Ollama's native chat API (`POST /api/chat`, NDJSON), scripted by model name.

The production adapter runs against it unchanged, through the real `ollama` SDK. It runs uvicorn in
a background thread on a free 127.0.0.1 port (`WireServer`).

Behaviour follows the model name (`script_for_model`), or a `Script` registered with `script()`:
the conventions every test server shares (tests/support/wire_server.py: echo, reply-<words>,
slow-<ms> with one line per chunk, fail-<status> with Ollama's `{"error": "..."}` body, flaky-<n>
with 503), and

    thinking-<words>      `message.thinking` lines first, then the reply
    length-<words>        the reply, finished with done_reason "length"
    midstream-error       3 lines, then an `{"error": ...}` line inside the 200 stream
    drop                  3 lines, then the connection is cut before the `done` line
    truncated             3 lines, then the body ends cleanly without a `done` line
    garbage               3 lines, then one that is not JSON, as a proxy's page would be
    calls-<tool_name>     a tool call, then a reply quoting its result (wire_server.py)
    anything else         404 `model 'x' not found`, as Ollama answers a model not pulled

A Script's `tool_steps` (wire_server.py) stream as Ollama sends tool calls: whole, every call of the
step in one line's `message.tool_calls` (`id` and `function.index`, which the Python SDK drops,
`function.name` and `function.arguments` as an object), then the `done` line with done_reason
"stop". `bad_input` does not apply: arguments are always an object. A round of tool results is a run
of role-`tool` messages (each naming its tool in `tool_name`). As Ollama does, a tool that is not
`{"type": "function", "function": {"name", ...}}` or a call whose arguments are not an object is
refused with 400.

Every line is one JSON object followed by `\\n`, as `application/x-ndjson`; the last one has
`done: true`, `done_reason` and the token counts (omitted when zero, as Ollama does).
`options.num_predict` caps the reply in words and finishes it with "length". Images must be bare
base64 strings (anything else is Ollama's 400). Every request is recorded (`requests`), with whether
its stream finished or the client left early; `RecordedRequest.tools` and `tool_history()` read the
tools offered and the calls and results in the messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.wire_server import (
    ChatRequest,
    PlannedCall,
    SeenToolCall,
    SeenToolResult,
    ToolHistory,
    WireScript,
    WireServer,
    evenly_paced,
    model_name_parts,
    read_json,
    reasoning_about,
    word_pieces,
)

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
class Script(WireScript):
    """How the server answers one model."""

    thinking: str = ""
    done_reason: str = "stop"
    error_after_lines: int | None = None  # an `{"error": ...}` line after n content lines
    drop_after_lines: int | None = None  # cut the connection after n content lines
    end_after_lines: int | None = None  # end the body cleanly after n lines, with no `done`
    garbage_after_lines: int | None = None  # a line that is not JSON after n content lines


def script_for_model(model: str) -> Script | None:
    """The Script a model name asks for, or None for a model that is not pulled."""
    name, argument, words = model_name_parts(model)
    if (script := Script.by_convention(model)) is not None:
        return script
    if name == "thinking" and argument:
        return Script(reply=words, thinking=reasoning_about(words))
    if name == "length" and argument:
        return Script(reply=words, done_reason="length")
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
class RecordedRequest(ChatRequest):
    """One request the server received, as it arrived."""

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

    @property
    def tools(self) -> list[Any]:
        """`tools` as sent; [] when absent."""
        tools = self.body.get("tools")
        return tools if isinstance(tools, list) else []

    def tool_history(self) -> ToolHistory:
        """The `tool_calls` of assistant messages and the role-`tool` messages, in order. Ollama
        carries no call ids in a conversation: results name their tool."""
        history = ToolHistory()
        for message in self.messages:
            match message.get("role"):
                case "user":
                    history.user_said()
                case "assistant":
                    history.model_said()
                    for call in message.get("tool_calls") or []:
                        function = call.get("function") if isinstance(call, dict) else None
                        function = function if isinstance(function, dict) else {}
                        history.called(
                            SeenToolCall(None, str(function.get("name")), function.get("arguments"))
                        )
                case "tool":
                    history.answered(
                        SeenToolResult(
                            None, message.get("tool_name"), str(message.get("content", ""))
                        )
                    )
        return history


class OllamaServer(WireServer[RecordedRequest, Script]):
    """`with OllamaServer() as server:` then point an adapter at `server.base_url`."""

    NAME = "Ollama test server"
    PROVIDER_TYPE = "ollama"

    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key  # when set, other bearer tokens get a 401, as ollama.com answers

    def _script_for_model(self, model: str) -> Script | None:
        return script_for_model(model)

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/api/chat", self._chat, methods=["POST"])])

    async def _chat(self, request: Request) -> Response:
        body = await read_json(request)
        record = self._record(RecordedRequest.of(request, body))
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
        bad_tools = _bad_tools(record)
        if bad_tools is not None:
            return _error(400, bad_tools)
        script, attempt = self._script_and_attempt(model)
        if script is None:
            return _error(404, _ERRORS[404].format(model=model))
        if (status := script.failure_on(attempt)) is not None:
            return _error(status, _ERRORS.get(status, "error").format(model=model))

        asked = str(record.last_user_content() or "")
        history = record.tool_history()
        calls = script.due_calls(history, asked, _call_id)
        reply = script.text_before_calls if calls else script.reply_to(asked, history)
        pieces = word_pieces(reply)
        done_reason = script.done_reason
        options = body.get("options")
        cap = options.get("num_predict") if isinstance(options, dict) else None
        if isinstance(cap, int) and 0 <= cap < len(pieces):
            pieces, done_reason = pieces[:cap], "length"
        thinking = word_pieces(script.thinking)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in record.messages)
        output_tokens = len("".join(pieces).split()) + len(thinking)
        output_tokens += sum(len(call.input_text.split()) for call in calls)
        final = _final_fields(model, done_reason, prompt_tokens, output_tokens)

        if body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if thinking:
                message["thinking"] = "".join(thinking)
            if calls:
                message["tool_calls"] = _tool_calls(calls)
            return JSONResponse({**final, "message": message})
        lines = _stream_lines(script, model, thinking, pieces, calls, final)
        return self._streamed(
            record, evenly_paced(lines, script.chunk_delay), media_type="application/x-ndjson"
        )


def _stream_lines(
    script: Script,
    model: str,
    thinking: list[str],
    pieces: list[str],
    calls: list[PlannedCall],
    final: dict[str, Any],
) -> list[bytes | None]:
    """The NDJSON lines of one streamed answer, `calls` in one line after the text; None marks
    where the connection drops."""

    def line(**message: Any) -> bytes:
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
    if calls:
        lines.append(line(content="", tool_calls=_tool_calls(calls)))
    lines.append(_line({**final, "message": {"role": "assistant", "content": ""}}))
    return lines


def _tool_calls(calls: list[PlannedCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": call.call_id,
            "function": {"index": index, "name": call.name, "arguments": call.input},
        }
        for index, call in enumerate(calls)
    ]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:8]}"


def _bad_tools(record: RecordedRequest) -> str | None:
    # What Go's decoding of Ollama's api.Tool and api.ToolCall refuses.
    for tool in record.body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            return "json: cannot unmarshal value into Go struct field ChatRequest.tools"
    for message in record.messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if not isinstance(arguments, dict):
                return (
                    "json: cannot unmarshal value into Go struct field "
                    "ToolCallFunction.messages.tool_calls.function.arguments of type "
                    "api.ToolCallFunctionArguments"
                )
    return None


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
