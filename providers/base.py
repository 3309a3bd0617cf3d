"""Provider contract: request, events, errors, configured models. Never imports temporalio/fastapi/sqlalchemy/redis."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final, Literal, Protocol

from core.errors import ErrorType

# The AI SDK's finishReason vocabulary, so the stream's `finish` chunk needs no second mapping.
FinishReason = Literal["stop", "length", "content-filter", "tool-calls", "error", "other"]


class InputKind(StrEnum):
    """A kind of non-text input a model may take."""

    IMAGE = "image"  # PNG/JPEG/GIF/WebP image input
    DOCUMENT = "document"  # a PDF given to the model as a document


# The media types an input may carry: what providers with image or PDF input accept (an adapter
# converts where its provider differs, as Gemini's does for GIF). They are also spelled into data
# URLs, so nothing else may reach an adapter.
IMAGE_MEDIA_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
DOCUMENT_MEDIA_TYPES: Final = frozenset({"application/pdf"})


@dataclass(frozen=True)
class ImageInput:
    media_type: str  # one of IMAGE_MEDIA_TYPES, sniffed from the bytes rather than trusted
    data: bytes = field(repr=False)  # megabytes; never in a repr, a log line or an error
    filename: str | None = None

    def __post_init__(self) -> None:
        if self.media_type not in IMAGE_MEDIA_TYPES:
            raise ValueError(
                f"image media type {self.media_type!r} is not one of {_listed(IMAGE_MEDIA_TYPES)}"
            )

    @property
    def kind(self) -> InputKind:
        return InputKind.IMAGE


@dataclass(frozen=True)
class DocumentInput:
    media_type: str  # one of DOCUMENT_MEDIA_TYPES
    data: bytes = field(repr=False)
    filename: str  # providers show it to the model, and some require it

    def __post_init__(self) -> None:
        if self.media_type not in DOCUMENT_MEDIA_TYPES:
            raise ValueError(
                f"document media type {self.media_type!r} is not one of {_listed(DOCUMENT_MEDIA_TYPES)}"
            )

    @property
    def kind(self) -> InputKind:
        return InputKind.DOCUMENT


PromptInput = ImageInput | DocumentInput


@dataclass(frozen=True)
class ToolDefinition:
    """A tool offered to the model: its name, what it does, and a JSON Schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class PromptToolCall:
    """A tool call the model made earlier in the conversation (on an assistant message)."""

    call_id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class PromptToolResult:
    """The outcome of an earlier tool call, as the model reads it back (a `tool` message)."""

    call_id: str
    name: str
    output: str  # already cut to the context's size budget
    is_error: bool = False


@dataclass(frozen=True)
class PromptMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    # Only user messages carry inputs; an adapter places them after the text, in this order.
    inputs: tuple[PromptInput, ...] = ()
    # Only assistant messages carry tool calls, after their text.
    tool_calls: tuple[PromptToolCall, ...] = ()
    # Only `tool` messages carry results (and no content): one message per step, holding every
    # result of that step's calls in call order. Adapters whose provider wants one message per
    # result (OpenAI, Ollama) split it; Anthropic and Gemini send them together.
    tool_results: tuple[PromptToolResult, ...] = ()

    def __post_init__(self) -> None:
        if self.inputs and self.role != "user":
            raise ValueError(f"only user messages carry inputs, not {self.role} messages")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool calls, not {self.role} messages")
        if (self.role == "tool") != bool(self.tool_results):
            raise ValueError("tool results go in `tool` messages, and only there")


# About four characters a token, the usual rule of thumb for BPE tokenizers on English text: what
# durachat counts where a provider reported no usage, and what sizes prompts before any call.
CHARS_PER_TOKEN: Final = 4


def estimated_tokens(chars: int) -> int:
    """The tokens `chars` characters of text are estimated to make (never downloads a tokenizer)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def input_kinds_of(messages: Iterable[PromptMessage]) -> frozenset[InputKind]:
    """Every kind of non-text input the messages carry."""
    return frozenset(item.kind for message in messages for item in message.inputs)


def input_kinds_by_model(
    models: Iterable[str], image_models: Iterable[str] | None, document_models: Iterable[str]
) -> dict[str, frozenset[InputKind]]:
    """The input kinds each of `models` takes, read as ProviderEntry has them: no image list
    means every model takes images, and only the models named take documents."""
    models = list(models)
    takes: dict[InputKind, set[str]] = {
        InputKind.IMAGE: set(models if image_models is None else image_models),
        InputKind.DOCUMENT: set(document_models),
    }
    return {
        model: frozenset(kind for kind, takers in takes.items() if model in takers)
        for model in models
    }


@dataclass(frozen=True)
class GenerationRequest:
    model: str  # the model name without its provider prefix
    messages: list[PromptMessage]
    # This provider's entry of the request's providerOptions.
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1  # the Temporal activity attempt, 1-based
    # Tools the model may call (choice left to the model); none means a plain answer.
    tools: tuple[ToolDefinition, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """What the provider billed for one call, as it reported it."""

    input_tokens: int  # every prompt token, including those read from or written to a cache
    output_tokens: int  # every completion token, reasoning tokens included
    cached_input_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to the prompt cache
    reasoning_tokens: int = 0  # of output_tokens, spent on reasoning
    # The charge the provider itself reported (OpenRouter's `usage.cost`), in USD; most report none.
    reported_cost_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """The model began a tool call; its input follows as ToolCallDelta pieces, if streamed."""

    call_id: str  # the provider's id, or one the adapter made when the provider gives none
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    call_id: str
    input_text: str  # a piece of the call's JSON input text


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call. `input` is the parsed JSON object, or None when the model's input
    text was not a JSON object (the call then fails without running; `input_text` keeps it)."""

    call_id: str
    name: str
    input: dict[str, Any] | None
    input_text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason


