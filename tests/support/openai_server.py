"""A local server speaking OpenAI's chat completions wire format, scripted by model name.

The production adapter runs against it unchanged. It runs uvicorn in a background thread on a free
127.0.0.1 port (`WireServer`), so a worker started as a separate process can be pointed at it too
(`server.providers_env()` is a ready `DURACHAT_PROVIDERS` value).

Behaviour follows the model name (`script_for_model`), or a `Script` registered with `script()`:
the conventions every test server shares (tests/support/wire_server.py: echo, reply-<words>,
slow-<ms>, fail-<status>, flaky-<n> with 503), and

    titler                answers like a title model: "About: " and the user message's first four
                          words, in quotes
    reasoning-<words>     `reasoning_content` deltas first (DeepSeek/vLLM style), then the reply
    length-<words>        the reply, finished with finish_reason "length"
    fail-<status>         OpenAI's error JSON; fail-429 adds `Retry-After: 2`, fail-401 quotes the
                          bearer token back like OpenAI does
    midstream-error       3 chunks, then an `{"error": ...}` event inside the 200 stream
    midstream-<code>      the same with that error `code` (an int if digits: midstream-402,
                          midstream-server_error), in the dialect's shape
    error-finish          3 chunks, then finish_reason "error" with no error object
    drop                  3 chunks, then the connection is cut without a terminating chunk
    calls-<tool_name>     a tool call, then a reply quoting its result (wire_server.py)
    anything else         404 model_not_found, as OpenAI answers an unknown model

A Script's `tool_steps` (wire_server.py) stream as OpenAI streams tool calls: per call, a
`delta.tool_calls` entry with its `index`, `id` (`call_...`), type and name and empty arguments,
then its `arguments` text in three pieces keyed by that index; the choice finishes with
"tool_calls". A round of tool results is an assistant message with `tool_calls` answered by
role-`tool` messages. Requests are refused as OpenAI refuses them: a `tool_choice` without
`tools`, a tool that is not `{"type": "function", "function": {"name", ...}}`, a `tool` message
answering no call of the assistant message before it, or a call left without its answer.
`RecordedRequest.tools`, `tool_choice` and `tool_history()` read what arrived.

`dialect=` makes the server speak as Groq or OpenRouter do on top of that (default "openai"):

    groq          the first chunk carries `x_groq.id`, the finishing one `x_groq.usage` (with
                  timings); no standard usage chunk unless a Script asks for "both"; reasoning-<words>
                  sends `reasoning`; fail-498 is capacity_exceeded
    openrouter    `: OPENROUTER PROCESSING` comments before the first chunk and the finishing
                  one; usage always comes last, with `cost` and cache token details; errors are
                  `{"error": {"code": <int>, "message", "metadata"}}`, and a midstream error is a
                  chunk with a top-level `error` and finish_reason "error"; reasoning-<words>
                  sends `reasoning`

`max_tokens` / `max_completion_tokens` cap the reply in words and finish it with "length".
Every request is recorded (`requests`), with whether its stream finished or the client left early;
`RecordedRequest.user_content_parts()`, `images()` and `documents()` read the content parts that
arrived (images as `image_url` data URLs, PDFs as `file` parts). Content given as a list of parts
is echoed by its text parts.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Self

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
    json_pieces,
    model_name_parts,
    read_json,
    reasoning_about,
    sse,
    word_pieces,
)

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {key}."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model `{model}` does not exist."),
    408: ("timeout", None, "Request timed out."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    # Groq's flex tier when it has no capacity left.
    498: (
        "capacity_exceeded",
        "capacity_exceeded",
        "Flex tier capacity exceeded, try again later.",
    ),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

# OpenRouter's messages, with the `metadata` it adds to some.
_OPENROUTER_ERRORS: dict[int, tuple[str, dict[str, Any] | None]] = {
    400: ("Invalid request.", None),
    401: ("No auth credentials found", None),
    402: ("Insufficient credits. Add more using https://openrouter.ai/credits", None),
    403: ("Input was flagged by moderation.", {"reasons": ["harassment"], "provider_name": None}),
    404: ("No endpoints found for {model}.", None),
    408: ("Request timed out.", None),
    429: ("Rate limit exceeded.", None),
    502: ("Provider returned error", {"provider_name": "TestUpstream", "raw": "upstream down"}),
    503: ("No instances available.", None),
}

Dialect = Literal["openai", "groq", "openrouter"]
UsagePlacement = Literal["dialect", "chunk", "x_groq", "both"]
KEEPALIVE = b": OPENROUTER PROCESSING\n\n"
# OpenRouter always reports usage in a final chunk; Groq in the finishing chunk's x_groq.
_DIALECT_USAGE: dict[Dialect, UsagePlacement] = {
    "openai": "chunk",
    "groq": "x_groq",
    "openrouter": "chunk",
}


@dataclass(frozen=True)
class Script(WireScript):
    """How the server answers one model."""

    titles: bool = False  # answer with a quoted title made from the last user message
    reasoning: str = ""
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    finish_reason: str = "stop"
    retry_after: str | None = None  # `Retry-After` sent with failures
    retry_after_ms: str | None = None  # `retry-after-ms` sent with failures
    error_after_chunks: int | None = None  # send an in-stream error event after n chunks
    error_code: int | str = 502  # the `code` of that error
    drop_after_chunks: int | None = None  # cut the connection after n chunks
    # Where streamed usage goes: "dialect" is as the server's dialect does it; "chunk" a final
    # chunk with `"choices": []` (asked for with stream_options, except on OpenRouter), "x_groq"
    # the finishing chunk's `x_groq.usage`, "both" the two.
    usage_placement: UsagePlacement = "dialect"
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    cache_write_tokens: int = 0  # usage.prompt_tokens_details.cache_write_tokens
    cost: float | str | None = None  # OpenRouter's usage.cost; None: priced from the counts

    @classmethod
    def failing(cls, status: int) -> Self:
        return cls(fail_status=status, retry_after="2" if status == 429 else None)


def script_for_model(model: str, *, dialect: Dialect = "openai") -> Script | None:
    """The Script a model name asks for, or None for an unknown model."""
    name, argument, words = model_name_parts(model)
    if (script := Script.by_convention(model)) is not None:
        return script
    if model == "titler":
        return Script(titles=True)
    if name == "reasoning" and argument:
        return Script(
            reply=words,
            reasoning=reasoning_about(words),
            reasoning_field="reasoning_content" if dialect == "openai" else "reasoning",
        )
    if name == "length" and argument:
        return Script(reply=words, finish_reason="length")
    if model == "midstream-error":
        return Script(reply="this answer breaks off early", error_after_chunks=3)
    if name == "midstream" and argument:
        code = int(argument) if argument.isdigit() else argument
        return Script(reply="this answer breaks off early", error_after_chunks=3, error_code=code)
    if model == "error-finish":
        return Script(reply="this answer ends in an error", finish_reason="error")
    if model == "drop":
        return Script(reply="this answer is cut off by a dropped connection", drop_after_chunks=3)
    return None


@dataclass
class RecordedRequest(ChatRequest):
    """One request the server received, as it arrived."""

    def user_content_parts(self) -> list[dict[str, Any]]:
        """The last user message's content as parts; a string content is one text part."""
        content = self.last_user_content()
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        parts = content if isinstance(content, list) else []
        return [part for part in parts if isinstance(part, dict)]

    @property
    def tools(self) -> list[Any]:
        """`tools` as sent; [] when absent."""
        tools = self.body.get("tools")
        return tools if isinstance(tools, list) else []

    @property
    def tool_choice(self) -> object:
        return self.body.get("tool_choice")

    def tool_history(self) -> ToolHistory:
        """The tool calls (`tool_calls` of assistant messages) and results (role-`tool`
        messages) in the conversation."""
        history = ToolHistory()
        for message in self.messages:
            match message.get("role"):
                case "user":
                    history.user_said()
                case "assistant":
                    history.model_said()
                    for call in _dicts(message.get("tool_calls")):
                        function = call.get("function")
                        function = function if isinstance(function, dict) else {}
                        history.called(
                            SeenToolCall(
                                call.get("id"),
                                str(function.get("name", "")),
                                _parsed(function.get("arguments")),
                            )
                        )
                case "tool":
                    history.answered(
                        SeenToolResult(
                            message.get("tool_call_id"), None, _text(message.get("content"))
                        )
                    )
        return history

    def _parts(self) -> list[dict[str, Any]]:
        return [
            part
            for message in self.messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict)
        ]

    def images(self) -> list[tuple[str, bytes]]:
        """Media type and decoded bytes of every image_url data URL in the request, in order."""
        found = []
        for part in self._parts():
            if part.get("type") == "image_url":
                decoded = _data_url(str(part.get("image_url", {}).get("url", "")))
                if decoded is not None:
                    found.append(decoded)
        return found

    def documents(self) -> list[tuple[str, str, bytes]]:
        """Filename, media type and decoded bytes of every file part with file_data, in order."""
        found = []
        for part in self._parts():
            if part.get("type") == "file":
                file = part.get("file", {})
                decoded = _data_url(str(file.get("file_data", "")))
                if decoded is not None:
                    found.append((str(file.get("filename", "")), *decoded))
        return found


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _parsed(arguments: object) -> object:
    # OpenAI sends arguments as JSON text; what is not JSON is kept as the text.
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _tool_refusal(record: RecordedRequest) -> str | None:
    """OpenAI's 400 message for tools or tool messages it would refuse, or None."""
    body = record.body
    if "tool_choice" in body and not record.tools:
        return (
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified."
        )
    for index, tool in enumerate(body.get("tools") or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            return f"Invalid value for 'tools[{index}]': expected a function tool."
        if not isinstance(function.get("name"), str) or not function["name"]:
            return f"Missing required parameter: 'tools[{index}].function.name'."
        if "parameters" in function and not isinstance(function["parameters"], dict):
            return f"Invalid type for 'tools[{index}].function.parameters': expected an object."
    unanswered: list[str] = []
    for index, message in enumerate(record.messages):
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in unanswered:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'."
                )
            unanswered.remove(message["tool_call_id"])
            continue
        if unanswered:
            return _unanswered(unanswered)
        if role == "assistant":
            for call in _dicts(message.get("tool_calls")):
                function = call.get("function")
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if not isinstance(arguments, str):
                    return (
                        f"Invalid type for 'messages[{index}].tool_calls[].function.arguments':"
                        " expected a string."
                    )
                unanswered.append(str(call.get("id")))
    return _unanswered(unanswered) if unanswered else None


