"""Provider contract: request, events, errors. Never imports temporalio/fastapi/sqlalchemy/redis."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from core.errors import ErrorType

# The AI SDK's finishReason vocabulary, so the stream's `finish` chunk needs no second mapping.
FinishReason = Literal["stop", "length", "content-filter", "tool-calls", "error", "other"]


@dataclass(frozen=True)
class PromptMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    model: str  # the model name without its provider prefix
    messages: list[PromptMessage]
    # This provider's entry of the request's providerOptions.
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1  # the Temporal activity attempt, 1-based


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason


# A stream yields deltas in order, then at most one Usage, then exactly one Finish as its last
# event. A stream that fails raises ProviderError instead of yielding Finish.
ProviderEvent = TextDelta | ReasoningDelta | Usage | Finish


class ModelProvider(Protocol):
    name: str

    def models(self) -> list[str]:
        """The model names this provider serves, without the provider prefix."""
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


class UnknownModelError(ValueError):
    """A model reference naming no configured provider or model; the api answers it with a 4xx."""

    def __init__(self, message: str, *, model_ref: str) -> None:
        super().__init__(message)
        self.model_ref = model_ref
