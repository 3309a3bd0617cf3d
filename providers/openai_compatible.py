"""OpenAI-compatible chat completions adapter, Groq and OpenRouter included. Never imports temporalio/fastapi/sqlalchemy/redis.

Groq and OpenRouter speak the same wire format with a few additions of their own, so each is a
dialect of this adapter rather than an adapter of its own: Groq reports usage in `x_groq.usage`
and answers 498 when its flex tier is out of capacity (worth retrying); OpenRouter reports the
call's cost in `usage.cost`, sends `: OPENROUTER PROCESSING` keep-alive comments (the SDK skips
them) and relays upstream failures as an error chunk inside a 200 stream.

Tools go out as `function` tools with `tool_choice: "auto"`. A streamed call arrives in
`delta.tool_calls` pieces keyed by `index`: the first names it (with its id), the rest carry pieces
of its arguments' JSON text, which become ToolCallDeltas; every call is complete once the choice
finishes (or the stream ends), and only then is it parsed. In a prompt, a step's calls ride on the
assistant message and each result is a role-`tool` message of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Final

import openai
from openai import Omit, omit
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionContentPartParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionToolChoiceOptionParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall
from openai.types.completion_usage import CompletionUsage

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
    PromptToolCall,
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
from providers.endpoints import (  # re-exported: the dialects' endpoints
    GROQ_BASE_URL as GROQ_BASE_URL,
)
from providers.endpoints import (
    OPENAI_BASE_URL as OPENAI_BASE_URL,
)
from providers.endpoints import (
    OPENROUTER_BASE_URL as OPENROUTER_BASE_URL,
)
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
    is_string,
    is_string_or_strings,
    option_table,
)


class OpenAIDialect(StrEnum):
    """Which service's additions to the OpenAI wire format an endpoint speaks."""

    OPENAI = "openai"  # OpenAI itself and every plain compatible server (vLLM, LM Studio, ...)
    GROQ = "groq"
    OPENROUTER = "openrouter"


# Groq's 498 `capacity_exceeded`: its flex tier is full for now, documented as worth retrying.
_ALSO_RETRYABLE: Final[Mapping[OpenAIDialect, frozenset[int]]] = {
    OpenAIDialect.OPENAI: frozenset(),
    OpenAIDialect.GROQ: frozenset({498}),
    OpenAIDialect.OPENROUTER: frozenset(),
}

_INLINE_ENCODE_BYTES: Final = 1_000_000

_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}


# providerOptions come from API callers, so only sampling knobs pass through: anything else
# (`stream`, `n`, `tools`, `logit_bias`, ...) could change the wire contract this adapter parses.
_OPTIONS: Final = option_table(
    ("temperature", (), is_number, "a number"),
    ("top_p", ("topP",), is_number, "a number"),
    ("max_tokens", ("maxTokens",), is_integer, "an integer"),
    ("max_completion_tokens", ("maxCompletionTokens",), is_integer, "an integer"),
    ("presence_penalty", ("presencePenalty",), is_number, "a number"),
    ("frequency_penalty", ("frequencyPenalty",), is_number, "a number"),
    ("seed", (), is_integer, "an integer"),
    ("stop", (), is_string_or_strings, "a string or a list of strings"),
    ("reasoning_effort", ("reasoningEffort",), is_string, "a string"),
    ("user", (), is_string, "a string"),
)


