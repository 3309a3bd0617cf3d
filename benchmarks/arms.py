"""How a benchmark turn is run and timed: the `local` provider in-process, or POST /v1/chats over HTTP.

Every arm records the same things with the same clock (`time.perf_counter`): when the turn was asked
for, and when each text delta reached the caller. For an HTTP arm (`UiStreamArm`: durachat's api, and
the peer servers of `benchmarks.peer_arms`) "reached" means the SSE event was complete on the client
(its terminating blank line was read), which is when a browser's EventSource or the AI SDK's parser
would hand it on.

`StopArm` times a third thing on the same clock: a turn through the api stopped mid-answer with
POST /v1/chats/{id}/stop, from the stop request to the `abort` chunk on the turn's open stream.
"""

from __future__ import annotations

import asyncio
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

__all__ = [
    "API_ARM",
    "ApiArm",
    "DirectArm",
    "Pace",
    "StopArm",
    "StopTiming",
    "TurnFailedError",
    "TurnTiming",
    "UiStreamArm",
    "send_body",
    "sse_data",
]

PROMPT: Final = "Benchmark turn: answer with lorem ipsum."
# The name of the arm through durachat's api in the reports.
API_ARM: Final = "through api"


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


class UiStreamArm:
    """A turn as a client gets it from a server speaking the UI message stream: POST /v1/chats with
    `local/lorem`, timed from the request to each complete `text-delta` event.

    Every HTTP arm (durachat's api and the peers of `benchmarks.peer_arms`) is timed by this one
    reader, so they differ only in the server they talk to.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        max_connections: int,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            # One kept-alive connection per concurrent client, as a long-lived client would hold,
            # so connection setup is not part of what is measured.
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # Past the api's idle pings (15 s by default), so only a stalled stream times out.
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def run_turn(self, pace: Pace) -> TurnTiming:
        timing = TurnTiming(asked_at=time.perf_counter())
        async with self._client.stream("POST", "/v1/chats", json=send_body(pace)) as response:
            timing.accepted_at = time.perf_counter()
            if response.status_code != 200:
                await response.aread()
                raise TurnFailedError(
                    f"{self.name}: POST /v1/chats answered {response.status_code}: "
                    f"{response.text[:500]}"
                )
            finished = False
            async for data in sse_data(response):
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
                    raise TurnFailedError(f"{self.name}: the stream sent {kind}: {data[:500]}")
        if not finished:
            raise TurnFailedError(f"{self.name}: the stream ended without a finish chunk")
        _check_complete(timing, pace)
        return timing

    async def aclose(self) -> None:
        await self._client.aclose()


class ApiArm(UiStreamArm):
    """What a durachat client gets: the whole production path of a turn, behind an API key."""

    def __init__(self, api_url: str, api_key: str, *, max_connections: int, timeout: float) -> None:
        super().__init__(
            API_ARM,
            api_url,
            max_connections=max_connections,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
        )


def send_body(pace: Pace) -> dict[str, Any]:
    """The JSON body of POST /v1/chats that asks `local/lorem` for an answer at `pace`."""
    return {
        "message": PROMPT,
        "model": f"local/{LOREM_MODEL}",
        "providerOptions": {"local": pace.provider_options()},
    }


@dataclass(frozen=True)
class StopTiming:
    """One stopped turn, in seconds on the `time.perf_counter` clock."""

    stop_sent_at: float
    stop_answered_at: float
    abort_at: float
    finish_at: float
    # Text deltas that arrived after the stop request had been sent: generated before the stop was seen.
    deltas_after_stop: int
    # Whether the stored message was read back and found `aborted` with the streamed text.
    verified: bool

    @property
    def stop_response(self) -> float:
        return self.stop_answered_at - self.stop_sent_at

    @property
    def to_abort(self) -> float:
        return self.abort_at - self.stop_sent_at

    @property
    def to_finish(self) -> float:
        return self.finish_at - self.stop_sent_at


class StopArm:
    """Start a paced turn through the api, stop it after a few deltas, time the stop on the open stream.

    The turn's stream and the stop request use different clients, so the stop always goes over its
    own (kept-alive) connection while the stream's connection is busy, as from a second browser tab.
    """

    name = "stop"

    def __init__(self, api_url: str, api_key: str, *, max_connections: int, timeout: float) -> None:
        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=api_url,
                headers={"Authorization": f"Bearer {api_key}"},
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
                timeout=httpx.Timeout(timeout, connect=5.0),
            )

        self._streams = client()
        self._control = client()

    async def run_turn(self, pace: Pace, *, stop_after: int, verify: bool) -> StopTiming:
        """One turn stopped once `stop_after` text deltas have arrived; `verify` reads the message back."""
        stop: asyncio.Task[tuple[float, float]] | None = None
        deltas: list[float] = []
        text: list[str] = []
        abort_at = finish_at = None
        done = False
        async with self._streams.stream("POST", "/v1/chats", json=send_body(pace)) as response:
            if response.status_code != 200:
                await response.aread()
                raise TurnFailedError(
                    f"POST /v1/chats answered {response.status_code}: {response.text[:500]}"
                )
            chat_id = response.headers["X-Chat-Id"]
            turn_id: str | None = None
            try:
                async for data in sse_data(response):
                    now = time.perf_counter()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk: dict[str, Any] = json.loads(data)
                    kind = chunk.get("type")
                    if kind == "start":
                        turn_id = chunk["messageMetadata"]["turnId"]
                    elif kind == "text-delta":
                        deltas.append(now)
                        text.append(chunk["delta"])
                        if len(deltas) == stop_after and turn_id is not None:
                            # A task, so this loop goes on reading the stream while the stop is sent.
                            stop = asyncio.create_task(self._stop(chat_id, turn_id))
                    elif kind == "abort":
                        abort_at = now
                    elif kind == "finish":
                        finish_at = now
                    elif kind in ("error", "reset-step"):
                        raise TurnFailedError(f"the stop turn's stream sent {kind}: {data[:500]}")
            finally:
                if stop is not None and not stop.done():
                    stop.cancel()
        if stop is None:
            raise TurnFailedError(
                f"the turn ended after {len(deltas)} deltas, before a stop was sent"
            )
        stop_sent_at, stop_answered_at = await stop
        if abort_at is None or finish_at is None or not done:
            raise TurnFailedError(
                "a stopped turn's stream did not end with abort, finish and [DONE] "
                f"(abort={abort_at is not None}, finish={finish_at is not None}, done={done})"
            )
        if len(deltas) >= pace.words:
            raise TurnFailedError("the turn streamed its whole answer: the stop came too late")
        if verify:
            await self._verify(chat_id, "".join(text))
        return StopTiming(
            stop_sent_at=stop_sent_at,
            stop_answered_at=stop_answered_at,
            abort_at=abort_at,
            finish_at=finish_at,
            deltas_after_stop=sum(1 for at in deltas if at > stop_sent_at),
            verified=verify,
        )

    async def _stop(self, chat_id: str, turn_id: str) -> tuple[float, float]:
        sent_at = time.perf_counter()
        response = await self._control.post(f"/v1/chats/{chat_id}/stop", json={"turnId": turn_id})
        answered_at = time.perf_counter()
        if response.status_code != 200:
            raise TurnFailedError(
                f"POST /stop answered {response.status_code}: {response.text[:500]}"
            )
        answer = response.json()
        if answer != {"stopped": True, "turnId": turn_id}:
            raise TurnFailedError(f"POST /stop did not stop turn {turn_id}: {answer}")
        return sent_at, answered_at

    async def _verify(self, chat_id: str, streamed_text: str) -> None:
        """The chat's last message must be the stopped answer: `aborted`, holding what was streamed."""
        response = await self._control.get(f"/v1/chats/{chat_id}")
        if response.status_code != 200:
            raise TurnFailedError(
                f"GET /v1/chats/{chat_id} answered {response.status_code}: {response.text[:500]}"
            )
        chat: dict[str, Any] = response.json()
        last = chat["messages"][-1] if chat["messages"] else {}
        stored_text = "".join(
            part.get("text", "") for part in last.get("parts", []) if part.get("type") == "text"
        )
        problems = []
        if last.get("role") != "assistant" or last.get("status") != "aborted":
            problems.append(f"last message is {last.get('role')}/{last.get('status')}")
        if stored_text != streamed_text:
            problems.append(
                f"stored text ({len(stored_text)} chars) differs from the streamed text "
                f"({len(streamed_text)} chars)"
            )
        if chat.get("activeTurnId") is not None:
            problems.append(f"the chat still has an active turn {chat['activeTurnId']}")
        if problems:
            raise TurnFailedError(f"stopped chat {chat_id}: " + "; ".join(problems))

    async def aclose(self) -> None:
        await self._streams.aclose()
        await self._control.aclose()


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
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
