"""A local server speaking the Gemini API's streamed generateContent wire format, scripted by model name.

The production adapter runs against it unchanged, through the real `google-genai` SDK. It runs
uvicorn in a background thread on a free 127.0.0.1 port (`WireServer`), so a worker started as a
separate process can be pointed at it too (`server.providers_entry(models)` is a ready
`DURACHAT_PROVIDERS` entry).

It answers `POST /{v1|v1beta}/models/{model}:streamGenerateContent?alt=sse` only, authenticated by
the `x-goog-api-key` header (a missing key is Google's 403, a wrong one its 400 API_KEY_INVALID).
The SDK mixes camelCase and snake_case keys in one body (`inlineData` holding `mime_type`), and
Google accepts both, so bodies are recorded as sent and also normalised to camelCase, which is what
`RecordedRequest` reads. Behaviour follows the model name (`script_for_model`), or a `Script`
registered with `script()`: the conventions every test server shares (tests/support/wire_server.py:
echo, reply-<words>, slow-<ms>, fail-<status>, flaky-<n> with 503), and

    thinking-<words>      thought parts (`"thought": true`) first, then the reply; as Gemini does,
                          thoughts are sent only when thinkingConfig.includeThoughts is true, are
                          counted in thoughtsTokenCount either way, and a thinkingBudget of 0 turns
                          thinking off
    max-tokens-<words>    the reply, finished with finishReason MAX_TOKENS
    safety-<words>        the reply, finished with finishReason SAFETY (the rest was blocked)
    blocked               a prompt blocked before any answer: promptFeedback.blockReason SAFETY
                          and no candidates
    fail-<status>         Google's error JSON; fail-429 adds a RetryInfo of "30s" and
                          `retry-after: 2`; fail-401 and fail-403 quote the key back (Google's
                          "Consumer 'api_key:...' has been suspended" does)
    midstream-error       3 chunks, then a `data: {"error": {...}}` 503 event inside the 200 stream
    drop                  3 chunks, then the connection is cut
    truncated             3 chunks, then the body ends cleanly without a finishReason
    garbage               3 chunks, then a `data:` line that is not JSON
    calls-<tool_name>     a function call, then a reply quoting its result (wire_server.py)
    anything else         404 NOT_FOUND, as Gemini answers an unknown model

A Script's `tool_steps` (wire_server.py) stream as Gemini sends function calls: whole, as
`functionCall` parts (`name`, `args`; an `id` only when the Script's `function_call_ids` is set, as
the Gemini API mostly sends none) in the chunk that carries finishReason STOP, the first part with a
`thoughtSignature` as Gemini 3 sends it. `bad_input` does not apply: `args` is always an object. A
round of tool results is a user content holding `functionResponse` parts.

Every chunk is `data: <GenerateContentResponse JSON>` and a blank line; the last one carries the
finishReason and usageMetadata. generationConfig.maxOutputTokens caps the reply in words and
finishes it with MAX_TOKENS. As Gemini does, the server refuses a content with a role other than
user or model, an empty text part and inline data of a type Gemini does not take (image/gif among
them). For function calling, as Gemini 3 does, it refuses a `functionCall` outside a model content, a
content of function responses that does not answer each call of the model content before it, and a
step of the current turn (after the last user content with text) whose first `functionCall` part
has no `thoughtSignature`. Every request is recorded (`requests`), with whether its stream finished
or the client left early; `RecordedRequest.tools`, `tool_config`, `function_declarations()` and
`tool_history()` read the tools offered and the calls and results in the contents.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.wire_server import (
    PlannedCall,
    SeenToolCall,
    SeenToolResult,
    ToolHistory,
    WireRequest,
    WireScript,
    WireServer,
    evenly_paced,
    lower_headers,
    model_name_parts,
    read_json,
    reasoning_about,
    sse,
    word_pieces,
)

_SNAKE = re.compile(r"_([a-z0-9])")

API_VERSIONS = ("v1", "v1beta")

# What Gemini takes as inline data; anything else is its 400 "Unsupported MIME type".
INLINE_MEDIA_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/heic",
        "image/heif",
        "application/pdf",
        "text/plain",
    }
)

CONTENT_FILTER_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"}
)

MIDSTREAM_ERROR = "The model is overloaded. Please try again later."

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials for api_key:{key}.",
    ),
    403: ("PERMISSION_DENIED", "Permission denied: Consumer 'api_key:{key}' has been suspended."),
    404: (
        "NOT_FOUND",
        "models/{model} is not found for API version {version}, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their "
        "supported methods.",
    ),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", MIDSTREAM_ERROR),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

_BLOCKED_RATINGS = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
]


@dataclass(frozen=True)
class Script(WireScript):
    """How the server answers one model."""

    thoughts: str = ""  # thought parts, sent when includeThoughts is true
    thoughts_unasked: bool = False  # send the thought parts even without includeThoughts
    finish_reason: str | None = "STOP"  # None: the stream ends without one
    retry_after: str | None = None  # `retry-after` header sent with failures
    retry_delay: str | None = None  # RetryInfo.retryDelay in the error's details
    error_after_chunks: int | None = None  # an in-stream error event after n chunks
    error_status: int = 503  # that event's code
    drop_after_chunks: int | None = None  # cut the connection after n chunks
    garbage_after_chunks: int | None = None  # send a line that is not JSON after n chunks
    block_reason: str | None = None  # promptFeedback.blockReason: no candidates at all
    cached_tokens: int = 0  # reported as cachedContentTokenCount, and inside promptTokenCount
    function_call_ids: bool = False  # give each functionCall an `id`

    @classmethod
    def failing(cls, status: int) -> Self:
        if status == 429:
            return cls(fail_status=429, retry_after="2", retry_delay="30s")
        return cls(fail_status=status)


def script_for_model(model: str) -> Script | None:
    """The Script a model name asks for, or None for an unknown model."""
    name, argument, words = model_name_parts(model)
    if (script := Script.by_convention(model)) is not None:
        return script
    if name == "thinking" and argument:
        return Script(reply=words, thoughts=reasoning_about(words))
    if model.startswith("max-tokens-"):
        return Script(
            reply=model.removeprefix("max-tokens-").replace("-", " "), finish_reason="MAX_TOKENS"
        )
    if name == "safety" and argument:
        return Script(reply=words, finish_reason="SAFETY")
    if model == "blocked":
        return Script(block_reason="SAFETY")
    broken = "this answer breaks off early"
    if model == "midstream-error":
        return Script(reply=broken, error_after_chunks=3)
    if model == "drop":
        return Script(reply=broken, drop_after_chunks=3)
    if model == "truncated":
        return Script(reply="this answer ends without a reason", finish_reason=None)
    if model == "garbage":
        return Script(reply=broken, garbage_after_chunks=3)
    return None


def camel_keys(value: Any) -> Any:
    """`value` with every object key in camelCase (`mime_type` -> `mimeType`), as Google reads it."""
    if isinstance(value, dict):
        return {_camel(str(key)): camel_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


def _camel(key: str) -> str:
    return key if key.startswith("@") else _SNAKE.sub(lambda match: match[1].upper(), key)


@dataclass
class RecordedRequest(WireRequest):
    """One request the server received, as it arrived; `body` has camelCase keys."""

    query: dict[str, str]
    raw_body: Any  # the JSON as sent, keys spelled however the client spelled them

    @property
    def version(self) -> str:
        return self.path.strip("/").split("/", 1)[0]

    @property
    def model(self) -> str:
        target = self.path.split("/models/", 1)[-1]
        return target.rpartition(":")[0] or target

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-goog-api-key")

    @property
    def contents(self) -> list[dict[str, Any]]:
        contents = self.body.get("contents")
        return [c for c in contents if isinstance(c, dict)] if isinstance(contents, list) else []

    @property
    def generation_config(self) -> dict[str, Any]:
        config = self.body.get("generationConfig")
        return config if isinstance(config, dict) else {}

    @property
    def system_instruction(self) -> str | None:
        """The text of systemInstruction's parts, one per line; None when there is none."""
        instruction = self.body.get("systemInstruction")
        if not isinstance(instruction, dict):
            return None
        return "\n".join(_texts(instruction))

    def roles(self) -> list[str]:
        return [str(content.get("role", "")) for content in self.contents]

    def user_parts(self) -> list[dict[str, Any]]:
        """The parts of the last user content."""
        for content in reversed(self.contents):
            if content.get("role", "user") == "user":
                return _parts(content)
        return []

    def last_user_text(self) -> str:
        """The text of the last user content that has any (function responses alone have none)."""
        for content in reversed(self.contents):
            if content.get("role", "user") == "user" and (texts := _texts(content)):
                return " ".join(texts)
        return ""

    @property
    def tools(self) -> list[Any]:
        """`tools` as sent (camelCase); [] when absent."""
        tools = self.body.get("tools")
        return tools if isinstance(tools, list) else []

    @property
    def tool_config(self) -> object:
        return self.body.get("toolConfig")

    def function_declarations(self) -> list[dict[str, Any]]:
        """Every functionDeclarations entry of `tools`, in order."""
        return [
            declaration
            for tool in self.tools
            if isinstance(tool, dict)
            for declaration in tool.get("functionDeclarations") or []
            if isinstance(declaration, dict)
        ]

    def tool_history(self) -> ToolHistory:
        """The `functionCall` parts of model contents and the `functionResponse` parts of user
        contents, in order."""
        history = ToolHistory()
        for content in self.contents:
            user = content.get("role", "user") == "user"
            for part in _parts(content):
                call, response = part.get("functionCall"), part.get("functionResponse")
                if isinstance(call, dict):
                    history.called(
                        SeenToolCall(call.get("id"), str(call.get("name")), call.get("args"))
                    )
                elif isinstance(response, dict):
                    history.answered(_seen_result(response))
                elif user:
                    history.user_said()
                else:
                    history.model_said()
        return history

    def inline_data(self) -> list[tuple[str, bytes]]:
        """Media type and decoded bytes of every inlineData part in the contents, in order."""
        return [
            (str(part["inlineData"].get("mimeType")), decode_bytes(part["inlineData"]["data"]))
            for content in self.contents
            for part in _parts(content)
            if isinstance(part.get("inlineData"), dict)
        ]


