"""Anthropic Messages API adapter, streamed. Never imports temporalio/fastapi/sqlalchemy/redis.

Tools go out as custom tools with `tool_choice: {"type": "auto"}`. A call streams as a `tool_use`
content block: its start names it, `input_json_delta` pieces of its input's JSON text become
ToolCallDeltas, and its `content_block_stop` completes it. In a prompt, a step's calls are
`tool_use` blocks of the assistant message, and its results `tool_result` blocks of the user
message after it, ahead of anything the user said next (the API wants them first, in a message of
their own role).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import anthropic
import httpx2
from anthropic import Omit, omit
from anthropic import types as wire

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
from providers.endpoints import ANTHROPIC_BASE_URL
from providers.failures import (
    connection_failed,
    parse_retry_after,
    scrub,
    status_failure,
    timed_out,
)
from providers.options import ProviderOptions, is_positive_integer, is_strings, object_of

DEFAULT_BASE_URL: Final = ANTHROPIC_BASE_URL

# The API requires max_tokens and has no default. 8192 is an output every current Claude model
# allows and a long answer fits in; callers wanting more (the newest models allow 128k) say so in
# providerOptions. Extended thinking spends its budget out of max_tokens, so a thinking budget
# given without max_tokens is added on top rather than eating the answer.
DEFAULT_MAX_TOKENS: Final = 8192

_INLINE_ENCODE_BYTES: Final = 1_000_000

_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool-calls",
    "refusal": "content-filter",
}

# `error.type` values of an error event inside a 200 stream that a later attempt may get past. Any
# other type (invalid_request_error, authentication_error, billing_error, ...) will fail again.
_RETRYABLE_ERROR_TYPES: Final = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)

_EFFORTS: Final = ("low", "medium", "high", "xhigh", "max")
_THINKING_DISPLAYS: Final = ("summarized", "omitted")
_THINKING_KEYS: Final = frozenset({"type", "budgetTokens", "budget_tokens", "display"})

# providerOptions come from API callers, so only these pass, each checked: anything else could
# change the wire contract this adapter parses (`stream`, `tools`) or bill differently
# (`service_tier`, `speed`). temperature, top_p and top_k are left out on purpose: API version
# 2026-10-21, which SDK 2.x sends, answers any of them with 400. AI SDK clients spell options in
# camelCase; the snake_case wire names are accepted too.
_MAX_TOKENS_KEYS: Final = ("maxTokens", "max_tokens")
_STOP_SEQUENCES_KEYS: Final = ("stopSequences", "stop_sequences")


@dataclass(frozen=True)
class MessageOptions:
    """The allow-listed providerOptions, as Messages API parameters."""

    max_tokens: int
    thinking: wire.ThinkingConfigParam | Omit = omit
    stop_sequences: list[str] | Omit = omit
    output_config: wire.OutputConfigParam | Omit = omit


class AnthropicProvider(ConfiguredModels):
    """One configured endpoint speaking Anthropic's Messages API, streamed."""

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
        # Every setting is passed explicitly: given a key and a base URL, the SDK reads none of
        # ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN, ANTHROPIC_BASE_URL or a credentials profile.
        # An empty key would make it fall back to ANTHROPIC_API_KEY.
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or KEYLESS_API_KEY,
            base_url=base_url,
            # Temporal owns retries: every attempt is then visible in the workflow history, and a
            # retried stream tells clients to drop the failed attempt's output first.
            max_retries=0,
            timeout=timeout_seconds,
            # Given an option, the SDK ignores ANTHROPIC_OPEN_TELEMETRY_*, one of which would copy
            # prompts into spans; durachat exports no traces, and sends no trace context outside.
            open_telemetry={"traces": False, "propagation": False},
        )
        # ANTHROPIC_CUSTOM_HEADERS is merged into every request with no constructor argument to
        # refuse it; it could carry another credential, or override ours, to whatever endpoint is
        # configured. Settings are the only configuration.
        self._client._custom_headers = {}

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        options = message_options(request.options, provider=self.name)
        refuse_unaccepted_inputs(self.name, request, self.input_kinds(request.model))
        # Built once, before the call: inputs are base64-encoded here and nowhere else. Encoding
        # 20 MB takes about 0.1 s, so large inputs are encoded off the event loop.
        input_bytes = sum(len(item.data) for m in request.messages for item in m.inputs)
        if input_bytes > _INLINE_ENCODE_BYTES:
            system, messages = await asyncio.to_thread(_conversation, request.messages)
        else:
            system, messages = _conversation(request.messages)
        tools: list[wire.ToolUnionParam] | Omit = omit
        tool_choice: wire.ToolChoiceParam | Omit = omit
        if request.tools:
            tools, tool_choice = [_tool_param(tool) for tool in request.tools], {"type": "auto"}
        where = f"{self.name}/{request.model}"
        reader = _MessageReader()
        try:
            events = await self._client.messages.create(
                model=request.model,
                max_tokens=options.max_tokens,
                messages=messages,
                system=system,
                stop_sequences=options.stop_sequences,
                thinking=options.thinking,
                output_config=options.output_config,
                tools=tools,
                tool_choice=tool_choice,
                stream=True,
            )
            # Leaving this block any way (end, error, aclose of this generator, task
            # cancellation) closes the HTTP response, so the server stops generating.
            async with events:
                async for event in events:
                    for provider_event in reader.read(event):
                        yield provider_event
        # `from None` on each: SDK and transport messages can echo request details, and a chained
        # cause would travel into workflow history; only the scrubbed translation leaves here.
        except anthropic.APIError as error:
            raise self._translate(error, where) from None
        except httpx2.TimeoutException:
            # Raised bare by the SDK once the stream has started (it wraps only the opening call).
            raise timed_out(where) from None
        except httpx2.RequestError as error:
            raise connection_failed(where, error, secret=self._api_key) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProviderError.unavailable(f"{where}: malformed event in the stream") from None
        if not reader.stopped:
            # Anthropic always ends a message with message_stop: without it the answer is cut
            # short (a proxy closed the stream), and a later attempt may get all of it.
            raise ProviderError.unavailable(f"{where}: the stream ended before message_stop")
        # Every block stops before message_stop; a gateway that skipped a stop loses no call.
        for provider_event in reader.complete_calls():
            yield provider_event
        usage = reader.usage()
        if usage is not None:
            yield usage
        yield Finish(reader.finish)

    async def aclose(self) -> None:
        await self._client.close()

    def _translate(self, error: anthropic.APIError, where: str) -> ProviderError:
        if isinstance(error, anthropic.APIStatusError):
            detail = error.api_message or error.message
            if error.request_id:
                detail = f"{detail} (request-id {error.request_id})"
            status = error.status_code
            if 200 <= status < 300:
                return self._stream_error_failure(error.type, detail, where)
            message = self._scrub(f"{where}: HTTP {status}: {detail}")
            return status_failure(
                message, status, retry_after=parse_retry_after(error.response.headers)
            )
        if isinstance(error, anthropic.APITimeoutError):
            return timed_out(where)
        if isinstance(error, anthropic.APIConnectionError):
            cause = error.__cause__
            return connection_failed(
                where, cause if cause is not None else error.message, secret=self._api_key
            )
        return ProviderError.unavailable(self._scrub(f"{where}: {error.message}"))

    def _stream_error_failure(
        self, error_type: str | None, detail: str, where: str
    ) -> ProviderError:
        # An `event: error` inside a 200 stream: the SDK raises it with the stream's status, 200,
        # so only the body's `error.type` tells an overload from a request the API refuses.
        # An error event without a readable type says nothing against the request itself: it is
        # treated like a broken stream.
        message = self._scrub(f"{where}: error in stream: {error_type or 'unknown'}: {detail}")
        if error_type is None or error_type in _RETRYABLE_ERROR_TYPES:
            return ProviderError.unavailable(message)
        return ProviderError.rejected(message)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