def _unanswered(ids: list[str]) -> str:
    return (
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        f"to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        f"{', '.join(ids)}"
    )


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _bad_image_url(record: RecordedRequest) -> str | None:
    # OpenAI answers 400 for an image URL that is neither a data URL nor http(s).
    for part in record._parts():
        if part.get("type") == "image_url":
            url = str(part.get("image_url", {}).get("url", ""))
            if not url.startswith(("data:", "http://", "https://")):
                return f"Invalid image URL: {url[:40]!r}."
    return None


def _data_url(url: str) -> tuple[str, bytes] | None:
    header, comma, data = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        return None
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(data)


class OpenAICompatibleServer(WireServer[RecordedRequest, Script]):
    """`with OpenAICompatibleServer() as server:` then point a client at `server.base_url`.

    A `providers_entry` names its dialect by the entry's name: name it `groq` or `openrouter` for
    those presets (`base_url` then points them here); any other name is a plain OpenAI-compatible
    server.
    """

    NAME = "OpenAI-compatible test server"
    PROVIDER_TYPE = "openai-compatible"

    def __init__(self, *, api_key: str | None = None, dialect: Dialect = "openai") -> None:
        super().__init__()
        self.api_key = api_key  # when set, other bearer tokens get OpenAI's 401
        self.dialect: Dialect = dialect

    @property
    def base_url(self) -> str:
        # The OpenAI SDK appends only the path below the version.
        return f"{super().base_url}/v1"

    def providers_env(self, name: str, models: list[str], *, api_key: str | None = None) -> str:
        """A `DURACHAT_PROVIDERS` value configuring this server as provider `name`."""
        return json.dumps({name: self._endpoint(models, api_key)})

    def _script_for_model(self, model: str) -> Script | None:
        return script_for_model(model, dialect=self.dialect)

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/models", self._list_models, methods=["GET"]),
            ]
        )

    async def _list_models(self, request: Request) -> Response:
        with self._lock:
            names = ["echo", *self._scripts]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def _chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        record = self._record(RecordedRequest.of(request, body))
        if not isinstance(body, dict):
            return self._error(400, message="We could not parse the JSON body of your request.")

        bad_image = _bad_image_url(record)
        if bad_image is not None:
            return self._error(400, message=bad_image)
        tool_refusal = _tool_refusal(record)
        if tool_refusal is not None:
            return self._error(400, message=tool_refusal)
        model = record.model
        if self.api_key is not None and record.authorization != f"Bearer {self.api_key}":
            return self._error(401, key=_bearer(record))
        script, attempt = self._script_and_attempt(model)
        if script is None:
            return self._error(404, model=model)
        if (status := script.failure_on(attempt)) is not None:
            headers: dict[str, str] = {}
            if script.retry_after is not None:
                headers["retry-after"] = script.retry_after
            if script.retry_after_ms is not None:
                headers["retry-after-ms"] = script.retry_after_ms
            return self._error(status, model=model, key=_bearer(record), headers=headers)

        asked = _text(record.last_user_content())
        history = record.tool_history()
        calls = script.due_calls(history, asked, _call_id)
        reply = script.reply_to(asked, history)
        if script.titles:
            reply = '"About: ' + " ".join(asked.split()[:4]) + '"'
        finish_reason = script.finish_reason
        if calls:
            reply, finish_reason = script.text_before_calls, "tool_calls"
        pieces = word_pieces(reply)
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(cap, int) and len(pieces) > cap:
            pieces, finish_reason = pieces[:cap], "length"
        reasoning = word_pieces(script.reasoning)
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in record.messages)
        reasoning_tokens = len(script.reasoning.split())
        completion_tokens = len("".join(pieces).split()) + reasoning_tokens
        completion_tokens += sum(len(call.input_text.split()) for call in calls)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        }
        if script.cached_tokens or script.cache_write_tokens or self.dialect == "openrouter":
            usage["prompt_tokens_details"] = {
                "cached_tokens": script.cached_tokens,
                "cache_write_tokens": script.cache_write_tokens,
            }
        if self.dialect == "openrouter":
            usage["cost"] = script.cost if script.cost is not None else _price(usage)
            usage["cost_details"] = {"upstream_inference_cost": None}
            usage["is_byok"] = False

        if body.get("stream") is not True:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if calls:
                message["tool_calls"] = [_tool_call(call) for call in calls]
            return JSONResponse(
                {
                    **_envelope(model, "chat.completion"),
                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                    "usage": usage,
                }
            )
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        placement = script.usage_placement
        if placement == "dialect":
            placement = _DIALECT_USAGE[self.dialect]
        # OpenRouter always reports usage, stream_options or not.
        in_chunk = placement in ("chunk", "both") and (
            include_usage or self.dialect == "openrouter"
        )
        in_x_groq = placement in ("x_groq", "both")
        events = _stream_events(
            script,
            model,
            reasoning,
            pieces,
            calls,
            finish_reason,
            usage if in_chunk else None,
            usage if in_x_groq else None,
            self.dialect,
        )
        return self._streamed(
            record, evenly_paced(events, script.chunk_delay), headers={"cache-control": "no-cache"}
        )

    def _error(
        self,
        status: int,
        *,
        model: str = "",
        key: str = "",
        headers: dict[str, str] | None = None,
        message: str | None = None,
    ) -> JSONResponse:
        error: dict[str, Any]
        if self.dialect == "openrouter":
            template, metadata = _OPENROUTER_ERRORS.get(status, ("Error.", None))
            error = {"code": status, "message": message or template.format(model=model)}
            if metadata is not None:
                error["metadata"] = metadata
        else:
            error_type, code, template = _ERRORS.get(status, ("server_error", None, "Error."))
            text = message or template.format(model=model, key=key)
            error = {"message": text, "type": error_type, "param": None, "code": code}
        return JSONResponse({"error": error}, status_code=status, headers=headers)


