"""The generation activity: streams a provider's answer into the turn's Redis Stream while heartbeating."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ui_message import Chunk, UiMessageBuilder
from core.contracts import GenerateReplyInput, GenerateReplyResult
from core.errors import ErrorType
from providers.base import GenerationRequest, PromptMessage, ProviderError, UnknownModelError
from providers.registry import ProviderRegistry
from storage import chats
from storage.models import Message
from storage.streams import TurnStreams

# Heartbeats go out on this period whatever the provider does, so a provider that thinks for a while
# before its first token is not mistaken for a dead worker. The SDK throttles the actual RPCs.
HEARTBEAT_PERIOD_SECONDS = 1.0


class ChunkPublisher:
    """Appends chunks to the turn's stream in order, batching whatever arrives while a write is in flight.

    The first chunk after an idle moment is written at once (lowest latency); chunks that arrive during
    that write go out together in the next one (fewest round trips under a fast provider).
    """

    def __init__(
        self, streams: TurnStreams, organization_id: str, turn_id: str, attempt: int
    ) -> None:
        self._streams = streams
        self._organization_id = organization_id
        self._turn_id = turn_id
        self._attempt = attempt
        self._pending: list[Chunk] = []
        self._writer: asyncio.Task[None] | None = None
        self.last_entry_id: str | None = None

    def send(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        if self._writer is not None and self._writer.done():
            self._writer.result()  # surface a failed write (Redis down, attempt superseded) here
        self._pending.extend(chunks)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())

    async def flush(self) -> None:
        while self._writer is not None and (not self._writer.done() or self._pending):
            if self._writer.done():
                self._writer = asyncio.create_task(self._drain())
            await self._writer
        if self._writer is not None:
            self._writer.result()

    async def aclose(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self.last_entry_id = await self._streams.append(
                self._organization_id, self._turn_id, self._attempt, batch
            )


class GenerationActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        providers: ProviderRegistry,
    ) -> None:
        self._sessions = session_factory
        self._streams = streams
        self._providers = providers

    @activity.defn
    async def generate_reply(self, request: GenerateReplyInput) -> GenerateReplyResult:
        attempt = activity.info().attempt
        started = time.monotonic()
        try:
            provider, model = self._providers.resolve(request.model)
        except UnknownModelError as exc:
            raise ApplicationError(
                str(exc), type=ErrorType.PROVIDER_REJECTED, non_retryable=True
            ) from exc

        async with self._sessions.begin() as session:
            await chats.record_attempt(session, request.organization_id, request.turn_id, attempt)
            chat = await chats.get_live_chat(
                session, chats.Visibility(request.organization_id), request.chat_id
            )
            branch = await chats.load_branch(
                session, request.organization_id, request.user_message_id
            )
        prompt = build_prompt(request.system, chat.instructions if chat else None, branch)

        await self._streams.begin_attempt(request.organization_id, request.turn_id, attempt)
        publisher = ChunkPublisher(self._streams, request.organization_id, request.turn_id, attempt)
        builder = UiMessageBuilder(attempt)
        heartbeat = asyncio.create_task(_heartbeat_forever(publisher))
        ttft_ms: int | None = None
        try:
            if attempt > 1:
                # Clients drop whatever the failed attempt streamed into the step before this
                # attempt's output; the step itself stays open, so no new `start-step` follows.
                publisher.send([{"type": "reset-step"}])
            generation = GenerationRequest(
                model=model,
                messages=prompt,
                options=_options_for(request.provider_options, provider.name),
                attempt=attempt,
            )
            async with aclosing(provider.stream(generation)) as events:
                async for event in events:
                    chunks = builder.on_event(event)
                    if chunks and ttft_ms is None and builder.produced_output:
                        ttft_ms = int((time.monotonic() - started) * 1000)
                    publisher.send(chunks)
            publisher.send(builder.finish_step())
            await publisher.flush()
        except ProviderError as exc:
            await publisher.aclose()
            raise _as_application_error(exc) from exc
        finally:
            heartbeat.cancel()

        async with self._sessions.begin() as session:
            await chats.save_assistant_parts(
                session, request.organization_id, request.assistant_message_id, builder.parts
            )
        return GenerateReplyResult(
            finish_reason=builder.finish_reason,
            input_tokens=builder.input_tokens,
            output_tokens=builder.output_tokens,
            ttft_ms=ttft_ms,
            attempt=attempt,
        )


async def _heartbeat_forever(publisher: ChunkPublisher) -> None:
    while True:
        activity.heartbeat(publisher.last_entry_id)
        await asyncio.sleep(HEARTBEAT_PERIOD_SECONDS)


def _options_for(provider_options: dict[str, Any], provider_name: str) -> dict[str, Any]:
    options = provider_options.get(provider_name, {})
    return dict(options) if isinstance(options, dict) else {}


def _as_application_error(exc: ProviderError) -> ApplicationError:
    return ApplicationError(
        str(exc),
        type=exc.error_type,
        non_retryable=not exc.retryable,
        next_retry_delay=timedelta(seconds=exc.retry_after) if exc.retry_after else None,
    )


def build_prompt(
    system: str | None, instructions: str | None, branch: list[Message]
) -> list[PromptMessage]:
    """The provider prompt: system text, then the conversation's text parts up to the user message."""
    prompt: list[PromptMessage] = []
    system_text = "\n\n".join(text for text in (instructions, system) if text)
    if system_text:
        prompt.append(PromptMessage(role="system", content=system_text))
    for message in branch:
        text = "".join(
            str(part.get("text", "")) for part in message.parts if part.get("type") == "text"
        )
        if message.role in ("user", "assistant", "system") and text:
            prompt.append(PromptMessage(role=message.role, content=text))  # type: ignore[arg-type]
    return prompt