def decode_bytes(value: object) -> bytes:
    """A JSON `bytes` field: base64 in either alphabet, as Google's JSON parsing takes it (the SDK
    sends the URL-safe one)."""
    text = str(value).replace("-", "+").replace("_", "/")
    return base64.b64decode(text, validate=True)


def _seen_result(response: dict[str, Any]) -> SeenToolResult:
    # Google's convention: the output under "output", a failure under "error".
    body = response.get("response")
    body = body if isinstance(body, dict) else {}
    is_error = "error" in body and "output" not in body
    value = body.get("error" if is_error else "output", body)
    output = value if isinstance(value, str) else json.dumps(value)
    return SeenToolResult(response.get("id"), response.get("name"), output, is_error)


def _parts(content: dict[str, Any]) -> list[dict[str, Any]]:
    parts = content.get("parts")
    return [part for part in parts if isinstance(part, dict)] if isinstance(parts, list) else []


def _texts(content: dict[str, Any]) -> list[str]:
    return [str(part["text"]) for part in _parts(content) if isinstance(part.get("text"), str)]


def _refusal(body: dict[str, Any]) -> str | None:
    """Gemini's 400 message for a body it would refuse, or None."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for index, content in enumerate(contents):
        where = f"GenerateContentRequest.contents[{index}]"
        if not isinstance(content, dict):
            return f"* {where}: must be an object"
        if content.get("role", "user") not in ("user", "model"):
            return "Please use a valid role: user, model."
        parts = _parts(content)
        if not parts:
            return f"* {where}.parts: contents.parts must not be empty."
        for part in parts:
            if "text" in part and not part["text"]:
                return (
                    "Unable to submit request because it has an empty text parameter. "
                    "Add a value to the parameter and try again."
                )
            inline = part.get("inlineData")
            if inline is None:
                continue
            media_type = inline.get("mimeType") if isinstance(inline, dict) else None
            if media_type not in INLINE_MEDIA_TYPES:
                return f"Unsupported MIME type: {media_type}"
            try:
                decode_bytes(inline.get("data", ""))
            except (binascii.Error, ValueError):
                return f"* {where}: Invalid value at 'inline_data.data' (TYPE_BYTES), Base64 decoding failed"
    return _function_refusal(contents) or _tools_refusal(body.get("tools"))


def _function_refusal(contents: list[Any]) -> str | None:
    """Gemini's 400 message for function calls and responses it would refuse, or None."""
    # The current turn starts after the last user content with anything but function responses.
    turn_start = 0
    for index, content in enumerate(contents):
        if content.get("role", "user") == "user" and any(
            "functionResponse" not in part for part in _parts(content)
        ):
            turn_start = index + 1
    calls = 0  # the function calls of the content before
    for index, content in enumerate(contents):
        where = f"* GenerateContentRequest.contents[{index}]"
        parts = _parts(content)
        call_parts = [part for part in parts if "functionCall" in part]
        responses = [part["functionResponse"] for part in parts if "functionResponse" in part]
        if content.get("role", "user") == "user":
            if call_parts:
                return f"{where}: a function call must be in a model content."
            if responses and len(responses) != calls:
                return (
                    "Please ensure that the number of function response parts is equal to the "
                    "number of function call parts of the function call turn."
                )
            for response in responses:
                if not isinstance(response, dict) or not response.get("name"):
                    return f"{where}.function_response.name: Name cannot be empty."
                if not isinstance(response.get("response"), dict):
                    return f"{where}.function_response.response: must be an object."
        elif responses or calls:
            return (
                "Please ensure that function response turn comes immediately after a function "
                "call turn."
            )
        if call_parts and index >= turn_start and not call_parts[0].get("thoughtSignature"):
            name = call_parts[0]["functionCall"].get("name")
            return (
                f"Function call `{name}` in the `{index + 1}.` content block is missing a "
                "`thought_signature`."
            )
        calls = len(call_parts)
    return None


