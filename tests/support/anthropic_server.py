"""A local server speaking Anthropic's Messages API wire format, scripted by model name.

The production adapter (providers/anthropic.py, on the official SDK) runs against it unchanged. It
runs uvicorn in a background thread on a free 127.0.0.1 port (`WireServer`), so a worker started as
a separate process can be pointed at it too (`server.providers_entry(models)` is a ready
`DURACHAT_PROVIDERS` entry).

It holds the SDK to what the real API does (the provider wire-format reference, section 1): every
SSE event is named on an `event:` line (the SDK drops unnamed ones), `ping` events arrive between
the others, errors carry Anthropic's JSON body with a `request_id` and a `request-id` header,
overload is 529, and a failure after the stream has started is an `event: error` inside the 200
response. A request is refused as the API refuses it: without `anthropic-version` or a valid key
(`x-api-key` or `Authorization: Bearer`; `x-api-key` wins when both come), with `temperature`,
`top_p`, `top_k` or any other field the API does not know, without `max_tokens`, with empty text,
a bad image or PDF block, a document in an assistant message, or a thinking budget that does not
fit; and, for tools, a tool without a name or an object `input_schema`, a `tool_choice` of an unknown
type, a `tool_use` not answered by a `tool_result` in the next message, a `tool_result` answering no
`tool_use` of the message before it, or text ahead of the `tool_result` blocks of a message.

Behaviour follows the model name (`script_for_model`), or a `Script` registered with `script()`:
the conventions every test server shares (tests/support/wire_server.py: echo, reply-<words>,
slow-<ms> pacing the text deltas, fail-<status>, flaky-<n> with 529), and

    thinking-<words>       a thinking block ("The user wants <words>. I will answer.", then a
                           signature), then <words> as text; usage reports the thinking tokens
    cached-<words>         the reply, with usage reporting 1000 input tokens read from the prompt
                           cache and 200 written to it (CACHE_READ_TOKENS, CACHE_WRITE_TOKENS)
    stop-<stop_reason>     a short reply ended by that stop_reason: stop-refusal, stop-pause_turn
    stall-<ms>             sends nothing at all, not even headers, for <ms>, then echoes
    fail-<status>          Anthropic's error body; 429 and 529 add `retry-after: 2`, 401 quotes the
                           presented key back (some gateways do)
    midstream-overloaded   3 text deltas, then `event: error` with overloaded_error
    midstream-invalid      3 text deltas, then `event: error` with invalid_request_error
    midstream-<type>       3 text deltas, then `event: error` with that error type
    drop                   3 text deltas, then the connection is cut mid-response
    truncated              3 text deltas, then the response ends cleanly without message_stop
    calls-<tool_name>      a tool call, then a reply quoting its result (wire_server.py)
    anything else          404 not_found_error, as Anthropic answers an unknown model

A Script's `tool_steps` (wire_server.py) stream as Anthropic streams tool use: after the text block
(sent only when `text_before_calls` gives it text), one `tool_use` block per call
(`content_block_start` with its `toolu_...` id, name and empty input, then `input_json_delta`
pieces, the first one empty as the API often sends it), and stop_reason "tool_use". A round of tool
results is a user message holding `tool_result` blocks.

`max_tokens` caps the reply in words and ends it with stop_reason "max_tokens"; a `stop_sequences`
entry found in the reply cuts it there with "stop_sequence". Usage counts words: the prompt's text
as input, the reply and thinking as output; message_start carries the input counts and
message_delta repeats them with the final output count, cumulative, as the API does.

Every request is recorded (`requests`), with whether its stream finished or the client left early;
`RecordedRequest.system`, `images()`, `documents()`, `user_blocks()`, `tools`, `tool_choice` and
`tool_history()` read what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.wire_server import (
    ChatRequest,
    Chunk,
    PlannedCall,
    SeenToolCall,
    SeenToolResult,
    ToolHistory,
    WireScript,
    WireServer,
    json_pieces,
    model_name_parts,
    read_json,
    reasoning_about,
    sse,
    word_pieces,
)

API_VERSION: Final = "2026-10-21"  # what anthropic SDK 2.x sends
# 2023-06-01 is what SDK 1.x sent; sampling parameters are refused only from 2026-10-21 on.
KNOWN_API_VERSIONS: Final = frozenset({"2023-06-01", API_VERSION})
CACHE_READ_TOKENS: Final = 1000
CACHE_WRITE_TOKENS: Final = 200

_ERROR_TYPES: Final[dict[int, tuple[str, str]]] = {
    400: (
        "invalid_request_error",
        "There was an issue with the format or content of your request.",
    ),
    401: ("authentication_error", "invalid x-api-key: {key}"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "model: {model}"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
# What an `event: error` says; once the stream has started, a request is refused by the filter.
_STREAM_ERROR_MESSAGES: Final = {
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "rate_limit_error": "Output tokens per minute exceeded",
    "timeout_error": "Stream timed out",
    "invalid_request_error": "Output blocked by content filtering policy",
}
_MIDSTREAM_TYPES: Final = {
    "overloaded": "overloaded_error",
    "invalid": "invalid_request_error",
}

_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "stream",
        "thinking",
        "metadata",
        "tools",
        "tool_choice",
        "output_config",
        "service_tier",
        "speed",
        "container",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "context_management",
        "mcp_servers",
    }
)
_SAMPLING_FIELDS: Final = ("temperature", "top_p", "top_k")
_IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_TOOL_CHOICES: Final = frozenset({"auto", "any", "tool", "none"})


@dataclass(frozen=True)
class Script(WireScript):
    """How the server answers one model; `chunk_delay` paces the text deltas alone."""

    FLAKY_STATUS = 529  # overloaded_error

    thinking: str = ""
    stop_reason: str = "end_turn"
    stall: float = 0.0  # seconds before answering at all
    retry_after: str | None = None  # `retry-after` sent with failures
    error_after_deltas: int | None = None  # `event: error` after n text deltas
    error_type: str = "overloaded_error"
    drop_after_deltas: int | None = None  # cut the connection after n text deltas
    truncate_after_deltas: int | None = None  # end the body cleanly after n text deltas
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def failing(cls, status: int) -> Self:
        return cls(fail_status=status, retry_after="2" if status in (429, 529) else None)


def script_for_model(model: str) -> Script | None:
    """The Script a model name asks for, or None for an unknown model."""
    name, argument, words = model_name_parts(model)
    if (script := Script.by_convention(model)) is not None:
        return script
    if name == "thinking" and argument:
        return Script(reply=words, thinking=reasoning_about(words))
    if name == "cached" and argument:
        return Script(
            reply=words, cache_read_tokens=CACHE_READ_TOKENS, cache_write_tokens=CACHE_WRITE_TOKENS
        )
    if name == "stop" and argument:
        return Script(reply="a short answer", stop_reason=argument)
    if name == "stall" and argument.isdigit():
        return Script(stall=int(argument) / 1000)
    if name == "midstream" and argument:
        return Script(
            reply="this answer breaks off early",
            error_after_deltas=3,
            error_type=_MIDSTREAM_TYPES.get(argument, argument),
        )
    if model == "drop":
        return Script(reply="this answer is cut off by a dropped connection", drop_after_deltas=3)
    if model == "truncated":
        return Script(reply="this answer ends without its message_stop", truncate_after_deltas=3)
    return None


@dataclass
class RecordedRequest(ChatRequest):
    """One request the server received, as it arrived."""

    @property
    def system(self) -> object:
        """`system` as sent: a string, a list of text blocks, or None when absent."""
        return self.body.get("system")

    @property
    def max_tokens(self) -> object:
        return self.body.get("max_tokens")

    @property
    def api_key(self) -> str | None:
        """The key the request presented: `x-api-key`, else the bearer token."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        authorization = self.headers.get("authorization", "")
        return (
            authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        )

    def user_blocks(self) -> list[dict[str, Any]]:
        """The last user message's content as blocks; a string content is one text block."""
        return _blocks(self.last_user_content())

    def last_user_text(self) -> str:
        """The text of the last user message that has any (tool results alone have none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and (text := _text(message.get("content"))):
                return text
        return ""

    @property
    def tools(self) -> list[Any]:
        """`tools` as sent; [] when absent."""
        tools = self.body.get("tools")
        return tools if isinstance(tools, list) else []

    @property
    def tool_choice(self) -> object:
        return self.body.get("tool_choice")

    def tool_history(self) -> ToolHistory:
        """The `tool_use` blocks of assistant messages and the `tool_result` blocks of user
        messages, in order."""
        history = ToolHistory()
        for message in self.messages:
            user = message.get("role") == "user"
            for block in _blocks(message.get("content")):
                match block.get("type"):
                    case "tool_use":
                        history.called(
                            SeenToolCall(
                                block.get("id"), str(block.get("name")), block.get("input")
                            )
                        )
                    case "tool_result":
                        history.answered(
                            SeenToolResult(
                                block.get("tool_use_id"),
                                None,
                                _result_text(block.get("content")),
                                block.get("is_error") is True,
                            )
                        )
                    case _ if user:
                        history.user_said()
                    case _:
                        history.model_said()
        return history

    def _blocks(self) -> list[dict[str, Any]]:
        return [block for message in self.messages for block in _blocks(message.get("content"))]

    def images(self) -> list[tuple[str, bytes]]:
        """Media type and decoded bytes of every base64 image block in the request, in order."""
        return [
            (str(block["source"].get("media_type")), _decoded(block["source"]))
            for block in self._blocks()
            if block.get("type") == "image" and _base64_source(block)
        ]

    def documents(self) -> list[tuple[str | None, str, bytes]]:
        """Title, media type and decoded bytes of every base64 document block, in order."""
        return [
            (block.get("title"), str(block["source"].get("media_type")), _decoded(block["source"]))
            for block in self._blocks()
            if block.get("type") == "document" and _base64_source(block)
        ]


def _result_text(content: object) -> str:
    # A tool_result's content is a string, or blocks of which the text ones count.
    if isinstance(content, str):
        return content
    return "".join(
        str(block.get("text", "")) for block in _blocks(content) if block.get("type") == "text"
    )


def _blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [block for block in content if isinstance(block, dict)]
    return []


def _base64_source(block: dict[str, Any]) -> bool:
    source = block.get("source")
    return isinstance(source, dict) and source.get("type") == "base64"


def _decoded(source: dict[str, Any]) -> bytes:
    return base64.b64decode(str(source.get("data", "")), validate=True)


class _Refused(Exception):
    """A request the API answers with 400 invalid_request_error."""


class AnthropicServer(WireServer[RecordedRequest, Script]):
    """`with AnthropicServer(api_key=...) as server:` then point a client at `server.base_url`."""

    NAME = "Anthropic test server"
    PROVIDER_TYPE = "anthropic"

    def __init__(self, *, api_key: str = "sk-ant-test-0123456789abcdef") -> None:
        super().__init__()
        self.api_key: str = api_key  # other keys get a 401 authentication_error

    def _script_for_model(self, model: str) -> Script | None:
        return script_for_model(model)

    def _app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"])])

    async def _messages(self, request: Request) -> Response:
        body = await read_json(request)
        record = self._record(RecordedRequest.of(request, body))

        if record.api_key != self.api_key:
            if record.api_key is None:
                return _error(401, message="x-api-key header is required")
            return _error(401, key=record.api_key)
        version = record.headers.get("anthropic-version")
        if version is None:
            return _error(400, message="anthropic-version: header is required")
        if version not in KNOWN_API_VERSIONS:
            return _error(400, message=f"anthropic-version: invalid version {version!r}")
        if not isinstance(body, dict):
            return _error(
                400, message="There was an issue with the format of your request: invalid JSON"
            )
        try:
            _check(body, version)
        except _Refused as refusal:
            return _error(400, message=str(refusal))

        model = record.model
        script, attempt = self._script_and_attempt(model)
        if script is None:
            return _error(404, model=model)
        if script.stall:
            await asyncio.sleep(script.stall)
        if (status := script.failure_on(attempt)) is not None:
            headers = {"retry-after": script.retry_after} if script.retry_after else {}
            return _error(status, model=model, key=record.api_key, headers=headers)
        if body.get("stream") is not True:
            return _error(400, message="this test server answers streamed requests only")

        history = record.tool_history()
        calls = script.due_calls(history, record.last_user_text(), _tool_use_id)
        return self._streamed(
            record,
            _stream_events(script, body, record, history, calls),
            headers={"cache-control": "no-cache", "request-id": _request_id()},
        )


def _check(body: dict[str, Any], version: str) -> None:
    """Raise _Refused for what the Messages API refuses with 400."""
    for name in body:
        if name in _SAMPLING_FIELDS and version != API_VERSION:
            continue
        if name not in _REQUEST_FIELDS:
            raise _Refused(f"{name}: Extra inputs are not permitted")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise _Refused(f"{name}: Field required")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _Refused("max_tokens: Input should be a valid positive integer")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Refused("messages: at least one message is required")
    system = body.get("system")
    if isinstance(system, list):
        if not all(isinstance(block, dict) and block.get("type") == "text" for block in system):
            raise _Refused("system: Input should be a string or a list of text blocks")
        _check_text_blocks("system", system)
    elif system is not None and not isinstance(system, str):
        raise _Refused("system: Input should be a string or a list of text blocks")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _Refused(f"{where}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise _Refused(f"{where}.content: Field required")
        blocks = _blocks(content)
        if not blocks:
            raise _Refused(f"{where}.content: List should have at least 1 item")
        _check_text_blocks(where, blocks)
        for block in blocks:
            if block.get("type") == "image":
                _check_source(where, block, _IMAGE_MEDIA_TYPES)
            elif block.get("type") == "document":
                if message["role"] == "assistant":
                    raise _Refused(
                        f"{where}: document blocks are not allowed in assistant messages"
                    )
                _check_source(where, block, frozenset({"application/pdf"}))
    _check_thinking(body.get("thinking"), max_tokens)
    _check_tools(body)
    _check_tool_use(messages)


def _check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        raise _Refused("tools: Input should be a valid list")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not _TOOL_NAME.fullmatch(str(tool.get("name", ""))):
            raise _Refused(f"tools.{index}.custom.name: String should match pattern")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise _Refused(f"tools.{index}.custom.input_schema.type: Input should be 'object'")
    choice = body.get("tool_choice")
    if choice is not None and (
        not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICES
    ):
        raise _Refused("tool_choice: Input tag does not match any of the expected tags")


def _check_tool_use(messages: list[Any]) -> None:
    """Each tool_use must be answered by a tool_result in the very next message, whose tool_result
    blocks come before anything else; a tool_result answers a tool_use of the message before."""
    asked: list[str] = []  # the tool_use ids of the message before, each to be answered
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        blocks = _blocks(message.get("content"))
        results = [block for block in blocks if block.get("type") == "tool_result"]
        if results and message["role"] != "user":
            raise _Refused(f"{where}: `tool_result` blocks can only be in user messages")
        if any(block.get("type") != "tool_result" for block in blocks[: len(results)]):
            raise _Refused(f"{where}: `tool_result` blocks must come first in the content")
        answered = [str(block.get("tool_use_id")) for block in results]
        unexpected = [tool_use_id for tool_use_id in answered if tool_use_id not in asked]
        if unexpected:
            raise _Refused(
                f"{where}.content.0: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{unexpected[0]}. Each `tool_result` block must have a corresponding `tool_use` "
                "block in the previous message."
            )
        missing = [tool_use_id for tool_use_id in asked if tool_use_id not in answered]
        if missing:
            raise _Refused(_unanswered(index - 1, missing))
        _check_text_blocks(
            where,
            [
                inner
                for block in results
                if isinstance(block.get("content"), list)
                for inner in _blocks(block["content"])
            ],
        )
        asked = []
        for block in blocks:
            if block.get("type") != "tool_use":
                continue
            if message["role"] != "assistant":
                raise _Refused(f"{where}: `tool_use` blocks can only be in assistant messages")
            if not block.get("id") or not isinstance(block.get("input"), dict):
                raise _Refused(f"{where}: a `tool_use` block needs an id and an input object")
            asked.append(str(block["id"]))
    if asked:
        raise _Refused(_unanswered(len(messages) - 1, asked))


def _unanswered(index: int, tool_use_ids: list[str]) -> str:
    return (
        f"messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately "
        f"after: {', '.join(tool_use_ids)}. Each `tool_use` block must have a corresponding "
        "`tool_result` block in the next message."
    )


def _check_text_blocks(where: str, blocks: list[dict[str, Any]]) -> None:
    for block in blocks:
        if block.get("type") == "text" and not (
            isinstance(block.get("text"), str) and block["text"]
        ):
            raise _Refused(f"{where}: text content blocks must be non-empty")


def _check_source(where: str, block: dict[str, Any], media_types: frozenset[str]) -> None:
    source = block.get("source")
    if not _base64_source(block) or not isinstance(source, dict):
        raise _Refused(f"{where}: this test server takes base64 sources only")
    if source.get("media_type") not in media_types:
        raise _Refused(f"{where}.source.media_type: Input should be one of {sorted(media_types)}")
    try:
        _decoded(source)
    except (binascii.Error, ValueError):
        raise _Refused(f"{where}.source.data: invalid base64 data") from None


def _check_thinking(thinking: object, max_tokens: int) -> None:
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in (
        "enabled",
        "adaptive",
        "disabled",
    ):
        raise _Refused("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'")
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise _Refused(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
            )
        if budget >= max_tokens:
            raise _Refused("`max_tokens` must be greater than `thinking.budget_tokens`")


def _stream_events(
    script: Script,
    body: dict[str, Any],
    record: RecordedRequest,
    history: ToolHistory,
    calls: list[PlannedCall],
) -> list[Chunk]:
    """The SSE events of one streamed answer, in order: `calls` after the text when given."""
    if calls:
        reply, stop_reason = script.text_before_calls, "tool_use"
    else:
        asked = _text(record.last_user_content()) or record.last_user_text()
        reply, stop_reason = script.reply_to(asked, history), script.stop_reason
    stop_sequence = None
    cut = _first_stop_sequence(reply, body.get("stop_sequences"))
    if cut is not None:
        reply, stop_sequence = reply[: cut[0]], cut[1]
        stop_reason = "stop_sequence"
    pieces = word_pieces(reply)
    if len(pieces) > body["max_tokens"]:
        pieces, stop_reason, stop_sequence = pieces[: body["max_tokens"]], "max_tokens", None

    thinking_tokens = len(script.thinking.split())
    input_usage = {
        "input_tokens": len(_prompt_text(body).split()),
        "cache_creation_input_tokens": script.cache_write_tokens,
        "cache_read_input_tokens": script.cache_read_tokens,
    }
    message: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": record.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**input_usage, "output_tokens": 1},
    }
    events = [Chunk(_sse("message_start", {"message": message})), Chunk(_sse("ping", {}))]
    index = 0
    if script.thinking:
        events.append(
            Chunk(_block_start(index, {"type": "thinking", "thinking": "", "signature": ""}))
        )
        events += [
            Chunk(_delta(index, {"type": "thinking_delta", "thinking": piece}))
            for piece in word_pieces(script.thinking)
        ]
        events.append(
            Chunk(_delta(index, {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}))
        )
        events.append(Chunk(_sse("content_block_stop", {"index": index})))
        index += 1
    # A tool-use answer has a text block only when it says something before its calls.
    if pieces or not calls:
        events.append(Chunk(_block_start(index, {"type": "text", "text": ""})))
        for count, piece in enumerate(pieces):
            if count == script.error_after_deltas:
                text = _STREAM_ERROR_MESSAGES.get(script.error_type, "Error")
                error = {"type": script.error_type, "message": text}
                return [*events, Chunk(_sse("error", {"error": error}))]
            if count == script.drop_after_deltas:
                return [*events, Chunk(None)]
            if count == script.truncate_after_deltas:
                return events
            # Only the text deltas are paced, the first sent at once.
            pause = script.chunk_delay if count else 0.0
            events.append(Chunk(_delta(index, {"type": "text_delta", "text": piece}), pause))
        events.append(Chunk(_sse("content_block_stop", {"index": index})))
        index += 1
    for call in calls:
        block = {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}}
        events.append(Chunk(_block_start(index, block)))
        events += [
            Chunk(_delta(index, {"type": "input_json_delta", "partial_json": piece}))
            for piece in ["", *json_pieces(call.input_text)]
        ]
        events.append(Chunk(_sse("content_block_stop", {"index": index})))
        index += 1

    # Cumulative, as the API sends them: the input counts again, and the whole output so far.
    call_tokens = sum(len(call.input_text.split()) for call in calls)
    usage: dict[str, Any] = {
        **input_usage,
        "output_tokens": len("".join(pieces).split()) + thinking_tokens + call_tokens,
    }
    if thinking_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
    stop = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
    return [
        *events,
        Chunk(_sse("ping", {})),
        Chunk(_sse("message_delta", {"delta": stop, "usage": usage})),
        Chunk(_sse("message_stop", {})),
    ]


def _tool_use_id() -> str:
    return f"toolu_01{uuid.uuid4().hex[:22]}"


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _sse("content_block_delta", {"index": index, "delta": delta})


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return _sse("content_block_start", {"index": index, "content_block": block})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    # The SDK dispatches on the `event:` line: an event without one is silently dropped.
    return sse({"type": event, **data}, event=event)


def _first_stop_sequence(reply: str, sequences: object) -> tuple[int, str] | None:
    if not isinstance(sequences, list):
        return None
    found = [(reply.find(s), s) for s in sequences if isinstance(s, str) and s and s in reply]
    return min(found) if found else None


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def _error(
    status: int,
    *,
    model: str = "",
    key: str | None = None,
    headers: dict[str, str] | None = None,
    message: str | None = None,
) -> JSONResponse:
    error_type, template = _ERROR_TYPES.get(status, ("api_error", "Error"))
    request_id = _request_id()
    payload = {
        "type": "error",
        "error": {
            "type": error_type,
            "message": message or template.format(model=model, key=key or ""),
        },
        "request_id": request_id,
    }
    return JSONResponse(
        payload, status_code=status, headers={"request-id": request_id, **(headers or {})}
    )


def _prompt_text(body: dict[str, Any]) -> str:
    texts = [_text(body.get("system"))]
    texts += [
        _text(message.get("content"))
        for message in body.get("messages", [])
        if isinstance(message, dict)
    ]
    return " ".join(texts)


def _text(content: object) -> str:
    # Content is a string, or blocks of which the text ones count.
    return " ".join(
        str(block.get("text", "")) for block in _blocks(content) if block.get("type") == "text"
    )