# A stream yields deltas in order, then at most one Usage, then exactly one Finish as its last
# event. Each tool call is a ToolCallStart, any ToolCallDeltas, then its ToolCall, before Finish;
# a stream with tool calls finishes with "tool-calls". A stream that fails raises ProviderError
# instead of yielding Finish.
ProviderEvent = (
    TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | ToolCall | Usage | Finish
)


def parse_tool_input(text: str) -> dict[str, Any] | None:
    """A tool call's input text as a JSON object; None when it is not one. Empty text is `{}`
    (models call tools without parameters that way)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class ModelProvider(Protocol):
    name: str

    def models(self) -> list[str]:
        """The model names this provider serves, without the provider prefix."""
        ...

    def input_kinds(self, model: str) -> frozenset[InputKind]:
        """The non-text inputs `model` (a bare name, without the provider prefix) takes.

        A request carrying any other kind fails with PROVIDER_REJECTED before anything is sent.
        """
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Generate a reply as events.

        Closing the generator (`aclose`, or `contextlib.aclosing`) closes the underlying HTTP stream
        before it returns: that is how a stop cancels generation at the provider.
        """
        ...

    async def aclose(self) -> None:
        """Release connection pools; the provider is unusable afterwards."""
        ...


class ConfiguredModels:
    """`models` and `input_kinds` of ModelProvider, for an adapter configured with a model list.

    Every adapter built from a ProviderEntry inherits these, so the entry's lists mean the same
    to each of them.
    """

    def __init__(
        self,
        models: Sequence[str],
        *,
        image_models: Sequence[str] | None,
        document_models: Sequence[str],
    ) -> None:
        self._models = list(models)
        self._input_kinds = input_kinds_by_model(self._models, image_models, document_models)

    def models(self) -> list[str]:
        return list(self._models)

    def input_kinds(self, model: str) -> frozenset[InputKind]:
        return self._input_kinds.get(model, frozenset())


# Sent as the key of a provider configured without one (a gateway or a server on the local
# network). Given no key at all, each SDK either refuses to send a request or takes a key from
# its environment variables and sends it to whatever endpoint is configured.
KEYLESS_API_KEY: Final = "no-key"


class ProviderError(Exception):
    """A generation that failed at the provider; `error_type` becomes the ApplicationError type.

    Messages are safe to show users and to keep in workflow history: they never hold credentials.
    """

    # Re-exported from core so the api, workflows and providers share one vocabulary.
    PROVIDER_REJECTED: Final = ErrorType.PROVIDER_REJECTED
    """The request itself is wrong (bad options, auth, unknown model): retrying cannot help."""
    PROVIDER_UNAVAILABLE: Final = ErrorType.PROVIDER_UNAVAILABLE
    """Rate limits, server errors, timeouts and broken connections: a later attempt may succeed."""

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        self.retry_after = retry_after  # seconds the provider asked us to wait, if it said

    @property
    def retryable(self) -> bool:
        # Derived, not stored, so an error's type and its retry behaviour can never disagree.
        return self.error_type != self.PROVIDER_REJECTED

    @classmethod
    def rejected(cls, message: str, *, status_code: int | None = None) -> ProviderError:
        return cls(message, error_type=cls.PROVIDER_REJECTED, status_code=status_code)

    @classmethod
    def unavailable(
        cls, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> ProviderError:
        return cls(
            message,
            error_type=cls.PROVIDER_UNAVAILABLE,
            status_code=status_code,
            retry_after=retry_after,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, error_type={self.error_type!r}, "
            f"status_code={self.status_code!r}, retry_after={self.retry_after!r})"
        )


def refuse_unaccepted_inputs(
    provider: str, request: GenerationRequest, accepted: frozenset[InputKind]
) -> None:
    """Raise PROVIDER_REJECTED when the request carries inputs its model does not take.

    The api checks this before a turn starts; this is the adapters' guard against a caller that
    did not, so unsupported bytes are never sent, nor silently dropped.
    """
    refused = input_kinds_of(request.messages) - accepted
    if refused:
        kinds = " or ".join(sorted(f"{kind} inputs" for kind in refused))
        raise ProviderError.rejected(f"{provider}/{request.model} does not take {kinds}")


class UnknownModelError(ValueError):
    """A model reference naming no configured provider or model; the api answers it with a 4xx."""

    def __init__(self, message: str, *, model_ref: str) -> None:
        super().__init__(message)
        self.model_ref = model_ref


def _listed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
