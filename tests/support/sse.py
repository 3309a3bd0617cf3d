"""Reads Server-Sent Events from an httpx response, as a client would, for assertions on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    data: str

    @property
    def chunk(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


async def iter_sse(response: httpx.Response) -> AsyncIterator[SseEvent]:
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        line = line.rstrip("\r")
        if not line:
            if data:
                yield SseEvent(event_id, "\n".join(data))
            event_id, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


async def collect_sse(response: httpx.Response) -> list[SseEvent]:
    return [event async for event in iter_sse(response)]


def chunks_of(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [event.chunk for event in events if event.data != "[DONE]"]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk["delta"] for chunk in chunks if chunk["type"] == "text-delta")


def assembled_text(chunks: list[dict[str, Any]]) -> str:
    """The answer's text as the AI SDK assembles it: a `reset-step` (a retried generation attempt)
    drops what the step streamed before it. A turn has one step, so the text after the last reset."""
    kinds = [chunk["type"] for chunk in chunks]
    after_reset = len(kinds) - kinds[::-1].index("reset-step") if "reset-step" in kinds else 0
    return text_of(chunks[after_reset:])