@dataclass
class _StreamedCall:
    call_id: str
    name: str
    pieces: list[str] = field(default_factory=list)  # the input's JSON text so far


class _MessageReader:
    """Turns one streamed message's events into provider events, and keeps its usage and stop
    reason.

    The SDK builds events without validating them: an event type it does not know arrives as some
    other event class with that `type`, and absent fields are None whatever their annotation. So
    events are told apart by `type`, and every count is checked before it is used.
    """

    def __init__(self) -> None:
        self._finish: FinishReason = "other"  # a message_delta without a stop_reason
        self.stopped = False
        self._counts: dict[str, int] = {}
        self._calls: dict[int, _StreamedCall] = {}  # the open tool_use blocks, by block index
        self._made_calls = False

    @property
    def finish(self) -> FinishReason:
        # A gateway that ends a tool-using message with end_turn still asks for the calls.
        if self._made_calls and self._finish == "stop":
            return "tool-calls"
        return self._finish

    def read(self, event: wire.RawMessageStreamEvent) -> Iterator[ProviderEvent]:
        match event.type:
            case "content_block_delta" if isinstance(event, wire.RawContentBlockDeltaEvent):
                call = self._calls.get(event.index)
                if call is not None:
                    yield from _input_delta(call, event.delta)
                elif (delta := _delta_event(event.delta)) is not None:
                    yield delta
            case "content_block_start" if isinstance(event, wire.RawContentBlockStartEvent):
                yield from self._block_start(event.index, event.content_block)
            case "content_block_stop" if isinstance(event, wire.RawContentBlockStopEvent):
                call = self._calls.pop(event.index, None)
                if call is not None:
                    yield self._complete(call)
            case "message_start" if isinstance(event, wire.RawMessageStartEvent):
                self._count(getattr(event.message, "usage", None))
            case "message_delta" if isinstance(event, wire.RawMessageDeltaEvent):
                self._count(event.usage)
                reason = getattr(event.delta, "stop_reason", None)
                if isinstance(reason, str):
                    self._finish = _FINISH_REASONS.get(reason, "other")
            case "message_stop":
                self.stopped = True

    def complete_calls(self) -> Iterator[ToolCall]:
        """The tool calls whose blocks never stopped, completed as they are."""
        for index in sorted(self._calls):
            yield self._complete(self._calls[index])
        self._calls.clear()

    def _block_start(self, index: int, block: object) -> Iterator[ProviderEvent]:
        if getattr(block, "type", None) != "tool_use":
            # Anthropic starts blocks empty; some compatible gateways put the first text here.
            if (event := _block_start_event(block)) is not None:
                yield event
            return
        call_id, name = getattr(block, "id", None), getattr(block, "name", None)
        call = _StreamedCall(
            call_id if isinstance(call_id, str) and call_id else _call_id(), str(name or "")
        )
        self._calls[index] = call
        yield ToolCallStart(call.call_id, call.name)
        # Anthropic starts the input empty and streams it; a gateway may send it whole here.
        start_input = getattr(block, "input", None)
        if isinstance(start_input, dict) and start_input:
            text = json.dumps(start_input, ensure_ascii=False)
            call.pieces.append(text)
            yield ToolCallDelta(call.call_id, text)

    def _complete(self, call: _StreamedCall) -> ToolCall:
        self._made_calls = True
        text = "".join(call.pieces)
        return ToolCall(call.call_id, call.name, parse_tool_input(text), text)

    def _count(self, usage: object) -> None:
        # message_delta repeats the counts so far rather than adding to them, so each overwrites.
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ):
            value = _count_of(getattr(usage, name, None))
            if value is not None:
                self._counts[name] = value
        details = getattr(usage, "output_tokens_details", None)
        thinking = _count_of(getattr(details, "thinking_tokens", None))
        if thinking is not None:
            self._counts["thinking_tokens"] = thinking

    def usage(self) -> Usage | None:
        if not self._counts:
            return None
        cache_read = self._counts.get("cache_read_input_tokens", 0)
        cache_write = self._counts.get("cache_creation_input_tokens", 0)
        return Usage(
            # Anthropic's input_tokens leaves out the cached part; ours counts every prompt token.
            input_tokens=self._counts.get("input_tokens", 0) + cache_read + cache_write,
            output_tokens=self._counts.get("output_tokens", 0),
            cached_input_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=self._counts.get("thinking_tokens", 0),
        )