class OpenAICompatibleProvider(ConfiguredModels):
    """One configured endpoint speaking the OpenAI chat completions API, streamed."""

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
        dialect: OpenAIDialect = OpenAIDialect.OPENAI,
    ) -> None:
        super().__init__(models, image_models=image_models, document_models=document_models)
        self.name = name
        self.dialect = OpenAIDialect(dialect)
        self._also_retryable = _ALSO_RETRYABLE[self.dialect]
        self._api_key = api_key
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # The SDK refuses to build a client with no key; keyless servers ignore the header.
            api_key=api_key or KEYLESS_API_KEY,
            # Temporal owns retries: every attempt is then visible in the workflow history, and a
            # retried stream tells clients to drop the failed attempt's output first.
            max_retries=0,
            timeout=timeout_seconds,
        )
        # The SDK fills these from OPENAI_* environment variables, which belong to OpenAI itself
        # and must not travel to a third-party endpoint; settings are the only configuration.
        self._client.organization = None
        self._client.project = None

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        params = sampling_params(request.options, provider=self.name)
        refuse_unaccepted_inputs(self.name, request, self.input_kinds(request.model))
        # Built once, before the call: inputs are base64-encoded here and nowhere else. Encoding
        # 20 MB takes about 0.1 s, so large inputs are encoded off the event loop.
        input_bytes = sum(len(item.data) for m in request.messages for item in m.inputs)
        if input_bytes > _INLINE_ENCODE_BYTES:
            messages = await asyncio.to_thread(_message_params, request.messages)
        else:
            messages = _message_params(request.messages)
        tools: list[ChatCompletionFunctionToolParam] | Omit = omit
        tool_choice: ChatCompletionToolChoiceOptionParam | Omit = omit
        if request.tools:
            tools, tool_choice = [_tool_param(tool) for tool in request.tools], "auto"
        usage: Usage | None = None
        groq_usage: Usage | None = None  # used only when no standard usage arrives
        finish: FinishReason = "other"  # a server that never sends finish_reason
        calls = _ToolCallAssembler()
        try:
            chunks = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                tools=tools,
                tool_choice=tool_choice,
                **params,
            )
            # Leaving this block any way (end, error, aclose of this generator, task
            # cancellation) closes the HTTP response, so the server stops generating.
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = self._usage(chunk.usage)
                    if self.dialect is OpenAIDialect.GROQ:
                        groq_usage = _groq_usage(chunk) or groq_usage
                    for choice in chunk.choices:
                        if choice.index != 0:  # we never ask for n > 1
                            continue
                        reasoning = _reasoning_text(choice.delta)
                        if reasoning:
                            yield ReasoningDelta(reasoning)
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
                        for event in calls.read(choice.delta.tool_calls or ()):
                            yield event
                        if choice.finish_reason == "error":
                            # OpenRouter's failure chunk comes with a top-level `error`, which
                            # the SDK raises on; this is the same failure without its details.
                            raise ProviderError.unavailable(
                                f"{self.name}/{request.model}: the answer ended with an error"
                            )
                        if choice.finish_reason is not None:
                            finish = _FINISH_REASONS.get(choice.finish_reason, "other")
                            for event in calls.complete():
                                yield event
        except openai.APIError as error:
            # `from None`: SDK messages can echo request details, and a chained cause would
            # travel into workflow history; only the scrubbed translation leaves this module.
            raise self._translate(error, request.model) from None
        # A server that never finished the choice: its calls are as complete as they will get.
        for event in calls.complete():
            yield event
        if calls.made and finish == "stop":
            # Some compatible servers finish a tool-calling answer with "stop".
            finish = "tool-calls"
        usage = usage or groq_usage
        if usage is not None:
            yield usage
        yield Finish(finish)

    async def aclose(self) -> None:
        await self._client.close()

    def _translate(self, error: openai.APIError, model: str) -> ProviderError:
        where = f"{self.name}/{model}"
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            detail = _error_detail(error.body) or error.message
            message = self._scrub(f"{where}: HTTP {status}: {detail}")
            return status_failure(
                message,
                status,
                retry_after=parse_retry_after(error.response.headers),
                also_retryable=self._also_retryable,
            )
        if isinstance(error, openai.APITimeoutError):
            return timed_out(where)
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__
            return connection_failed(
                where, cause if cause is not None else error.message, secret=self._api_key
            )
        # An error event inside a 200 stream (OpenRouter and others relay upstream failures this
        # way). Its `code` is sometimes an HTTP status (OpenRouter's 402 is out of credit), and
        # then it is classified as that status would be; otherwise ("server_error", none) the
        # failure happened mid-generation and a later attempt may succeed.
        detail = _error_detail(error.body) or error.message
        message = self._scrub(f"{where}: error in stream: {detail}")
        code = _error_code_status(error.body)
        if code is not None and 400 <= code < 500:
            return status_failure(message, code, also_retryable=self._also_retryable)
        return ProviderError.unavailable(message, status_code=code)

    def _usage(self, usage: CompletionUsage) -> Usage:
        # Only OpenRouter's `cost` is known to be a charge in USD (its credits are dollars).
        cost = None
        if self.dialect is OpenAIDialect.OPENROUTER:
            cost = _reported_cost((usage.model_extra or {}).get("cost"))
        return _usage(usage, reported_cost=cost)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


