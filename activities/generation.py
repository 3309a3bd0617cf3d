"""The generation activity: streams a provider's answer into the turn's Redis Stream while heartbeating."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, Self, TypeVar

import structlog
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
)

from activities.attachments import MessageFiles, ModelInputs
from activities.context_fit import fit_prompt
from activities.tool_context import assistant_messages, parts_before_step
from activities.tool_set import ToolSet
from activities.ui_message import Chunk, UiMessageBuilder
from core.contracts import GenerateReplyInput, GenerateReplyResult, TitleChatInput, TurnTools
from core.errors import ErrorType
from core.ui_chunks import opening_chunks
from providers.base import (
    GenerationRequest,
    InputKind,
    ModelProvider,
    PromptMessage,
    ProviderError,
    TextDelta,
    UnknownModelError,
    Usage,
    estimated_tokens,
)
from providers.catalog import Capability, ModelCard
from providers.registry import ProviderRegistry
from storage import attachments, chats, tool_calls, turn_usage
from storage.db import is_database_unavailable
from storage.models import Attachment, Chat, Message
from storage.objects import ObjectStoreUnavailable
from storage.streams import TurnStreams
from storage.turn_usage import AttemptOutcome, AttemptUsage, TokenCounts

log = structlog.get_logger(__name__)

# Heartbeats go out on this period whatever the provider does, so a provider that thinks for a while
# before its first token is not mistaken for a dead worker (the SDK throttles the actual RPCs).
HEARTBEAT_SECONDS = 1.0
# Stop flags are polled on this period for every generation of the worker at once (one MGET), which
# bounds a stop's latency while a provider sends nothing; a write sees a stop in its reply anyway.
STOP_POLL_SECONDS = 0.25
# While Postgres is unreachable, generation waits for it in place, heartbeating, rather than failing
# the attempt: provider retries are few and meant for the provider, and an answer already streamed
# must not be thrown away because it could not be saved yet. The pauses stay well under the
# heartbeat timeout; the activity's start-to-close timeout bounds the whole wait.
DATABASE_WAIT = wait_exponential(multiplier=0.2, max=2)

# Characters of a tool output that enter the model's context (Settings.tool_output_context_chars).
DEFAULT_TOOL_OUTPUT_CHARS = 8_000

T = TypeVar("T")
ABORT_CHUNK: Chunk = {"type": "abort"}


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
        self._batches_appended = 0
        self._writer: asyncio.Task[None] | None = None
        self.last_entry_id: str | None = None
        # Set when a write learns that a stop was requested (the Redis fast path of a stop).
        self.stop_seen = asyncio.Event()

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
            appended = await self._streams.append(
                self._organization_id,
                self._turn_id,
                self._attempt,
                self._batches_appended + 1,
                batch,
            )
            self._batches_appended += 1
            self.last_entry_id = appended.last_entry_id
            if appended.stop_requested:
                self.stop_seen.set()


class StopFlagPoller:
    """Polls the stop flags of every generation running in this worker with one command per period.

    A poll per generation would cost a round trip (and a pooled connection) per live turn four times
    a second; one `MGET` over all of them keeps Redis traffic and connections flat as turns grow.
    Built once per worker process; entered (`async with`) on the worker's event loop.
    """

    def __init__(self, streams: TurnStreams) -> None:
        self._streams = streams
        self._watched: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._poll_forever(), name="stop-flag-poller")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def watch(
        self, organization_id: str, turn_id: str, stopped: asyncio.Event
    ) -> Callable[[], None]:
        """Set `stopped` once a stop of the turn is requested, until the returned function is called."""
        turn = (organization_id, turn_id)
        self._watched.setdefault(turn, set()).add(stopped)

        def unwatch() -> None:
            events = self._watched.get(turn, set())
            events.discard(stopped)
            if not events:
                self._watched.pop(turn, None)

        return unwatch

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(STOP_POLL_SECONDS)
            if not self._watched:
                continue
            try:
                stopped = await self._streams.stops_requested(list(self._watched))
            except RedisError:
                # Redis away for a moment: the next poll (or the next write) sees the stop.
                log.warning("generation.stop_poll_failed", exc_info=True)
                continue
            for turn in stopped:
                for event in self._watched.get(turn, ()):
                    event.set()


class GenerationActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        providers: ProviderRegistry,
        stop_flags: StopFlagPoller,
        model_inputs: ModelInputs,
        tool_set: ToolSet,
        title_model: str | None = None,
        tool_output_chars: int = DEFAULT_TOOL_OUTPUT_CHARS,
    ) -> None:
        self._tool_set = tool_set
        self._tool_output_chars = tool_output_chars
        self._sessions = session_factory
        self._streams = streams
        self._providers = providers
        self._model_inputs = model_inputs
        self._stop_flags = stop_flags
        self._title_model = title_model

    @activity.defn
    async def generate_reply(self, request: GenerateReplyInput) -> GenerateReplyResult:
        """Stream one attempt's answer; a stop (Redis flag or Temporal cancellation) keeps the partial answer."""
        # Attempts are numbered across the turn: a fallback model's attempts come after the failed
        # model's, so the stream's attempt fence and the stored-answer guard keep working.
        attempt = request.attempt_offset + activity.info().attempt
        started = time.monotonic()
        try:
            provider, model = self._providers.resolve(request.model)
            card = self._providers.card(request.model)
        except UnknownModelError as exc:
            raise ApplicationError(
                str(exc), type=ErrorType.PROVIDER_REJECTED, non_retryable=True
            ) from exc

        async def load_context(session: AsyncSession) -> _StepContext:
            await chats.record_attempt(session, request.organization_id, request.turn_id, attempt)
            chat = await chats.get_live_chat(
                session, chats.Visibility(request.organization_id), request.chat_id
            )
            branch = await chats.load_branch(
                session, request.organization_id, request.user_message_id
            )
            files = await attachments.get_many(
                session,
                request.organization_id,
                [i for message in branch for i in attachments.attachment_ids_in(message.parts)],
            )
            earlier: list[dict[str, Any]] = []
            if request.step > 1:
                answer = await chats.get_message(
                    session, request.organization_id, request.assistant_message_id
                )
                earlier = parts_before_step(list(answer.parts) if answer else [], request.step)
            turn_tools = await tool_calls.load_turn_tools(
                session, request.organization_id, request.turn_id
            )
            return _StepContext(chat, branch, files, earlier, turn_tools)

        context = await self._in_transaction(load_context)
        chat = context.chat
        # A model without tool calling is offered none (a chat's `web` setting asks for them
        # without knowing the model; a send that asks explicitly was refused by the api).
        offered = (
            await self._tool_set.offered(request.organization_id, context.turn_tools)
            if Capability.TOOLS in card.capabilities
            else {}
        )
        prompt_messages = build_prompt(
            request.system,
            chat.instructions if chat else None,
            chat.mood if chat else None,
            context.branch,
            await self._load_files(
                request.organization_id, context.branch, context.files, provider.input_kinds(model)
            ),
            tool_output_chars=self._tool_output_chars,
        )
        continuation = assistant_messages(context.earlier_parts, self._tool_output_chars)
        fitted = fit_prompt(
            [*prompt_messages, *continuation], card.prompt_budget, keep_last=1 + len(continuation)
        )
        prompt = fitted.messages
        attempt_record = _AttemptRecorder(request, card, attempt, prompt)

        # Written again in case Redis lost the stream since the turn opened it (a no-op otherwise),
        # so a reader starting from the beginning always finds `start`.
        await self._streams.publish_opening(
            request.organization_id,
            request.turn_id,
            opening_chunks(
                request.assistant_message_id, request.chat_id, request.turn_id, request.model
            ),
        )
        if request.step > 1:
            # A later step opens once, whichever attempt gets here first: a retried attempt's
            # `reset-step` then clears only this step's parts, never the step before.
            await self._streams.append_once(
                request.organization_id,
                request.turn_id,
                f"step-{request.step}",
                [{"type": "start-step"}],
            )
        await self._streams.begin_attempt(request.organization_id, request.turn_id, attempt)
        publisher = ChunkPublisher(self._streams, request.organization_id, request.turn_id, attempt)
        builder = UiMessageBuilder(attempt, earlier_parts=context.earlier_parts, tools=offered)
        timing = _FirstTokenClock(started)
        if activity.info().attempt > 1 or request.replaces_failed_model is not None:
            # Clients drop whatever the failed attempt (or the model that failed before this
            # one) streamed into the step before this attempt's output; the step itself stays
            # open, so no new `start-step` follows.
            publisher.send([{"type": "reset-step"}])
        publisher.send(builder.add_sources(request.sources))
        generation = GenerationRequest(
            model=model,
            messages=prompt,
            options=_options_for(request.provider_options, provider.name),
            attempt=attempt,
            tools=tuple(tool.definition for tool in offered.values()),
        )
        streaming = asyncio.create_task(
            _stream_into(provider, generation, builder, publisher, timing)
        )
        watcher = asyncio.create_task(_heartbeat_until_stopped(publisher))
        unwatch = self._stop_flags.watch(
            request.organization_id, request.turn_id, publisher.stop_seen
        )
        stopped = False
        try:
            await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                streaming.result()
            else:
                # Cancelling the consumer closes the provider stream (aclosing) at once.
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
                stopped = True
        except asyncio.CancelledError:
            # Temporal cancelled the activity (a stop that arrived as a workflow signal): keep
            # what was generated, then report the cancellation.
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            await self._keep_partial_answer(
                request, builder, publisher, attempt_record.of(builder, "stopped")
            )
            raise
        except ProviderError as exc:
            await publisher.aclose()
            # What the provider billed for a failed attempt counts too; one that failed before
            # it produced anything billed nothing.
            failed = attempt_record.of(builder, "failed", error=exc.message)
            await self._in_transaction(failed.record)
            raise _as_application_error(exc) from exc
        finally:
            watcher.cancel()
            unwatch()

        finish_reason = "other" if stopped else builder.finish_reason
        if finish_reason == "tool-calls" and not builder.called_tools:
            finish_reason = "other"  # a provider that says so without calling any: nothing to run
        step_limit_reached = False
        if builder.called_tools and not stopped:
            finish_reason = "tool-calls"
            if request.step >= request.max_steps:
                step_limit_reached = True
                # The bound: this step's calls are not run, and the turn ends here.
                finish_reason = "length"
                publisher.send(
                    builder.refuse_tool_calls(
                        f"not run: the turn reached its limit of {request.max_steps} steps"
                    )
                )
        elif stopped:
            builder.tool_calls = []
        # A stop seen here (the Redis flag) ends the open streams with `abort` at once, rather than
        # a workflow task later with the persist step; the persist step then adds only `finish`,
        # after the answer is stored (ChatSessionActivities.persist_assistant_message).
        publisher.send([*builder.finish_step(), *([ABORT_CHUNK] if stopped else [])])
        recorded = attempt_record.of(builder, "stopped" if stopped else "completed")

        async def store_answer() -> None:
            await publisher.flush()
            await self._save_parts(request, builder, recorded)

        # The stop's cancellation from the workflow often lands right here, just after the Redis
        # flag ended generation: the answer is stored whole first, then the cancellation is
        # reported (the workflow records the turn as aborted either way).
        await _to_completion(store_answer())
        usage = recorded.usage
        return GenerateReplyResult(
            finish_reason=finish_reason,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            ttft_ms=timing.ttft_ms,
            attempt=attempt,
            stopped=stopped,
            usage_estimated=usage.estimated,
            messages_left_out=fitted.left_out,
            tool_calls=builder.tool_calls,
            step_limit_reached=step_limit_reached,
        )

    @activity.defn
    async def title_chat(self, request: TitleChatInput) -> str | None:
        """Title a new chat from its first message, unless it has a title (a user's always wins).

        Returns the title set, or None when the chat already had one.
        """

        async def first_text(session: AsyncSession) -> str:
            return await chats.first_user_text(session, request.organization_id, request.chat_id)

        text = await self._in_transaction(first_text)
        title = await self._title_from_model(text) or title_from_text(text)
        if not title:
            return None

        async def store(session: AsyncSession) -> bool:
            return await chats.set_title_if_unset(
                session, request.organization_id, request.chat_id, title
            )

        return title if await self._in_transaction(store) else None

    async def _title_from_model(self, text: str) -> str | None:
        """A title from the configured title model; None if there is none or it fails."""
        if self._title_model is None or not text.strip():
            return None
        try:
            provider, model = self._providers.resolve(self._title_model)
            request = GenerationRequest(
                model=model,
                messages=[
                    PromptMessage(role="system", content=TITLE_INSTRUCTIONS),
                    PromptMessage(role="user", content=text[:4000]),
                ],
                options={"max_tokens": 20},
            )
            pieces: list[str] = []
            async with aclosing(provider.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
        except (ProviderError, UnknownModelError) as exc:
            activity.logger.warning("title model failed; using the first words", exc_info=exc)
            return None
        return title_from_text("".join(pieces).strip().strip("\"'"))

    async def _save_parts(
        self,
        request: GenerateReplyInput,
        builder: UiMessageBuilder,
        attempt: RecordedAttempt,
        *,
        keep_usage: bool = False,
    ) -> None:
        """Store the answer's parts and the attempt's usage in one transaction; `keep_usage` also
        puts the usage on the message (see _keep_partial_answer)."""

        async def save(session: AsyncSession) -> None:
            await chats.save_assistant_parts(
                session,
                request.organization_id,
                request.assistant_message_id,
                builder.parts,
                turn_id=request.turn_id,
                attempt=attempt.entry.attempt,
                usage=attempt.usage.as_metadata() if keep_usage else None,
            )
            await attempt.record(session)

        await self._in_transaction(save)

    async def _load_files(
        self,
        organization_id: str,
        branch: list[Message],
        files: dict[str, Attachment],
        kinds: frozenset[InputKind],
    ) -> dict[str, MessageFiles]:
        """The branch's files as model inputs, waiting out an unreachable object store in place
        like a database outage (see DATABASE_WAIT)."""
        if not files:
            return {}
        return await _waiting_out(
            lambda error: isinstance(error, ObjectStoreUnavailable),
            lambda: self._model_inputs.for_branch(organization_id, branch, files, kinds),
        )

    async def _in_transaction(self, operation: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `operation` in a transaction, waiting out a Postgres outage (see DATABASE_WAIT)."""

        async def in_transaction() -> T:
            async with self._sessions.begin() as session:
                return await operation(session)

        return await _waiting_out(is_database_unavailable, in_transaction)

    async def _keep_partial_answer(
        self,
        request: GenerateReplyInput,
        builder: UiMessageBuilder,
        publisher: ChunkPublisher,
        attempt: RecordedAttempt,
    ) -> None:
        """Store what a cancelled attempt streamed, with its usage: the workflow gets no result
        from a cancelled activity, so the usage travels with the stored message instead."""
        publisher.send(builder.finish_step())
        await publisher.flush()
        await self._save_parts(request, builder, attempt, keep_usage=True)


async def _heartbeat_until_stopped(publisher: ChunkPublisher) -> None:
    """Heartbeat on a fixed period, and return once a stop is seen (by a write or by the poller)."""
    while True:
        activity.heartbeat(publisher.last_entry_id)
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                await publisher.stop_seen.wait()
            return
        except TimeoutError:
            pass


async def _to_completion(operation: Awaitable[None]) -> None:
    """Await `operation` to its end even when the caller is cancelled meanwhile; the cancellation
    is re-raised afterwards, so it is delayed, never lost."""
    task = asyncio.ensure_future(operation)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _waiting_out(
    is_outage: Callable[[BaseException], bool], operation: Callable[[], Awaitable[T]]
) -> T:
    """Run `operation` until it does not fail with an outage `is_outage` recognises, pausing
    (DATABASE_WAIT) and heartbeating in between: the activity waits in place instead of failing."""
    async for try_ in AsyncRetrying(
        retry=retry_if_exception(is_outage),
        wait=DATABASE_WAIT,
        before_sleep=_heartbeat_while_waiting,
        reraise=True,
    ):
        with try_:
            return await operation()
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


def _heartbeat_while_waiting(retry_state: RetryCallState) -> None:
    activity.heartbeat()
    activity.logger.warning(
        "generation waits for the database or the object store",
        extra={"tries": retry_state.attempt_number, "error": repr(retry_state.outcome)},
    )


@dataclass(frozen=True)
class _StepContext:
    """What a step reads from Postgres before it calls the model."""

    chat: Chat | None
    branch: list[Message]
    files: dict[str, Attachment]
    # The assistant message's parts from the turn's earlier steps (none in the first step).
    earlier_parts: list[dict[str, Any]]
    turn_tools: TurnTools


@dataclass(frozen=True)
class TurnUsage:
    """An attempt's token counts: the provider's, or estimated when it reported none."""

    tokens: TokenCounts
    estimated: bool
    reported: Usage | None = None  # as the provider reported it, with any charge it named

    @classmethod
    def of(cls, builder: UiMessageBuilder, prompt: list[PromptMessage]) -> TurnUsage:
        usage = builder.reported_usage
        if usage is not None:
            return cls(
                TokenCounts(
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.cache_write_tokens,
                    usage.output_tokens,
                    usage.reasoning_tokens,
                ),
                estimated=False,
                reported=usage,
            )
        prompt_chars = sum(len(message.content) for message in prompt)
        return cls(
            TokenCounts(
                input_tokens=estimated_tokens(prompt_chars),
                output_tokens=estimated_tokens(builder.streamed_chars()),
            ),
            estimated=True,
        )

    @property
    def input_tokens(self) -> int:
        return self.tokens.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.tokens.output_tokens

    def cost(self, card: ModelCard) -> Decimal:
        return card.cost(
            self.reported
            or Usage(input_tokens=self.tokens.input_tokens, output_tokens=self.tokens.output_tokens)
        )

    def as_metadata(self) -> dict[str, Any]:
        return self.tokens.as_metadata(estimated=self.estimated)


@dataclass(frozen=True)
class RecordedAttempt:
    """One attempt's usage and cost, ready to go into the turn's attempt log."""

    organization_id: str
    turn_id: str
    usage: TurnUsage
    entry: AttemptUsage

    async def record(self, session: AsyncSession) -> None:
        await turn_usage.record_attempt(session, self.organization_id, self.turn_id, self.entry)


class _AttemptRecorder:
    """Builds the attempt-log entry of this attempt, however it ends."""

    def __init__(
        self,
        request: GenerateReplyInput,
        card: ModelCard,
        attempt: int,
        prompt: list[PromptMessage],
    ) -> None:
        self._request = request
        self._card = card
        self._attempt = attempt
        self._prompt = prompt

    def of(
        self, builder: UiMessageBuilder, outcome: AttemptOutcome, *, error: str | None = None
    ) -> RecordedAttempt:
        usage = TurnUsage.of(builder, self._prompt)
        if outcome == "failed" and usage.estimated and not builder.produced_output:
            # Refused or broken before any output, and no usage reported: nothing was billed.
            usage = TurnUsage(TokenCounts(), estimated=False)
        return RecordedAttempt(
            self._request.organization_id,
            self._request.turn_id,
            usage,
            AttemptUsage(
                model=self._request.model,
                attempt=self._attempt,
                outcome=outcome,
                tokens=usage.tokens,
                cost_usd=usage.cost(self._card),
                estimated=usage.estimated,
                error=error,
            ),
        )


class _FirstTokenClock:
    def __init__(self, started: float) -> None:
        self._started = started
        self.ttft_ms: int | None = None

    def output_seen(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = int((time.monotonic() - self._started) * 1000)


async def _stream_into(
    provider: ModelProvider,
    generation: GenerationRequest,
    builder: UiMessageBuilder,
    publisher: ChunkPublisher,
    timing: _FirstTokenClock,
) -> None:
    async with aclosing(provider.stream(generation)) as events:
        async for event in events:
            chunks = builder.on_event(event)
            if chunks and builder.produced_output:
                timing.output_seen()
            publisher.send(chunks)
    await publisher.flush()


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


TITLE_INSTRUCTIONS = (
    "Write a title of at most six words for a conversation that starts with the user's message. "
    "Answer with the title only, without quotes or a final period."
)
TITLE_MAX_WORDS = 8
TITLE_MAX_CHARS = 80


def title_from_text(text: str) -> str:
    """The first words of `text`, as a one-line title of bounded length."""
    words = text.split()
    title = " ".join(words[:TITLE_MAX_WORDS])
    if len(title) > TITLE_MAX_CHARS:
        title = title[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    elif len(words) > TITLE_MAX_WORDS:
        title += "…"
    return title


# The system prompt line a chat's mood adds; `normal` (or none) adds nothing.
MOOD_LINES = {
    "serious": "Answer in a serious, precise and professional tone. No jokes, no small talk.",
    "friendly": "Answer in a warm, friendly and conversational tone.",
}


def build_prompt(
    system: str | None,
    instructions: str | None,
    mood: str | None,
    branch: list[Message],
    files: Mapping[str, MessageFiles] | None = None,
    *,
    tool_output_chars: int = DEFAULT_TOOL_OUTPUT_CHARS,
) -> list[PromptMessage]:
    """The provider prompt: system text (the chat's instructions and mood, then the request's own
    system text), then the conversation up to the user message: its text parts, and what each user
    message's files give the model (text blocks after the text, images and documents as inputs).
    Assistant messages read back step by step, their tool calls and results included."""
    prompt: list[PromptMessage] = []
    mood_line = MOOD_LINES.get(mood or "")
    system_text = "\n\n".join(text for text in (instructions, mood_line, system) if text)
    if system_text:
        prompt.append(PromptMessage(role="system", content=system_text))
    for message in branch:
        if message.role == "assistant":
            prompt += assistant_messages(message.parts, tool_output_chars)
            continue
        text = "".join(
            str(part.get("text", "")) for part in message.parts if part.get("type") == "text"
        )
        given = (files or {}).get(message.id)
        if given is not None:
            text = "\n\n".join(piece for piece in (text, *given.text_blocks) if piece)
        inputs = tuple(given.inputs) if given is not None else ()
        if message.role in ("user", "system") and (text or inputs):
            prompt.append(
                PromptMessage(role=message.role, content=text, inputs=inputs)  # type: ignore[arg-type]
            )
    return prompt