def _call_id() -> str:
    # For a gateway sending a tool_use block without an id.
    return f"call_{uuid.uuid4().hex}"


def _input_delta(call: _StreamedCall, delta: wire.RawContentBlockDelta) -> Iterator[ToolCallDelta]:
    # The first piece is often empty, which tells a client nothing.
    if delta.type == "input_json_delta" and (
        text := _text_of(getattr(delta, "partial_json", None))
    ):
        call.pieces.append(text)
        yield ToolCallDelta(call.call_id, text)


def _delta_event(delta: wire.RawContentBlockDelta) -> TextDelta | ReasoningDelta | None:
    # Signatures and citations have no place in the event contract.
    match delta.type:
        case "text_delta" if text := _text_of(getattr(delta, "text", None)):
            return TextDelta(text)
        case "thinking_delta" if thinking := _text_of(getattr(delta, "thinking", None)):
            return ReasoningDelta(thinking)
    return None


def _block_start_event(block: object) -> TextDelta | ReasoningDelta | None:
    match getattr(block, "type", None):
        case "text" if text := _text_of(getattr(block, "text", None)):
            return TextDelta(text)
        case "thinking" if thinking := _text_of(getattr(block, "thinking", None)):
            return ReasoningDelta(thinking)
    return None


def _text_of(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _count_of(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def message_options(options: Mapping[str, Any], *, provider: str) -> MessageOptions:
    """The allow-listed providerOptions as Messages API parameters; rejects ill-typed values."""
    read = ProviderOptions(options, provider)
    thinking: wire.ThinkingConfigParam | Omit = omit
    budget = 0
    if (found := read.given("thinking")) is not None:
        thinking, budget = _thinking(found[1], read.path("thinking"))
    max_tokens = read.checked(_MAX_TOKENS_KEYS, is_positive_integer, "a positive integer")
    stop_sequences = read.checked(_STOP_SEQUENCES_KEYS, is_strings, "a list of strings")
    effort = read.checked(
        ("effort",), lambda value: value in _EFFORTS, f"one of {', '.join(_EFFORTS)}"
    )
    output_config: wire.OutputConfigParam | Omit = omit
    if effort is not None:
        output_config = {"effort": effort}
    return MessageOptions(
        max_tokens=DEFAULT_MAX_TOKENS + budget if max_tokens is None else max_tokens,
        thinking=thinking,
        stop_sequences=omit if stop_sequences is None else list(stop_sequences),
        output_config=output_config,
    )


def _thinking(option: object, where: str) -> tuple[wire.ThinkingConfigParam, int]:
    """Anthropic's `thinking` from the AI SDK's spelling (or the wire's), and its token budget."""
    value = object_of(option, where, _THINKING_KEYS)
    raw_budget = value.get("budgetTokens", value.get("budget_tokens"))
    budget = _count_of(raw_budget)
    display = value.get("display")
    if display is not None and display not in _THINKING_DISPLAYS:
        raise ProviderError.rejected(f"{where}.display must be summarized or omitted")
    shown = cast(Literal["summarized", "omitted"] | None, display)
    match value.get("type"):
        case "enabled":
            if not budget:
                raise ProviderError.rejected(f"{where}.budgetTokens must be a positive integer")
            enabled: wire.ThinkingConfigEnabledParam = {"type": "enabled", "budget_tokens": budget}
            if shown is not None:
                enabled["display"] = shown
            return enabled, budget
        case "adaptive" if raw_budget is None:
            adaptive: wire.ThinkingConfigAdaptiveParam = {"type": "adaptive"}
            if shown is not None:
                adaptive["display"] = shown
            return adaptive, 0
        case "disabled" if raw_budget is None and shown is None:
            return {"type": "disabled"}, 0
        case "adaptive" | "disabled":
            raise ProviderError.rejected(f"{where} takes a budget or display only when enabled")
    raise ProviderError.rejected(f"{where}.type must be enabled, adaptive or disabled")


def _conversation(
    messages: Sequence[PromptMessage],
) -> tuple[str | list[wire.TextBlockParam] | Omit, list[wire.MessageParam]]:
    """The Messages API's `system` and `messages` for a prompt."""
    system = [message.content for message in messages if message.role == "system"]
    system = [text for text in system if text]
    conversation: list[wire.MessageParam] = []
    for message in messages:
        match message.role:
            case "user" if message.inputs:
                _add_user(conversation, _content_blocks(message))
            # The API refuses empty text, and a message with nothing in it tells the model
            # nothing: a stopped turn can leave an empty assistant message in the history.
            case "user" if message.content:
                _add_user(conversation, message.content)
            case "assistant" if message.tool_calls:
                conversation.append({"role": "assistant", "content": _tool_use_blocks(message)})
            case "assistant" if message.content:
                conversation.append({"role": "assistant", "content": message.content})
            case "tool":
                results = [_tool_result(result) for result in message.tool_results]
                conversation.append({"role": "user", "content": results})
    if not system:
        return omit, conversation
    if len(system) == 1:
        return system[0], conversation
    return [{"type": "text", "text": text} for text in system], conversation


def _add_user(
    conversation: list[wire.MessageParam], content: str | list[wire.ContentBlockParam]
) -> None:
    last = conversation[-1] if conversation else None
    if last is None or last["role"] != "user" or not _holds_results(last):
        conversation.append({"role": "user", "content": content})
        return
    # Tool results and what the user said next make one user message, the results first: the
    # API wants user and assistant messages to alternate.
    blocks: list[wire.ContentBlockParam] = (
        [{"type": "text", "text": content}] if isinstance(content, str) else content
    )
    cast(list[wire.ContentBlockParam], last["content"]).extend(blocks)


def _holds_results(message: wire.MessageParam) -> bool:
    content = message["content"]
    return not isinstance(content, str) and any(
        block.get("type") == "tool_result" for block in cast(list[dict[str, Any]], content)
    )


def _tool_param(tool: ToolDefinition) -> wire.ToolParam:
    return {
        "name": tool.name,
        "description": tool.description,
        # The SDK's type is a TypedDict of `type`, `properties` and `required`; the API takes any
        # JSON Schema of an object.
        "input_schema": cast(wire.tool_param.InputSchema, tool.input_schema),
    }


def _tool_use_blocks(message: PromptMessage) -> list[wire.ContentBlockParam]:
    # The text first, as Claude writes it, then a block per call in the order they were made.
    blocks: list[wire.ContentBlockParam] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks.extend(
        {"type": "tool_use", "id": call.call_id, "name": call.name, "input": call.input}
        for call in message.tool_calls
    )
    return blocks


def _tool_result(result: PromptToolResult) -> wire.ToolResultBlockParam:
    block: wire.ToolResultBlockParam = {"type": "tool_result", "tool_use_id": result.call_id}
    # Empty text is refused; a result without content is one that said nothing.
    if result.output:
        block["content"] = result.output
    if result.is_error:
        block["is_error"] = True
    return block


def _content_blocks(message: PromptMessage) -> list[wire.ContentBlockParam]:
    # The text first, then the inputs in order; a message of inputs alone sends no empty text,
    # which the API would refuse.
    blocks: list[wire.ContentBlockParam] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks.extend(_input_block(item) for item in message.inputs)
    return blocks


def _input_block(item: PromptInput) -> wire.ContentBlockParam:
    data = base64.b64encode(item.data).decode("ascii")
    match item:
        case ImageInput():
            # ImageInput admits only the four media types the API takes.
            media_type = cast(
                Literal["image/jpeg", "image/png", "image/gif", "image/webp"], item.media_type
            )
            return {
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data},
            }
        case DocumentInput():
            # The title is shown to the model, so it can tell the user's files apart.
            return {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": data},
                "title": item.filename,
            }