def sampling_params(options: Mapping[str, Any], *, provider: str) -> dict[str, Any]:
    """The allow-listed providerOptions as chat completions parameters; rejects ill-typed values."""
    return ProviderOptions(options, provider).allow_listed(_OPTIONS)


@dataclass
class _StreamedCall:
    call_id: str
    name: str = ""
    pieces: list[str] = field(default_factory=list)  # the arguments' JSON text so far
    started: bool = False  # its ToolCallStart was yielded


class _ToolCallAssembler:
    """Turns the `delta.tool_calls` pieces of one choice into tool call events.

    OpenAI names a call (id, name) in its first piece and sends only argument text after that,
    keyed by `index`; compatible servers differ in the details (an id on every piece, no id at
    all, a whole call in one piece), which this tolerates.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _StreamedCall] = {}
        self.made = False  # some call was completed

    def read(self, pieces: Iterable[ChoiceDeltaToolCall]) -> Iterator[ProviderEvent]:
        for position, piece in enumerate(pieces):
            # The SDK does not validate chunks: a server leaving out `index` gets its position.
            index = piece.index if isinstance(piece.index, int) else position
            call = self._calls.get(index)
            if call is None:
                call = self._calls[index] = _StreamedCall(piece.id or _call_id())
            function = piece.function
            if function is not None and function.name and not call.name:
                call.name = function.name
            arguments = function.arguments if function is not None else None
            if arguments:
                call.pieces.append(arguments)
            # Not started before its name is known: a start without a name tells a client nothing.
            if not call.started and call.name:
                call.started = True
                yield ToolCallStart(call.call_id, call.name)
                if call.pieces:
                    yield ToolCallDelta(call.call_id, "".join(call.pieces))
            elif call.started and arguments:
                yield ToolCallDelta(call.call_id, arguments)

    def complete(self) -> Iterator[ProviderEvent]:
        """Every call read so far, as ToolCalls in index order; the assembler is then empty."""
        for index in sorted(self._calls):
            call = self._calls[index]
            text = "".join(call.pieces)
            if not call.started:
                yield ToolCallStart(call.call_id, call.name)
                if text:
                    yield ToolCallDelta(call.call_id, text)
            yield ToolCall(call.call_id, call.name, parse_tool_input(text), text)
            self.made = True
        self._calls.clear()


def _call_id() -> str:
    # For a server sending a call without an id.
    return f"call_{uuid.uuid4().hex}"


def _tool_param(tool: ToolDefinition) -> ChatCompletionFunctionToolParam:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.input_schema,
        },
    }


def _reasoning_text(delta: ChoiceDelta) -> str | None:
    # Not in OpenAI's schema, so the SDK keeps it in model_extra. DeepSeek and vLLM send
    # `reasoning_content`, OpenRouter and Ollama `reasoning`; a server sending both repeats itself.
    extra = delta.model_extra or {}
    for name in ("reasoning_content", "reasoning"):
        value = extra.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _message_params(messages: Sequence[PromptMessage]) -> list[ChatCompletionMessageParam]:
    return [param for message in messages for param in _message_param(message)]


def _message_param(message: PromptMessage) -> list[ChatCompletionMessageParam]:
    match message.role:
        case "system":
            return [{"role": "system", "content": message.content}]
        case "user" if message.inputs:
            return [{"role": "user", "content": _content_parts(message)}]
        case "user":
            return [{"role": "user", "content": message.content}]
        case "assistant" if message.tool_calls:
            return [
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [_tool_call_param(call) for call in message.tool_calls],
                }
            ]
        case "assistant":
            return [{"role": "assistant", "content": message.content}]
        case "tool":
            # One message per result. The wire has no error flag: an error's text says so.
            return [
                {"role": "tool", "tool_call_id": result.call_id, "content": result.output}
                for result in message.tool_results
            ]


def _tool_call_param(call: PromptToolCall) -> ChatCompletionMessageFunctionToolCallParam:
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.input, ensure_ascii=False)},
    }


def _content_parts(message: PromptMessage) -> list[ChatCompletionContentPartParam]:
    # The text first, as OpenAI's examples have it; a message of inputs alone sends no empty text.
    parts: list[ChatCompletionContentPartParam] = []
    if message.content:
        parts.append({"type": "text", "text": message.content})
    parts.extend(_input_part(item) for item in message.inputs)
    return parts


def _input_part(item: PromptInput) -> ChatCompletionContentPartParam:
    match item:
        case ImageInput():
            return {"type": "image_url", "image_url": {"url": data_url(item.media_type, item.data)}}
        case DocumentInput():
            # Chat Completions takes PDFs inline only (no file URLs); the API extracts the text
            # and renders page images itself.
            return {
                "type": "file",
                "file": {
                    "filename": item.filename,
                    "file_data": data_url(item.media_type, item.data),
                },
            }


def data_url(media_type: str, data: bytes) -> str:
    """An RFC 2397 base64 data URL; the media type is one the input types allow."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _usage(usage: CompletionUsage, *, reported_cost: Decimal | None = None) -> Usage:
    # The SDK does not validate chunks, and some servers send nulls or nothing for these.
    prompt = usage.prompt_tokens_details
    completion = usage.completion_tokens_details
    return Usage(
        input_tokens=_count(usage.prompt_tokens),
        output_tokens=_count(usage.completion_tokens),
        cached_input_tokens=_count(prompt.cached_tokens if prompt else None),
        cache_write_tokens=_count(prompt.cache_write_tokens if prompt else None),
        reasoning_tokens=_count(completion.reasoning_tokens if completion else None),
        reported_cost_usd=reported_cost,
    )


