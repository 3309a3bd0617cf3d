"""Reading a provider adapter's event stream in tests: every event, the text, the reasoning, the tool calls, the failure."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from providers.base import ProviderError, ProviderEvent, ReasoningDelta, TextDelta, ToolCall


async def collect(stream: AsyncGenerator[ProviderEvent, None]) -> list[ProviderEvent]:
    async with aclosing(stream):
        return [event async for event in stream]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def reasoning_of(events: list[ProviderEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, ReasoningDelta))


def tool_calls_of(events: list[ProviderEvent]) -> list[ToolCall]:
    return [event for event in events if isinstance(event, ToolCall)]


async def collect_failure(
    stream: AsyncGenerator[ProviderEvent, None],
) -> tuple[list[ProviderEvent], ProviderError]:
    """The events a stream yielded before it raised ProviderError, and the error."""
    seen: list[ProviderEvent] = []
    try:
        async with aclosing(stream):
            async for event in stream:
                seen.append(event)
    except ProviderError as error:
        return seen, error
    raise AssertionError(f"the stream finished without failing: {seen}")


async def failure_of(stream: AsyncGenerator[ProviderEvent, None]) -> ProviderError:
    """The ProviderError a stream raised, whatever it yielded first."""
    _, error = await collect_failure(stream)
    return error