def _tools_refusal(tools: object) -> str | None:
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for position, declaration in enumerate(declarations or []):
            where = f"* GenerateContentRequest.tools[{index}].function_declarations[{position}]"
            if not isinstance(declaration, dict) or not declaration.get("name"):
                return f"{where}.name: Name cannot be empty."
            if "parameters" in declaration and "parametersJsonSchema" in declaration:
                return f"{where}: parameters and parameters_json_schema are mutually exclusive."
    return None


class GeminiServer(WireServer[RecordedRequest, Script]):
    """`with GeminiServer(api_key=...) as server:` then point a client at `server.base_url`."""

    NAME = "Gemini test server"
    PROVIDER_TYPE = "google"

    def __init__(self, *, api_key: str) -> None:
        super().__init__()
        self.api_key: str = api_key

    def _script_for_model(self, model: str) -> Script | None:
        return script_for_model(model)

    def _app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{version}/models/{target:path}", self._models, methods=["POST"])]
        )

    async def _models(self, request: Request) -> Response:
        version = request.path_params["version"]
        model, _, method = str(request.path_params["target"]).rpartition(":")
        raw_body = await read_json(request)
        body = camel_keys(raw_body) if isinstance(raw_body, dict) else {}
        record = self._record(
            RecordedRequest(
                path=request.url.path,
                query=dict(request.query_params),
                headers=lower_headers(request),
                raw_body=raw_body,
                body=body,
            )
        )

        if version not in API_VERSIONS or method != "streamGenerateContent" or not model:
            return _error(404, message=f"Method not found: {request.url.path}")
        key = record.api_key
        if not key:
            return _error(
                403,
                message="Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            return _error(
                400,
                message="API key not valid. Please pass a valid API key.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        if record.query.get("alt") != "sse":
            return _error(400, message="This test server answers only streams with alt=sse.")
        if not isinstance(raw_body, dict):
            return _error(400, message="Invalid JSON payload received.")
        refusal = _refusal(body)
        if refusal is not None:
            return _error(400, message=refusal)

        script, attempt = self._script_and_attempt(model)
        if script is None:
            return _error(404, model=model, version=version)
        if (status := script.failure_on(attempt)) is not None:
            details = []
            if script.retry_delay is not None:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": script.retry_delay,
                    }
                )
            headers = {"retry-after": script.retry_after} if script.retry_after else None
            return _error(
                status,
                model=model,
                version=version,
                key=key,
                details=details,
                headers=headers,
            )

        history = record.tool_history()
        calls = script.due_calls(history, record.last_user_text(), _call_id(script))
        events = _stream_events(script, model, record, history, calls)
        return self._streamed(
            record, evenly_paced(events, script.chunk_delay), headers={"cache-control": "no-cache"}
        )