def _groq_usage(chunk: ChatCompletionChunk) -> Usage | None:
    # Groq reports usage in the final chunk's `x_groq.usage` (OpenAI's fields plus timings),
    # which the SDK keeps as an untyped extra.
    x_groq = (chunk.model_extra or {}).get("x_groq")
    raw = x_groq.get("usage") if isinstance(x_groq, Mapping) else None
    if not isinstance(raw, Mapping):
        return None
    return _usage(CompletionUsage.construct(**{str(key): value for key, value in raw.items()}))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _reported_cost(value: object) -> Decimal | None:
    """OpenRouter's `usage.cost` as an exact Decimal, or None when absent or not a cost."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    # From the value's string, never Decimal(float): the JSON number arrived as a float, whose
    # repr is the shortest decimal that reads back as it (0.95 stays 0.95), while the float's
    # exact binary value (0.9499999999999999555910790149937) would be billed.
    try:
        cost = Decimal(str(value))
    except InvalidOperation:
        return None
    return cost if cost.is_finite() and cost >= 0 else None


def _error_detail(body: object) -> str | None:
    # Status errors carry OpenAI's `{"error": {"message": ...}}`, already unwrapped by the SDK.
    # OpenRouter adds `metadata`: which upstream failed, and why moderation flagged the input.
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"]) + _metadata_detail(inner.get("metadata"))
    return None


def _metadata_detail(metadata: object) -> str:
    if not isinstance(metadata, Mapping):
        return ""
    notes = []
    provider = metadata.get("provider_name")
    if isinstance(provider, str) and provider:
        notes.append(f"provider: {provider}")
    reasons = metadata.get("reasons")
    if isinstance(reasons, list) and reasons and all(isinstance(r, str) for r in reasons):
        notes.append(f"reasons: {', '.join(reasons)}")
    return f" ({'; '.join(notes)})" if notes else ""


def _error_code_status(body: object) -> int | None:
    if isinstance(body, Mapping):
        code = body.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
            return code
        if isinstance(code, str) and code.isdigit() and 100 <= int(code) <= 599:
            return int(code)
    return None
