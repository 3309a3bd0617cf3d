"""OpenAI-compatible chat completions adapter. Never imports temporalio/fastapi/sqlalchemy/redis."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, Final

import openai
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from providers.base import (
    DocumentInput,
    Finish,
    FinishReason,
    GenerationRequest,
    ImageInput,
    InputKind,
    PromptInput,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    Usage,
    refuse_unaccepted_inputs,
)
from providers.failures import parse_retry_after, scrub, status_failure

# Sent when a provider is configured without a key (Ollama, vLLM, LM Studio): the SDK refuses to
# build a client with no key, and such servers ignore the header.
KEYLESS_API_KEY: Final = "no-key"

_INLINE_ENCODE_BYTES: Final = 1_000_000

_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(value: object) -> bool:
    return isinstance(value, str)


def _stop(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


# providerOptions come from API callers, so only sampling knobs pass through: anything else
# (`stream`, `n`, `tools`, `logit_bias`, ...) could change the wire contract this adapter parses.
# AI SDK clients spell options in camelCase; the snake_case wire names are accepted too.
_OPTIONS: Final[Mapping[str, tuple[str, Callable[[object], bool], str]]] = {
    option: (wire, check, expected)
    for wire, camel, check, expected in (
        ("temperature", "temperature", _number, "a number"),
        ("top_p", "topP", _number, "a number"),
        ("max_tokens", "maxTokens", _integer, "an integer"),
        ("max_completion_tokens", "maxCompletionTokens", _integer, "an integer"),
        ("presence_penalty", "presencePenalty", _number, "a number"),
        ("frequency_penalty", "frequencyPenalty", _number, "a number"),
        ("seed", "seed", _integer, "an integer"),
        ("stop", "stop", _stop, "a string or a list of strings"),
        ("reasoning_effort", "reasoningEffort", _string, "a string"),
        ("user", "user", _string, "a string"),
    )
    for option in (wire, camel)
}


class OpenAICompatibleProvider:
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
    ) -> None:
        self.name = name
        self._models = list(models)
        # ProviderEntry semantics: no image list means every model takes images.
        takes_images = set(self._models if image_models is None else image_models)
        takes_documents = set(document_models)
        self._input_kinds = {
            model: frozenset(
                kind
                for kind, takes in (
                    (InputKind.IMAGE, takes_images),
                    (InputKind.DOCUMENT, takes_documents),
                )
                if model in takes
            )
            for model in self._models
        }
        self._api_key = api_key
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
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

    def models(self) -> list[str]:
        return list(self._models)

    def input_kinds(self, model: str) -> frozenset[InputKind]:
        return self._input_kinds.get(model, frozenset())

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
        usage: Usage | None = None
        finish: FinishReason = "other"  # a server that never sends finish_reason
        try:
            chunks = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **params,
            )
            # Leaving this block any way (end, error, aclose of this generator, task
            # cancellation) closes the HTTP response, so the server stops generating.
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        # `or 0`: the SDK does not validate, and some servers send nulls here.
                        usage = Usage(
                            input_tokens=chunk.usage.prompt_tokens or 0,
                            output_tokens=chunk.usage.completion_tokens or 0,
                        )
                    for choice in chunk.choices:
                        if choice.index != 0:  # we never ask for n > 1
                            continue
                        reasoning = _reasoning_text(choice.delta)
                        if reasoning:
                            yield ReasoningDelta(reasoning)
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
                        if choice.finish_reason is not None:
                            finish = _FINISH_REASONS.get(choice.finish_reason, "other")
        except openai.APIError as error:
            # `from None`: SDK messages can echo request details, and a chained cause would
            # travel into workflow history; only the scrubbed translation leaves this module.
            raise self._translate(error, request.model) from None
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
                message, status, retry_after=parse_retry_after(error.response.headers)
            )
        if isinstance(error, openai.APITimeoutError):
            return ProviderError.unavailable(f"{where}: request timed out")
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else error.message
            return ProviderError.unavailable(self._scrub(f"{where}: connection failed: {reason}"))
        # An error event inside a 200 stream (OpenRouter and others relay upstream failures this
        # way). Its `code` is sometimes an HTTP status; a 4xx one means retrying cannot help.
        message = self._scrub(f"{where}: error in stream: {error.message}")
        code = _error_code_status(error.body)
        if code is not None and 400 <= code < 500 and code not in (408, 429):
            return ProviderError.rejected(message, status_code=code)
        return ProviderError.unavailable(message, status_code=code)

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


def sampling_params(options: Mapping[str, Any], *, provider: str) -> dict[str, Any]:
    """The allow-listed providerOptions as chat completions parameters; rejects ill-typed values."""
    params: dict[str, Any] = {}
    for key, value in options.items():
        spec = _OPTIONS.get(key)
        if spec is None or value is None:
            continue
        wire, check, expected = spec
        if not check(value):
            raise ProviderError.rejected(f"providerOptions.{provider}.{key} must be {expected}")
        params[wire] = value
    return params


def _reasoning_text(delta: ChoiceDelta) -> str | None:
    # Not in OpenAI's schema, so the SDK keeps it in model_extra. DeepSeek and vLLM send
    # `reasoning_content`, OpenRouter and Ollama `reasoning`; a server sending both repeats itself.
    extra = delta.model_extra or {}
    for field in ("reasoning_content", "reasoning"):
        value = extra.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def _message_params(messages: Sequence[PromptMessage]) -> list[ChatCompletionMessageParam]:
    return [_message_param(message) for message in messages]


def _message_param(message: PromptMessage) -> ChatCompletionMessageParam:
    match message.role:
        case "system":
            return {"role": "system", "content": message.content}
        case "user" if message.inputs:
            return {"role": "user", "content": _content_parts(message)}
        case "user":
            return {"role": "user", "content": message.content}
        case "assistant":
            return {"role": "assistant", "content": message.content}


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


def _error_detail(body: object) -> str | None:
    # Status errors carry OpenAI's `{"error": {"message": ...}}`, already unwrapped by the SDK.
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return None


def _error_code_status(body: object) -> int | None:
    if isinstance(body, Mapping):
        code = body.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
            return code
        if isinstance(code, str) and code.isdigit() and 100 <= int(code) <= 599:
            return int(code)
    return None
