"""Google Gemini API adapter on the google-genai SDK, streamed. Never imports temporalio/fastapi/sqlalchemy/redis.

The SDK's own HTTP behaviour is pinned down rather than inherited:

- Transport. The adapter hands the SDK its own httpx client. Left to itself the SDK picks aiohttp
  whenever aiohttp is importable (it is, through aiobotocore), and then retries a refused
  connection once after sleeping 1-10 s, and bounds the whole request, stream included, by the
  timeout. With httpx the timeout bounds each connect and each wait for the next bytes, as in the
  other adapters, so a long answer that keeps streaming is never cut short.
- Timeouts. `HttpOptions.timeout` (milliseconds) is the only way to give httpx a timeout: without it
  the SDK passes `timeout=None`, which turns the client's own off. The SDK also copies it into an
  `X-Server-Timeout` header, a server-side deadline for the whole call; that header is dropped so
  the server keeps its own limit instead of cutting long answers at our silence timeout.
- Retries. `HttpRetryOptions(attempts=1)`, and automatic continuation (which re-sends a request
  whose stream broke off) is off: Temporal owns retries.
- Environment. Key, Vertex mode, base URL, API version and the replay client are all passed
  explicitly, so GOOGLE_API_KEY, GEMINI_API_KEY, GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_GEMINI_BASE_URL,
  GOOGLE_GENAI_API_VERSION and GOOGLE_GENAI_CLIENT_MODE change nothing.

A prompt Gemini blocks (`promptFeedback.blockReason`, no candidates) ends the stream normally with
Finish("content-filter"), as an answer blocked part way does: a blocked prompt is the same outcome
for the user, the AI SDK has the finish reason for it, and the call's usage is still reported.

Tools go out as function declarations with their JSON Schema (`parametersJsonSchema`) and function
calling mode AUTO. A call arrives whole, as a `functionCall` part (its `id` is often absent, and one
is made up then), and an answer with calls finishes STOP, which becomes "tool-calls". In a prompt, a
step's calls are `functionCall` parts of the model content and its results `functionResponse` parts
of one user content, `{"output": ...}` or `{"error": ...}`. Gemini 3 wants the thought signature it
put on the first call of each step back with that call; the prompt does not keep it, so that part
carries the placeholder Google documents for calls it did not sign.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx
from google import genai
from google.genai import errors, types
from google.genai.client import DebugConfig

from media.images import ImageRefused, normalize_image
from providers.base import KEYLESS_API_KEY as KEYLESS_API_KEY  # also this module's name
from providers.base import (
    ConfiguredModels,
    DocumentInput,
    Finish,
    FinishReason,
    GenerationRequest,
    ImageInput,
    PromptInput,
    PromptMessage,
    PromptToolResult,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolDefinition,
    Usage,
    parse_tool_input,
    refuse_unaccepted_inputs,
)
from providers.endpoints import GEMINI_BASE_URL
from providers.failures import (
    connection_failed,
    parse_retry_after,
    scrub,
    status_failure,
    timed_out,
)
from providers.options import (
    ProviderOptions,
    is_integer,
    is_number,
    is_positive_integer,
    is_strings,
    object_of,
)

DEFAULT_BASE_URL: Final = GEMINI_BASE_URL

# v1beta carries every field this adapter sends (system instructions, thinking config) for every
# model, and is what the AI SDK's Google provider calls. Pinned, so GOOGLE_GENAI_API_VERSION cannot
# move requests to another path.
API_VERSION: Final = "v1beta"

# httpx allows 100 connections by default, and every stream holds one for its whole length: a busy
# worker gets as many as the OpenAI SDK allows.
_CONNECTION_LIMITS: Final = httpx.Limits(max_connections=1000, max_keepalive_connections=100)

_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    **{
        reason: "content-filter"
        for reason in (
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_RECITATION",
        )
    },
}

# Google's placeholder thought signature for a function call it did not sign ("skip validation").
# The wire field is bytes, base64 in JSON: these bytes are what the placeholder's text decodes to,
# so it reaches the API spelled exactly as documented.
SKIP_SIGNATURE_CHECK: Final = base64.urlsafe_b64decode("skip_thought_signature_validator")

# Whether and which of the tools offered to call is the model's to decide.
_AUTO_FUNCTION_CALLING: Final = types.ToolConfig(
    function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.AUTO)
)

# google.protobuf.Duration in JSON: seconds with up to nine decimals, then "s".
_DURATION: Final = re.compile(r"(\d+(?:\.\d{0,9})?)s")
_RETRY_INFO_TYPE: Final = "type.googleapis.com/google.rpc.RetryInfo"

_THINKING_LEVELS: Final = ("minimal", "low", "medium", "high", "xhigh")

# The responses opened while the current task waits on the SDK's stream, so that closing the
# adapter's stream closes them at once. The SDK's own generators would close them too, but only
# when garbage collection gets to them, in a later turn of the event loop.
_OPENED_RESPONSES: ContextVar[list[httpx.Response] | None] = ContextVar(
    "gemini_opened_responses", default=None
)


@dataclass(frozen=True)
class GenerationOptions:
    """The allow-listed providerOptions, as Gemini generation config."""

    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    thinking: types.ThinkingConfig | None = None

    @property
    def include_thoughts(self) -> bool:
        return self.thinking is not None and bool(self.thinking.include_thoughts)


class GeminiProvider(ConfiguredModels):
    """One configured endpoint speaking the Gemini API's streamGenerateContent."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str,
        models: Sequence[str],
        timeout_seconds: float,
        image_models: Sequence[str] | None = None,
        document_models: Sequence[str] = (),
    ) -> None:
        super().__init__(models, image_models=image_models, document_models=document_models)
        self.name = name
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            timeout=timeout_seconds,
            limits=_CONNECTION_LIMITS,
            event_hooks={
                "request": [_drop_server_deadline],
                "response": [_remember_response],
            },
        )
        self._client = genai.Client(
            # Given no key, the SDK takes GOOGLE_API_KEY or GEMINI_API_KEY from the environment.
            api_key=api_key or KEYLESS_API_KEY,
            vertexai=False,
            # Its defaults come from GOOGLE_GENAI_CLIENT_MODE and friends, which can swap the
            # client for one replaying recorded answers from disk.
            debug_config=DebugConfig(client_mode=None, replays_directory=None, replay_id=None),
            http_options=types.HttpOptions(
                base_url=base_url,
                api_version=API_VERSION,
                # Temporal owns retries: every attempt is then visible in the workflow history,
                # and a retried stream tells clients to drop the failed attempt's output first.
                retry_options=types.HttpRetryOptions(attempts=1),
                timeout=max(1, math.ceil(timeout_seconds * 1000)),
                httpx_async_client=self._http,
            ),
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        options = generation_options(request.options, provider=self.name)
        refuse_unaccepted_inputs(self.name, request, self.input_kinds(request.model))
        # Re-encoding a GIF is CPU work for Pillow, kept off the event loop.
        if any(_is_gif(item) for message in request.messages for item in message.inputs):
            contents, system = await asyncio.to_thread(_conversation, request.messages)
        else:
            contents, system = _conversation(request.messages)
        config = types.GenerateContentConfig(
            system_instruction=system,
            max_output_tokens=options.max_output_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stop_sequences=options.stop_sequences,
            thinking_config=options.thinking,
            tools=[_tools(request.tools)] if request.tools else None,
            tool_config=_AUTO_FUNCTION_CALLING if request.tools else None,
            # The SDK never calls tools itself, and never re-sends a request on its own.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )
        where = f"{self.name}/{request.model}"
        reader = _ResponseReader(include_thoughts=options.include_thoughts)
        opened: list[httpx.Response] = []
        try:
            chunks = await self._client.aio.models.generate_content_stream(
                model=request.model, contents=contents, config=config
            )
            try:
                while (chunk := await _next_chunk(chunks, opened)) is not None:
                    for event in reader.read(chunk):
                        yield event
            finally:
                # Leaving any way (end, error, aclose of this generator, task cancellation)
                # closes the HTTP response before this generator returns, so the server stops
                # generating.
                for response in opened:
                    await response.aclose()
                await cast(AsyncGenerator[types.GenerateContentResponse, None], chunks).aclose()
        # `from None` on each: SDK and transport messages can echo request details, and a chained
        # cause would travel into workflow history; only the scrubbed translation leaves here.
        except errors.APIError as error:
            raise self._translate(error, where) from None
        except httpx.TimeoutException:
            raise timed_out(where) from None
        except httpx.TransportError as error:
            raise connection_failed(where, error, secret=self._api_key) from None
        except errors.UnknownApiResponseError:
            raise ProviderError.unavailable(f"{where}: malformed chunk in the stream") from None
        if reader.finish is None:
            # Gemini ends every answer with a finishReason: without one the answer was cut short
            # (a proxy closed the stream), and a later attempt may get all of it.
            raise ProviderError.unavailable(f"{where}: the stream ended before a finishReason")
        usage = reader.usage()
        if usage is not None:
            yield usage
        yield Finish(reader.finish)

    async def aclose(self) -> None:
        # The SDK closes the sync client it built itself, but never a client it was given.
        self._client.close()
        await self._http.aclose()

    def _translate(self, error: errors.APIError, where: str) -> ProviderError:
        # The SDK raises the same classes for an HTTP error status and for an error object inside
        # a 200 stream; only the response it carries tells them apart.
        response = error.response
        in_stream = getattr(response, "status_code", None) == 200
        code = error.code if _is_status(error.code) else None
        label = " ".join(str(part) for part in (code, error.status) if part)
        detail = error.message or str(error)
        if in_stream:
            message = self._scrub(f"{where}: error in stream: {label or 'unknown'}: {detail}")
        else:
            message = self._scrub(f"{where}: HTTP {label}: {detail}")
        delays = [
            delay
            for delay in (
                _retry_info_delay(error.details),
                parse_retry_after(response.headers)
                if isinstance(response, httpx.Response) and not in_stream
                else None,
            )
            if delay is not None
        ]
        # The longer of the two when a gateway adds a Retry-After to Google's RetryInfo: retrying
        # before either allows would only be refused again.
        retry_after = max(delays) if delays else None
        if code is None:
            return ProviderError.unavailable(message, retry_after=retry_after)
        return status_failure(message, code, retry_after=retry_after)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


class _ResponseReader:
    """Turns streamed GenerateContentResponse chunks into deltas; keeps the finish and usage.

    Every field of the SDK's response types is optional (a blocked prompt has no candidates, a
    chunk may have no parts), so each is checked before it is used.
    """

    def __init__(self, *, include_thoughts: bool) -> None:
        self._finish: FinishReason | None = None
        self._include_thoughts = include_thoughts
        self._usage: types.GenerateContentResponseUsageMetadata | None = None
        self._made_calls = False

    @property
    def finish(self) -> FinishReason | None:
        # Gemini finishes an answer that calls functions with STOP, as it does any other.
        if self._made_calls and self._finish == "stop":
            return "tool-calls"
        return self._finish

    def read(self, chunk: types.GenerateContentResponse) -> Iterator[ProviderEvent]:
        if chunk.usage_metadata is not None:
            # Each chunk's counts are the totals so far, not an increment.
            self._usage = chunk.usage_metadata
        feedback = chunk.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            self._finish = "content-filter"
        for candidate in chunk.candidates or ():
            if (candidate.index or 0) != 0:  # we never ask for more than one candidate
                continue
            parts = candidate.content.parts if candidate.content is not None else None
            for part in parts or ():
                if part.function_call is not None:
                    yield from self._call(part.function_call)
                    continue
                # Inline data and thought signatures have no place in the event contract.
                if not part.text:
                    continue
                if not part.thought:
                    yield TextDelta(part.text)
                # Thoughts nobody asked for stay out of the answer and out of the reasoning.
                elif self._include_thoughts:
                    yield ReasoningDelta(part.text)
            if candidate.finish_reason is not None:
                reason = str(getattr(candidate.finish_reason, "value", candidate.finish_reason))
                self._finish = _FINISH_REASONS.get(reason.upper(), "other")

    def _call(self, call: types.FunctionCall) -> Iterator[ProviderEvent]:
        # Whole, never streamed: its input is one delta. A call without parameters has no args.
        call_id = call.id or _call_id()
        name = call.name or ""
        text = json.dumps(call.args if call.args is not None else {}, ensure_ascii=False)
        yield ToolCallStart(call_id, name)
        yield ToolCallDelta(call_id, text)
        yield ToolCall(call_id, name, parse_tool_input(text), text)
        self._made_calls = True

    def usage(self) -> Usage | None:
        metadata = self._usage
        if metadata is None:
            return None
        thoughts = metadata.thoughts_token_count or 0
        return Usage(
            # promptTokenCount already includes the cached part.
            input_tokens=metadata.prompt_token_count or 0,
            # Gemini counts thoughts apart from the candidates; both are billed as output.
            output_tokens=(metadata.candidates_token_count or 0) + thoughts,
            cached_input_tokens=metadata.cached_content_token_count or 0,
            reasoning_tokens=thoughts,
        )


async def _next_chunk(
    chunks: AsyncIterator[types.GenerateContentResponse], opened: list[httpx.Response]
) -> types.GenerateContentResponse | None:
    # The SDK sends its request inside the first `anext`, in this task: the response hook finds
    # `opened` through the context variable, set only while the SDK runs.
    token = _OPENED_RESPONSES.set(opened)
    try:
        return await anext(chunks, None)
    finally:
        _OPENED_RESPONSES.reset(token)


async def _remember_response(response: httpx.Response) -> None:
    opened = _OPENED_RESPONSES.get()
    if opened is not None:
        opened.append(response)


async def _drop_server_deadline(request: httpx.Request) -> None:
    request.headers.pop("x-server-timeout", None)


def generation_options(options: Mapping[str, Any], *, provider: str) -> GenerationOptions:
    """The allow-listed providerOptions as generation config; rejects ill-typed values.

    providerOptions come from API callers, so only sampling knobs and the thinking config pass:
    anything else (`candidateCount`, `responseMimeType`, `tools`, ...) could change the wire
    contract this adapter parses. The AI SDK's camelCase names and the SDK's snake_case ones are
    both accepted, and the AI SDK's `maxTokens` too.
    """
    read = ProviderOptions(options, provider)
    stop_sequences = read.checked(
        ("stopSequences", "stop_sequences"), is_strings, "a list of strings"
    )
    thinking = read.given("thinkingConfig", "thinking_config")
    return GenerationOptions(
        max_output_tokens=read.checked(
            ("maxOutputTokens", "max_output_tokens", "maxTokens"),
            is_positive_integer,
            "a positive integer",
        ),
        temperature=read.checked(("temperature",), is_number, "a number"),
        top_p=read.checked(("topP", "top_p"), is_number, "a number"),
        top_k=read.checked(("topK", "top_k"), is_positive_integer, "a positive integer"),
        stop_sequences=list(stop_sequences) if stop_sequences is not None else None,
        thinking=_thinking(thinking[1], read.path(thinking[0])) if thinking else None,
    )


def _thinking(option: object, where: str) -> types.ThinkingConfig:
    fields = {
        "includeThoughts": "include_thoughts",
        "include_thoughts": "include_thoughts",
        "thinkingBudget": "thinking_budget",
        "thinking_budget": "thinking_budget",
        "thinkingLevel": "thinking_level",
        "thinking_level": "thinking_level",
    }
    value = object_of(option, where, fields)
    config: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        match fields[key]:
            case "include_thoughts" if not isinstance(item, bool):
                raise ProviderError.rejected(f"{where}.{key} must be true or false")
            # -1 lets the model decide, 0 turns thinking off where a model allows it.
            case "thinking_budget" if not (is_integer(item) and item >= -1):
                raise ProviderError.rejected(f"{where}.{key} must be an integer of -1 or more")
            case "thinking_level" if not (
                isinstance(item, str) and item.lower() in _THINKING_LEVELS
            ):
                raise ProviderError.rejected(
                    f"{where}.{key} must be one of {', '.join(_THINKING_LEVELS)}"
                )
            case "thinking_level":
                item = types.ThinkingLevel(item.upper())
        config[fields[key]] = item
    return types.ThinkingConfig(**config)


def _conversation(
    messages: Sequence[PromptMessage],
) -> tuple[list[types.Content], types.Content | None]:
    """Gemini's `contents` and `system_instruction` for a prompt."""
    system = [types.Part(text=m.content) for m in messages if m.role == "system" and m.content]
    contents: list[types.Content] = []
    for message in messages:
        if message.role == "system":
            continue
        # The text first, then the inputs or calls in order. Gemini refuses an empty text part,
        # and a message with nothing in it tells the model nothing: a stopped turn can leave an
        # empty assistant message in the history.
        parts = [types.Part(text=message.content)] if message.content else []
        parts.extend(_input_part(item) for item in message.inputs)
        parts.extend(
            types.Part(
                function_call=types.FunctionCall(
                    id=call.call_id or None, name=call.name, args=call.input
                ),
                # Gemini 3 refuses the first call of a step without a signature.
                thought_signature=SKIP_SIGNATURE_CHECK if position == 0 else None,
            )
            for position, call in enumerate(message.tool_calls)
        )
        parts.extend(_response_part(result) for result in message.tool_results)
        if parts:
            role = "model" if message.role == "assistant" else "user"
            contents.append(types.Content(role=role, parts=parts))
    return contents, types.Content(parts=system) if system else None


def _response_part(result: PromptToolResult) -> types.Part:
    # Google's convention: "output" for what a function returned, "error" for how it failed.
    response = {"error" if result.is_error else "output": result.output}
    return types.Part(
        function_response=types.FunctionResponse(
            id=result.call_id or None, name=result.name, response=response
        )
    )


def _tools(tools: Sequence[ToolDefinition]) -> types.Tool:
    return types.Tool(
        function_declarations=[
            # The schema as it is: `parameters` would take only Gemini's OpenAPI subset.
            types.FunctionDeclaration(
                name=tool.name,
                description=tool.description,
                parameters_json_schema=tool.input_schema,
            )
            for tool in tools
        ]
    )


def _call_id() -> str:
    # Gemini often leaves a call's id out; the contract wants one per call.
    return f"call_{uuid.uuid4().hex}"


def _input_part(item: PromptInput) -> types.Part:
    # Inline data only: the Gemini API's inline Blob has no file name (the SDK refuses
    # display_name outside Vertex), so a PDF goes without its name.
    match item:
        case ImageInput() if _is_gif(item):
            # Gemini takes PNG, JPEG, WebP, HEIC and HEIF, but not GIF, which the other providers
            # take: it gets the first frame instead, as the attachment copies for models have it.
            try:
                still = normalize_image(item.data)
            except ImageRefused as exc:
                raise ProviderError.rejected(f"a GIF image cannot be sent: {exc}") from None
            return types.Part.from_bytes(data=still.data, mime_type=still.media_type)
        case ImageInput() | DocumentInput():
            return types.Part.from_bytes(data=item.data, mime_type=item.media_type)


def _is_gif(item: PromptInput) -> bool:
    return item.media_type == "image/gif"


def _is_status(code: object) -> bool:
    return isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599


def _retry_info_delay(details: object) -> float | None:
    """The seconds a google.rpc.RetryInfo in an error body asks to wait (`"retryDelay": "37s"`)."""
    body = details.get("error", details) if isinstance(details, Mapping) else None
    entries = body.get("details") if isinstance(body, Mapping) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, Mapping) and entry.get("@type") == _RETRY_INFO_TYPE:
            match = _DURATION.fullmatch(str(entry.get("retryDelay", "")))
            if match is not None:
                return float(match[1])
    return None