def _call_id(script: Script) -> Callable[[], str]:
    # An empty id is left out of the functionCall, as the Gemini API mostly leaves it.
    return (lambda: uuid.uuid4().hex[:8]) if script.function_call_ids else (lambda: "")


def _function_call(call: PlannedCall) -> dict[str, Any]:
    function_call: dict[str, Any] = {"name": call.name, "args": call.input}
    if call.call_id:
        function_call["id"] = call.call_id
    return {"functionCall": function_call}


def _stream_events(
    script: Script,
    model: str,
    record: RecordedRequest,
    history: ToolHistory,
    calls: list[PlannedCall],
) -> list[bytes | None]:
    """The SSE byte strings of one streamed answer, `calls` in its last chunk when given; None
    marks where the connection drops."""
    envelope = {"modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
    prompt_tokens = script.cached_tokens + sum(
        len(text.split())
        for content in [*record.contents, record.body.get("systemInstruction") or {}]
        for text in _texts(content)
    )
    if script.block_reason is not None:
        feedback = {"blockReason": script.block_reason, "safetyRatings": _BLOCKED_RATINGS}
        counts = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        return [sse({"promptFeedback": feedback, "usageMetadata": counts, **envelope})]

    def chunk(parts: list[dict[str, Any]]) -> bytes:
        candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
        return sse({"candidates": [candidate], **envelope})

    config = record.generation_config
    thinking = config.get("thinkingConfig")
    thinking = thinking if isinstance(thinking, dict) else {}
    thinks = bool(script.thoughts) and thinking.get("thinkingBudget") != 0
    shown = thinking.get("includeThoughts") or script.thoughts_unasked
    thoughts = word_pieces(script.thoughts) if thinks and shown else []
    asked = _last_user_text(record)
    reply = script.text_before_calls if calls else script.reply_to(asked, history)
    pieces = word_pieces(reply)
    finish_reason = script.finish_reason
    cap = config.get("maxOutputTokens")
    if isinstance(cap, int) and len(pieces) > cap:
        pieces, finish_reason = pieces[:cap], "MAX_TOKENS"

    events: list[bytes | None] = [chunk([{"text": piece, "thought": True}]) for piece in thoughts]
    for count, piece in enumerate(pieces):
        if count == script.error_after_chunks:
            status, message = _ERRORS.get(script.error_status, ("UNKNOWN", "Error."))
            error = {"code": script.error_status, "message": message, "status": status}
            return [*events, sse({"error": error})]
        if count == script.drop_after_chunks:
            return [*events, None]
        if count == script.garbage_after_chunks:
            return [*events, b"data: <html><body>Bad gateway</body></html>\n\n"]
        events.append(chunk([{"text": piece}]))
    if finish_reason is None:
        return events

    thought_tokens = len(script.thoughts.split()) if thinks else 0
    candidate_tokens = len("".join(pieces).split())
    candidate_tokens += sum(len(json.dumps(call.input).split()) for call in calls)
    usage: dict[str, Any] = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": candidate_tokens,
        "totalTokenCount": prompt_tokens + candidate_tokens + thought_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    if thought_tokens:
        usage["thoughtsTokenCount"] = thought_tokens
    if script.cached_tokens:
        usage["cachedContentTokenCount"] = script.cached_tokens
    last: dict[str, Any] = {"finishReason": finish_reason, "index": 0}
    if finish_reason in CONTENT_FILTER_REASONS:
        last["safetyRatings"] = _BLOCKED_RATINGS
    elif calls:
        # Gemini 3 signs the first call of a step (and only that one, for parallel calls).
        parts = [_function_call(call) for call in calls]
        parts[0]["thoughtSignature"] = base64.b64encode(b"signature").decode()
        last["content"] = {"role": "model", "parts": parts}
    else:
        last["content"] = {"role": "model", "parts": [{"text": ""}]}
    events.append(sse({"candidates": [last], "usageMetadata": usage, **envelope}))
    return events


def _last_user_text(record: RecordedRequest) -> str:
    return " ".join(_texts({"parts": record.user_parts()}))


def _error(
    status: int,
    *,
    model: str = "",
    version: str = "",
    key: str = "",
    message: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    status_name, template = _ERRORS.get(status, ("UNKNOWN", "Unknown error."))
    error: dict[str, Any] = {
        "code": status,
        "message": message or template.format(model=model, version=version, key=key),
        "status": status_name,
    }
    if details:
        error["details"] = details
    # Google pretty-prints its error bodies, over several lines.
    return Response(
        json.dumps({"error": error}, indent=2),
        status_code=status,
        media_type="application/json; charset=UTF-8",
        headers=headers,
    )