def _stream_events(
    script: Script,
    model: str,
    reasoning: list[str],
    pieces: list[str],
    calls: list[PlannedCall],
    finish_reason: str,
    usage: dict[str, Any] | None,
    x_groq_usage: dict[str, Any] | None,
    dialect: Dialect,
) -> list[bytes | None]:
    """The SSE byte strings of one streamed answer; None marks where the connection drops."""
    envelope = _envelope(model, "chat.completion.chunk")
    extra: dict[str, Any] = {"usage": None} if usage is not None else {}
    request_id = f"req_{uuid.uuid4().hex[:26]}"

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**envelope, "choices": [choice], **extra, **more})

    first: dict[str, Any] = {"x_groq": {"id": request_id}} if dialect == "groq" else {}
    events: list[bytes | None] = [KEEPALIVE] if dialect == "openrouter" else []
    events.append(chunk({"role": "assistant", "content": "", "refusal": None}, **first))
    events += [chunk({script.reasoning_field: piece}) for piece in reasoning]
    for count, piece in enumerate(pieces):
        if count == script.error_after_chunks:
            return [*events, _midstream_error(script.error_code, envelope, dialect)]
        if count == script.drop_after_chunks:
            return [*events, None]
        events.append(chunk({"content": piece}))
    for index, call in enumerate(calls):
        # The first entry of a call names it; its arguments follow, keyed by the index alone.
        start = {"index": index, **_tool_call(call, arguments="")}
        events.append(chunk({"tool_calls": [start]}))
        events += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in json_pieces(call.input_text)
        ]
    if dialect == "openrouter":
        events.append(KEEPALIVE)
    last: dict[str, Any] = {}
    if x_groq_usage is not None:
        timings = {"queue_time": 0.01, "prompt_time": 0.002, "completion_time": 0.02}
        last["x_groq"] = {
            "id": request_id,
            "usage": {**x_groq_usage, **timings, "total_time": 0.032},
        }
    events.append(chunk({}, finish_reason, **last))
    if usage is not None:
        events.append(sse({**envelope, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def _tool_call(call: PlannedCall, *, arguments: str | None = None) -> dict[str, Any]:
    text = call.input_text if arguments is None else arguments
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": text},
    }


def _midstream_error(code: int | str, envelope: dict[str, Any], dialect: Dialect) -> bytes:
    if dialect == "openrouter":
        # A chunk like any other, with a top-level error and the choice finished by "error".
        error = {
            "code": code,
            "message": "Provider returned error",
            "metadata": {"provider_name": "TestUpstream"},
        }
        choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
        return sse({**envelope, "error": error, "choices": [choice]})
    error = {"message": "Upstream provider error.", "type": "server_error", "code": code}
    return sse({"error": error})


def _price(usage: dict[str, Any]) -> float:
    # $1.50 per million prompt tokens and $2 per million completion tokens, sent as a JSON
    # number as OpenRouter does; computed in decimal so the number is exactly what a test expects.
    cost = Decimal("0.0000015") * usage["prompt_tokens"]
    cost += Decimal("0.000002") * usage["completion_tokens"]
    return float(cost)


def _envelope(model: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_test",
    }


def _bearer(record: RecordedRequest) -> str:
    return (record.authorization or "").removeprefix("Bearer ")


def _text(content: object) -> str:
    # Content is a string, or a list of parts of which the text ones count.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""
