"""Built-in `local` provider, offline. Never imports temporalio, fastapi, sqlalchemy or redis."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from providers.base import (
    DocumentInput,
    Finish,
    GenerationRequest,
    ImageInput,
    InputKind,
    PromptInput,
    ProviderError,
    ProviderEvent,
    TextDelta,
    Usage,
    refuse_unaccepted_inputs,
)
from providers.options import ProviderOptions, is_integer, is_number

LOCAL_PROVIDER_NAME: Final = "local"
ECHO_MODEL: Final = "echo"
LOREM_MODEL: Final = "lorem"

# Each piece owns the whitespace after its word (and the first piece any leading whitespace), so
# the pieces concatenate back to the exact text. A whitespace-only text is one piece.
_PIECE = re.compile(r"\s*\S+\s*|\s+\Z")

_LOREM_TEXT: Final = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur sint occaecat cupidatat "
    "non proident sunt in culpa qui officia deserunt mollit anim id est laborum"
)
_LOREM_WORDS: Final = tuple(_LOREM_TEXT.split())

# echo reports the inputs it was given, so end-to-end tests see what reached the model.
_INPUT_KINDS: Final[Mapping[str, frozenset[InputKind]]] = {
    ECHO_MODEL: frozenset(InputKind),
    LOREM_MODEL: frozenset(),
}

_DEFAULT_LOREM_WORDS: Final = 50
_DEFAULT_DELAY_MS: Final = 20
# providerOptions come from API callers, so bound what one request can make a worker do.
_MAX_WORDS: Final = 10_000
_MAX_DELAY_MS: Final = 10_000


@dataclass(frozen=True)
class LocalOptions:
    """The `local` entry of providerOptions, validated."""

    words: int | None = None
    delay_ms: float = _DEFAULT_DELAY_MS
    fail_after_words: int | None = None  # None: no failure injected
    fail_times: int | None = None  # None: fail on every attempt
    fail_retryable: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> LocalOptions:
        read = ProviderOptions(options, LOCAL_PROVIDER_NAME)
        fail_after_words = _count_option(read, "failAfterWords", maximum=_MAX_WORDS)
        fail_times = _count_option(read, "failTimes", maximum=1_000)
        if fail_after_words is None and fail_times is not None:
            # failTimes alone still asks for a failure: fail before the first word.
            fail_after_words = 0
        # Unlike the counts, these two refuse an explicit null.
        delay_ms = options.get("delayMs", _DEFAULT_DELAY_MS)
        if not is_number(delay_ms) or not 0 <= delay_ms <= _MAX_DELAY_MS:
            raise read.refuse("delayMs", f"a number of milliseconds from 0 to {_MAX_DELAY_MS}")
        fail_retryable = options.get("failRetryable", True)
        if not isinstance(fail_retryable, bool):
            raise read.refuse("failRetryable", "a boolean")
        return cls(
            words=_count_option(read, "words", maximum=_MAX_WORDS),
            delay_ms=float(delay_ms),
            fail_after_words=fail_after_words,
            fail_times=fail_times,
            fail_retryable=fail_retryable,
        )

    def fails_on(self, attempt: int) -> bool:
        if self.fail_after_words is None:
            return False
        return self.fail_times is None or attempt <= self.fail_times


class LocalProvider:
    """Streams text produced in-process, paced like a model, with injectable failures for tests."""

    name = LOCAL_PROVIDER_NAME

    def models(self) -> list[str]:
        return list(_INPUT_KINDS)

    def input_kinds(self, model: str) -> frozenset[InputKind]:
        return _INPUT_KINDS.get(model, frozenset())

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        options = LocalOptions.parse(request.options)
        if request.model not in _INPUT_KINDS:
            raise ProviderError.rejected(f"local has no model {request.model!r}")
        refuse_unaccepted_inputs(self.name, request, self.input_kinds(request.model))
        if request.model == ECHO_MODEL:
            pieces = echo_pieces(request)
        else:
            pieces = lorem_pieces(_DEFAULT_LOREM_WORDS if options.words is None else options.words)

        capped = options.words is not None and len(pieces) > options.words
        if capped:
            pieces = pieces[: options.words]
        fail_after = options.fail_after_words if options.fails_on(request.attempt) else None

        emitted = 0
        for index, piece in enumerate(pieces):
            if fail_after is not None and emitted >= fail_after:
                break
            if index:
                await asyncio.sleep(options.delay_ms / 1000)
            yield TextDelta(piece)
            emitted += 1
        if fail_after is not None:
            raise _injected_failure(request, emitted, retryable=options.fail_retryable)

        yield Usage(
            input_tokens=sum(len(message.content.split()) for message in request.messages),
            output_tokens=sum(len(piece.split()) for piece in pieces),
        )
        yield Finish("length" if capped else "stop")

    async def aclose(self) -> None:
        return None


def echo_pieces(request: GenerationRequest) -> list[str]:
    """The last user message, then a line per input it carries, split into word pieces that
    concatenate back to that text exactly."""
    for message in reversed(request.messages):
        if message.role == "user":
            text = message.content + "".join(input_line(item) for item in message.inputs)
            return _PIECE.findall(text)
    return []


def input_line(item: PromptInput) -> str:
    """How echo reports one input: a newline, then `[image: image/png, 12 bytes]` or
    `[document: report.pdf, application/pdf, 34 bytes]`."""
    match item:
        case ImageInput():
            return f"\n[image: {item.media_type}, {len(item.data)} bytes]"
        case DocumentInput():
            return f"\n[document: {item.filename}, {item.media_type}, {len(item.data)} bytes]"


def lorem_pieces(words: int) -> list[str]:
    """`words` words of lorem ipsum, each piece after the first carrying its leading space."""
    chosen = [_LOREM_WORDS[index % len(_LOREM_WORDS)] for index in range(words)]
    if chosen:
        chosen[0] = chosen[0].capitalize()
    return [word if index == 0 else f" {word}" for index, word in enumerate(chosen)]


def _injected_failure(
    request: GenerationRequest, emitted: int, *, retryable: bool
) -> ProviderError:
    message = (
        f"local/{request.model}: injected failure after {emitted} words (attempt {request.attempt})"
    )
    return ProviderError.unavailable(message) if retryable else ProviderError.rejected(message)


def _count_option(read: ProviderOptions, key: str, *, maximum: int) -> int | None:
    count: int | None = read.checked(
        (key,),
        lambda value: is_integer(value) and 0 <= value <= maximum,
        f"an integer from 0 to {maximum}",
    )
    return count
