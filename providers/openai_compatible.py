"""OpenAI-compatible chat completions adapter. Never imports temporalio/fastapi/sqlalchemy/redis."""

from __future__ import annotations

import email.utils
import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from providers.base import (
    Finish,
    FinishReason,
    GenerationRequest,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    Usage,
)

# Sent when a provider is configured without a key (Ollama, vLLM, LM Studio): the SDK refuses to
# build a client with no key, and such servers ignore the header.
KEYLESS_API_KEY: Final = "no-key"

_MAX_MESSAGE_CHARS: Final = 600

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
    ) -> None:
        self.name = name
        self._models = list(models)
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

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        params = sampling_params(request.options, provider=self.name)
        usage: Usage | None = None
        finish: FinishReason = "other"  # a server that never sends finish_reason
        try:
            chunks = await self._client.chat.completions.create(
                model=request.model,
                messages=[_message_param(message) for message in request.messages],
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
            if status in (408, 429) or status >= 500:
                return ProviderError.unavailable(
                    message,
                    status_code=status,
                    retry_after=parse_retry_after(error.response.headers),
                )
            return ProviderError.rejected(message, status_code=status)
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
        # Some gateways quote the credential they rejected back in the error message. Truncate
        # only after redacting, so a cut cannot leave part of a key behind; the limit is for
        # proxies in front of the model that answer with a whole HTML page.
        if len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[redacted]")
        return text[:_MAX_MESSAGE_CHARS]


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


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or an HTTP date)."""
    milliseconds = _finite_non_negative(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite_non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; some servers drop the zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _finite_non_negative(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _reasoning_text(delta: ChoiceDelta) -> str | None:
    # Not in OpenAI's schema, so the SDK keeps it in model_extra. DeepSeek and vLLM send
    # `reasoning_content`, OpenRouter and Ollama `reasoning`; a server sending both repeats itself.
    extra = delta.model_extra or {}
    for field in ("reasoning_content", "reasoning"):
        value = extra.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def _message_param(message: PromptMessage) -> ChatCompletionMessageParam:
    match message.role:
        case "system":
            return {"role": "system", "content": message.content}
        case "user":
            return {"role": "user", "content": message.content}
        case "assistant":
            return {"role": "assistant", "content": message.content}


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
