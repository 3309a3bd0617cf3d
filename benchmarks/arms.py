"""The two ways a benchmark turn is run and timed: the `local` provider in-process, and POST /v1/chats over HTTP.

Both arms record the same things with the same clock (`time.perf_counter`): when the turn was asked
for, and when each text delta reached the caller. For the api arm "reached" means the SSE event was
complete on the client (its terminating blank line was read), which is when a browser's EventSource
or the AI SDK's parser would hand it on.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Final

import httpx

from providers.base import GenerationRequest, PromptMessage, TextDelta
from providers.local import LOREM_MODEL, LocalProvider

__all__ = ["ApiArm", "DirectArm", "Pace", "TurnFailedError", "TurnTiming"]

PROMPT: Final = "Benchmark turn: answer with lorem ipsum."


class TurnFailedError(RuntimeError):
    """A turn did not end with a complete answer; a benchmark with failed turns measures nothing."""


@dataclass(frozen=True)
class Pace:
    """How the `local/lorem` model answers: `words` text deltas, `delay_ms` apart."""

    words: int
    delay_ms: float

    def provider_options(self) -> dict[str, Any]:
        return {"words": self.words, "delayMs": self.delay_ms}


@dataclass
class TurnTiming:
    """One turn's timestamps, in seconds on the `time.perf_counter` clock."""

    asked_at: float
    delta_at: list[float] = field(default_factory=list)
    # api arm only: when the response headers arrived, i.e. the api had started the turn's workflow
    # and the workflow had claimed the chat and stored the user message.
    accepted_at: float | None = None

    @property
    def time_to_first_token(self) -> float:
        return self.delta_at[0] - self.asked_at

    @property
    def token_gaps(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.delta_at)]

    @property
    def time_to_accept(self) -> float | None:
        return None if self.accepted_at is None else self.accepted_at - self.asked_at


class DirectArm:
    """The baseline: the provider's own stream, consumed in this process with nothing in between."""

    name = "direct"

    def __init__(self) -> None:
        self._provider = LocalProvider()

    async def run_turn(self, pace: Pace) -> TurnTiming:
        request = GenerationRequest(
            model=LOREM_MODEL,
            messages=[PromptMessage(role="user", content=PROMPT)],
            options=pace.provider_options(),
        )
        timing = TurnTiming(asked_at=time.perf_counter())
        async with aclosing(self._provider.stream(request)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    timing.delta_at.append(time.perf_counter())
        _check_complete(timing, pace)
        return timing

    async def aclose(self) -> None:
        await self._provider.aclose()


class ApiArm:
    """What a client gets: POST /v1/chats with `local/lorem`, reading the UI message stream."""

    name = "through api"

    def __init__(self, api_url: str, api_key: str, *, max_connections: int, timeout: float) -> None:
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"Bearer {api_key}"},
            # One kept-alive connection per concurrent client, as a long-lived client would hold,
            # so connection setup is not part of what is measured.
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Past the api's idle pings (15 s by default), so only a stalled stream times out.
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def run_turn(self, pace: Pace) -> TurnTiming:
        body = {
            "message": PROMPT,
            "model": f"local/{LOREM_MODEL}",
            "providerOptions": {"local": pace.provider_options()},
        }
        timing = TurnTiming(asked_at=time.perf_counter())
        async with self._client.stream("POST", "/v1/chats", json=body) as response:
            timing.accepted_at = time.perf_counter()
            if response.status_code != 200:
                await response.aread()
                raise TurnFailedError(
                    f"POST /v1/chats answered {response.status_code}: {response.text[:500]}"
                )
            finished = False
            async for data in _sse_data(response):
                if data == "[DONE]":
                    break
                chunk: dict[str, Any] = json.loads(data)
                kind = chunk.get("type")
                if kind == "text-delta":
                    timing.delta_at.append(time.perf_counter())
                elif kind == "finish":
                    finished = True
                elif kind in ("error", "abort", "reset-step"):
                    # A retried or failed attempt is not the turn being measured.
                    raise TurnFailedError(f"the stream sent {kind}: {data[:500]}")
        if not finished:
            raise TurnFailedError("the stream ended without a finish chunk")
        _check_complete(timing, pace)
        return timing

    async def aclose(self) -> None:
        await self._client.aclose()


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each complete Server-Sent Event, yielded when its terminating blank line arrives."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # `id:` cursors and `:` pings carry nothing this benchmark times.


def _check_complete(timing: TurnTiming, pace: Pace) -> None:
    if len(timing.delta_at) != pace.words:
        raise TurnFailedError(f"expected {pace.words} text deltas, got {len(timing.delta_at)}")
