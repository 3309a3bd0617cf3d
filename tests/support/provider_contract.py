"""What every provider adapter is held to, checked the same way against each fake wire-format server.

Never imports an adapter or a provider SDK: each test file builds its own adapter, and these take
it as a ModelProvider. The fake servers' shared model names (tests/support/wire_server.py) are what
the checks ask for: `reply-<words>`, `slow`, `fail-<status>`, `echo`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

import pytest

from providers.base import (
    DocumentInput,
    Finish,
    GenerationRequest,
    ImageInput,
    ModelProvider,
    PromptInput,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    TextDelta,
    ToolDefinition,
    Usage,
)
from tests.support.provider_events import collect, collect_failure, failure_of, text_of
from tests.support.wire_server import WireRequest

PROMPT = [
    PromptMessage("system", "You are terse."),
    PromptMessage("user", "Say something nice"),
]
PROMPT_WORDS = 6  # the words of PROMPT: what every fake server counts as its input tokens

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
PDF = b"%PDF-1.7\n" + b"\x00\xff" * 3000

RecordT = TypeVar("RecordT", bound=WireRequest)


class Recording(Protocol[RecordT]):
    """A fake server, as far as the checks read it."""

    @property
    def requests(self) -> list[RecordT]: ...


def request(
    model: str,
    *,
    messages: list[PromptMessage] | None = None,
    attempt: int = 1,
    offered_tools: tuple[ToolDefinition, ...] = (),
    **options: Any,
) -> GenerationRequest:
    """A request for `model` of PROMPT (or `messages`), offering `offered_tools`, with `options`
    as its providerOptions (`tools` among them is a providerOption, as a caller may send one)."""
    return GenerationRequest(
        model=model,
        messages=PROMPT if messages is None else messages,
        options=options,
        attempt=attempt,
        tools=offered_tools,
    )


def with_inputs(text: str, *inputs: PromptInput) -> list[PromptMessage]:
    """A system prompt, then `text` from the user with `inputs` (a PNG and a PDF when none)."""
    inputs = inputs or (
        ImageInput("image/png", PNG),
        DocumentInput("application/pdf", PDF, "r.pdf"),
    )
    return [PromptMessage("system", "You are terse."), PromptMessage("user", text, inputs=inputs)]


def only_request(server: Recording[RecordT]) -> RecordT:
    [recorded] = server.requests
    return recorded


async def wait_for(flag: threading.Event) -> bool:
    # The server records on its own thread; wait on its Event without blocking the event loop.
    return await asyncio.to_thread(flag.wait, 5.0)


def closed_origin() -> str:
    """An origin on 127.0.0.1 where nothing listens: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- checks every adapter passes ----------------------------------------------------------------


async def check_streams_text_then_usage_and_finish(
    provider: ModelProvider, server: Recording[RecordT]
) -> RecordT:
    """A three-word answer arrives as three text deltas, then its usage, then its finish; the
    server saw the whole answer sent. Returns the request, for a provider's own checks."""
    events = await collect(provider.stream(request("reply-hello-big-world")))

    assert [type(event) for event in events[:-2]] == [TextDelta] * 3
    assert text_of(events) == "hello big world"
    assert events[-2:] == [Usage(input_tokens=PROMPT_WORDS, output_tokens=3), Finish("stop")]
    sent = only_request(server)
    assert sent.finished.is_set()
    return sent


async def check_closing_midway_closes_the_connection(
    provider: ModelProvider, server: Recording[RecordT], *, before_returning: bool = False
) -> None:
    """Closing a stream after two deltas, as a stop does, makes the server see the client leave
    before the answer is finished. `before_returning`: the connection is closed by the time
    `aclose` returns, checked without giving the event loop a turn (a close left to a cleanup
    task scheduled for later would never happen)."""
    stream = provider.stream(request("slow"))
    first = [await anext(stream), await anext(stream)]
    assert text_of(first) == "w0 w1 "

    await stream.aclose()

    sent = only_request(server)
    assert sent.disconnected.wait(5.0) if before_returning else await wait_for(sent.disconnected)
    assert not sent.finished.is_set()


async def check_cancelling_the_consumer_closes_the_connection(
    provider: ModelProvider, server: Recording[RecordT]
) -> None:
    """Cancelling the task reading a stream, as a worker shutting down does, closes the
    connection."""
    started = asyncio.Event()

    async def consume() -> None:
        async with aclosing(provider.stream(request("slow"))) as stream:
            async for _ in stream:
                started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await wait_for(only_request(server).disconnected)


async def refused_before_sending(
    provider: ModelProvider, server: Recording[RecordT], refused: GenerationRequest
) -> ProviderError:
    """The failure of a request the adapter refuses itself: not retryable, and nothing was sent.
    `server` must have no requests recorded yet."""
    error = await failure_of(provider.stream(refused))

    assert not error.retryable
    assert server.requests == []
    return error


async def status_failure(provider: ModelProvider, status: int, *, retryable: bool) -> ProviderError:
    """The failure of a `fail-<status>` answer: classified by its HTTP status, which its message
    names after the provider and model."""
    error = await failure_of(provider.stream(request(f"fail-{status}")))

    assert error.status_code == status
    assert error.retryable is retryable
    expected = ProviderError.PROVIDER_UNAVAILABLE if retryable else ProviderError.PROVIDER_REJECTED
    assert error.error_type == expected
    assert f"{provider.name}/fail-{status}: HTTP {status}" in str(error)
    return error


async def broken_off_failure(
    provider: ModelProvider, model: str
) -> tuple[list[ProviderEvent], ProviderError]:
    """What a stream that breaks off part way yields, and its failure: no finish, and retryable,
    since a later attempt may get the whole answer."""
    seen, error = await collect_failure(provider.stream(request(model)))

    assert not any(isinstance(event, Finish) for event in seen)
    assert error.retryable
    assert error.__cause__ is None
    return seen, error


async def timeout_failure(
    adapter: ModelProvider, model: str
) -> tuple[list[ProviderEvent], ProviderError]:
    """What an adapter with a short timeout yields from a model that stalls, and its failure:
    retryable, and named a timeout. Closes the adapter."""
    async with aclosing(adapter):
        seen, error = await collect_failure(adapter.stream(request(model)))

    assert error.retryable
    assert error.status_code is None
    assert str(error) == f"{adapter.name}/{model}: request timed out"
    return seen, error


async def connection_refused_failure(adapter: ModelProvider) -> ProviderError:
    """The failure of an adapter pointed at `closed_origin()`: retryable, with no status. Closes
    the adapter."""
    async with aclosing(adapter):
        error = await failure_of(adapter.stream(request("echo")))

    assert error.retryable
    assert error.status_code is None
    assert f"{adapter.name}/echo: connection failed" in str(error)
    return error


def assert_kept_out(secret: str, error: ProviderError) -> None:
    """`secret` is nowhere in the error, nor in a cause chained to it that could carry it into
    workflow history."""
    assert secret not in str(error)
    assert secret not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
