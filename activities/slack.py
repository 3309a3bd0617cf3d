"""Slack reply activities: every Slack Web API call that puts a turn's answer into its thread. Never
imports api or workflows.

`relay_answer` follows the turn's Redis stream (activities/turn_follow.py) and shows the answer as
it grows: streamed with Slack's AI streaming methods (`chat.startStream` / `appendStream` /
`stopStream`), appending only what is new, at most once per `bot_edit_interval_seconds`. A stream
lives about five minutes on Slack's side; a message whose stream expired, or is about to, is
stopped and goes on with `chat.update` in the same message. An answer longer than one message
goes on in new messages in the thread (each under `MESSAGE_CHARS`, which `chat.update` also
takes). Once the turn ends, the thread is made to hold the stored answer exactly.

What the reply has posted lives in its workflow: an attempt that creates a message returns at once
with it, so the workflow's history holds every message (the next attempt goes on from there),
and a retried attempt rewrites the messages it may have been writing to (`chat.update`) rather
than post them again: the reply arrives once. Temporal owns the retries: the client's own retry
handlers are off, a 429 raises with its `Retry-After` as the next retry's delay, and 5xx answers
and network trouble raise to be retried with backoff. Tokens and signing secrets stay in Postgres,
sealed. Workflow history and heartbeats hold ids, message timestamps, and each message's
length and a digest of its text (which tell a later attempt whether a message still holds what
was put there), never the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.turn_follow import TurnFollower
from core.contracts import MessageStatus, TurnStatus
from core.secrets import SecretBox
from core.settings import Settings
from storage import chats, integrations
from storage.integrations import IntegrationRecord
from storage.streams import TurnStreams

PLATFORM: Final = "slack"
# Keys of the sealed secrets and plain settings of a Slack integration (api/routers/slack.py).
SIGNING_SECRET: Final = "signingSecret"  # noqa: S105 - a key name, not a secret
BOT_TOKEN: Final = "botToken"  # noqa: S105 - a key name, not a secret
BOT_USER_ID: Final = "botUserId"

# Under chat.update's recommended 4,000 characters (its `msg_too_long`), so every message, streamed
# or posted, can be rewritten whole when a retry or a rollover needs it.
MESSAGE_CHARS: Final = 3_900
# Slack ends a stream about five minutes after chat.startStream (undocumented, so not counted on to
# the second): a message stops streaming a little before and goes on with chat.update.
STREAM_LIFETIME_SECONDS: Final = 270.0
# One Web API call's own limit; Temporal retries a call that runs out of it.
CALL_TIMEOUT_SECONDS: Final = 10
HEARTBEAT_SECONDS: Final = 1.0
# With no stream entry for this long, Postgres is asked whether the turn ended (its stream may
# have expired from Redis while Slack was down).
IDLE_CHECK_SECONDS: Final = 5.0
# How long an ended turn's answer may take to be stored after its stream says it ended.
STORED_WAIT_SECONDS: Final = 30.0
# An attempt that has followed a turn this long returns, with its messages, and the workflow
# starts another: no attempt comes near its start-to-close timeout.
RELAY_SLICE_SECONDS: Final = 600.0

THINKING_STATUS: Final = "is thinking…"
STOPPED_SUFFIX: Final = " _(stopped)_"
FAILED_NOTE: Final = (
    ":warning: _Sorry, something went wrong and this answer could not be finished._"
)
PAUSED_NOTE: Final = (
    ":raised_hand: _A tool call is waiting for an approval; the answer goes on once it is decided._"
)
EMPTY_NOTE: Final = "_(no answer)_"

# Slack's `ok: false` errors that are trouble on its side, retried like a 5xx.
TRANSIENT_ERRORS: Final = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}
)
# The stream of a message is over (expired, or stopped elsewhere): go on with chat.update.
STREAM_OVER: Final = frozenset({"message_not_in_streaming_state", "stopped_by_user"})

Outcome = Literal["finish", "abort", "error", "paused", "gone"]
# (turn status, answer status, answer text) of a turn, by organization and turn id.
StoredAnswer = Callable[[str, str], Awaitable[tuple[str | None, str | None, str]]]


class SlackErrorType:
    """`ApplicationError.type` values of the Slack activities (the workflow's retry policy reads them)."""

    # Slack is down, slow or rate-limiting (429, 5xx, network): retried, after Retry-After if given.
    UNAVAILABLE = "SlackUnavailable"
    # Slack refused the call for good (`invalid_auth`, `channel_not_found`, ...): final.
    REFUSED = "SlackRefused"
    # The organization's Slack integration is gone, or now names another workspace: final.
    NOT_CONNECTED = "SlackNotConnected"


class SlackCallFailed(Exception):
    """Slack answered `ok: false` with an error that is not trouble on its side."""

    def __init__(self, method: str, error: str) -> None:
        super().__init__(f"Slack refused {method}: {error}")
        self.method = method
        self.error = error


@dataclass
class SlackThread:
    """Where a reply goes: ids only."""

    organization_id: str
    team_id: str
    channel: str
    thread_ts: str
    # The user who asked: Slack streams outside DMs only to a named recipient.
    user_id: str | None = None


@dataclass
class SetStatusInput:
    thread: SlackThread
    status: str = THINKING_STATUS


@dataclass
class PostedMessage:
    """One message of a reply, and what this reply last made it hold: its length and a digest,
    which tell from the answer's text whether the message still holds what was put there (the
    text itself stays out of workflow history)."""

    ts: str
    chars: int = 0
    digest: str = ""
    streaming: bool = False
    # When its stream started (Unix seconds), for the rollover before Slack's expiry.
    stream_started_at: float | None = None


@dataclass
class RelayInput:
    thread: SlackThread
    turn_id: str
    messages: list[PostedMessage] = field(default_factory=list)
    # False once chat.startStream was refused here: the rest of the reply posts and edits.
    streaming_available: bool = True


@dataclass
class RelayResult:
    messages: list[PostedMessage]
    streaming_available: bool
    # Set when the reply is settled for now: the turn ended ("finish", "abort", "error"), waits
    # for an approval ("paused"), or is gone (its chat deleted). None: call again to go on.
    outcome: Outcome | None = None


def split_text(text: str, limit: int = MESSAGE_CHARS) -> list[str]:
    """`text` in messages of at most `limit` characters, cut after a paragraph, a line or a word
    where one ends in the second half of a message. The pieces concatenate back to `text`, and
    the cuts before a point depend only on the text up to a message past it, so a growing text
    keeps its earlier pieces."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        window = text[start : start + limit]
        cut = len(window)
        for separator in ("\n\n", "\n", " "):
            at = window.rfind(separator)
            if at >= limit // 2:
                cut = at + len(separator)
                break
        pieces.append(window[:cut])
        start += cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def answer_text(parts: list[dict[str, Any]]) -> str:
    """The text of a stored answer, its steps a paragraph apart: as `TurnText.text` assembles the
    stream, so the streamed and the stored text agree."""
    return "\n\n".join(
        str(part.get("text", "")).strip()
        for part in parts
        if part.get("type") == "text" and str(part.get("text", "")).strip()
    )


def shown_text(text: str, outcome: Outcome | None) -> str:
    """What the thread shows for an answer's text: with a note once it was stopped, failed or
    waits for an approval."""
    if outcome == "finish":
        return text or EMPTY_NOTE
    if outcome == "abort":
        return text + STOPPED_SUFFIX if text else STOPPED_SUFFIX.strip()
    if outcome == "error":
        return f"{text}\n\n{FAILED_NOTE}" if text else FAILED_NOTE
    if outcome == "paused":
        return f"{text}\n\n{PAUSED_NOTE}" if text else PAUSED_NOTE
    return text


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def posted(ts: str, text: str, **state: Any) -> PostedMessage:
    return PostedMessage(ts=ts, chars=len(text), digest=text_digest(text), **state)


def _status_of(exc: SlackApiError) -> int | None:
    response = exc.response
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: SlackApiError) -> timedelta | None:
    headers = getattr(exc.response, "headers", None) or {}
    value = next((v for k, v in dict(headers).items() if str(k).lower() == "retry-after"), None)
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return timedelta(seconds=max(seconds, 0.0)) if seconds is not None else None


def _error_of(exc: SlackApiError) -> str:
    data = getattr(exc.response, "data", None)
    error = data.get("error") if isinstance(data, dict) else None
    return str(error) if error else "unknown_error"


async def slack_call(method: str, call: Awaitable[AsyncSlackResponse]) -> dict[str, Any]:
    """One Web API call's answer; trouble on Slack's side raises a retryable ApplicationError (a
    429 with its Retry-After as the next retry's delay), a refusal raises SlackCallFailed."""
    try:
        response = await call
    except SlackApiError as exc:
        status = _status_of(exc)
        if status == 429:
            raise ApplicationError(
                f"Slack rate-limited {method}",
                type=SlackErrorType.UNAVAILABLE,
                next_retry_delay=_retry_after(exc),
            ) from None
        if status is None or status == 408 or status >= 500:
            raise ApplicationError(
                f"Slack answered {method} with HTTP {status}", type=SlackErrorType.UNAVAILABLE
            ) from None
        error = _error_of(exc) if status == 200 else f"http_{status}"
        if error in TRANSIENT_ERRORS:
            raise ApplicationError(
                f"Slack failed {method}: {error}", type=SlackErrorType.UNAVAILABLE
            ) from None
        raise SlackCallFailed(method, error) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApplicationError(
            f"Slack could not be reached for {method} ({type(exc).__name__})",
            type=SlackErrorType.UNAVAILABLE,
        ) from None
    data = response.data
    return data if isinstance(data, dict) else {}


class SlackActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        box: SecretBox,
        settings: Settings,
    ) -> None:
        self._sessions = session_factory
        self._streams = streams
        self._box = box
        self._settings = settings

    @activity.defn
    async def set_status(self, request: SetStatusInput) -> bool:
        """Show "is thinking…" under the thread until the answer's first message. Best effort:
        False when Slack does not offer it here (not an assistant thread, no `assistant:write`)."""
        client = await self._client(request.thread)
        try:
            await slack_call(
                "assistant.threads.setStatus",
                client.assistant_threads_setStatus(
                    channel_id=request.thread.channel,
                    thread_ts=request.thread.thread_ts,
                    status=request.status,
                ),
            )
        except SlackCallFailed as refused:
            activity.logger.info("no thread status: %s", refused.error)
            return False
        return True

    @activity.defn
    async def relay_answer(self, request: RelayInput) -> RelayResult:
        """Show the turn's answer in the thread until it is settled, or until this attempt creates
        a message (returned at once, so the workflow holds it before anything else happens)."""
        client = await self._client(request.thread)
        relay = _Relay(
            client,
            request,
            streams=self._streams,
            stored_answer=self.stored_answer,
            edit_interval_seconds=self._settings.bot_edit_interval_seconds,
            retried=activity.info().attempt > 1,
        )
        heartbeat = asyncio.create_task(_heartbeat_forever(relay.progress))
        try:
            return await relay.run()
        except SlackCallFailed as refused:
            raise ApplicationError(
                str(refused), type=SlackErrorType.REFUSED, non_retryable=True
            ) from None
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _client(self, thread: SlackThread) -> AsyncWebClient:
        async with self._sessions() as session:
            record = await integrations.get_integration(
                session, self._box, thread.organization_id, PLATFORM
            )
        if record is None or record.external_id != thread.team_id:
            raise ApplicationError(
                "the organization's Slack workspace is no longer connected",
                type=SlackErrorType.NOT_CONNECTED,
                non_retryable=True,
            )
        return web_client(record, self._settings)

    async def stored_answer(
        self, organization_id: str, turn_id: str
    ) -> tuple[str | None, str | None, str]:
        """The turn's status, its answer's status and the answer's stored text (None, None, ""
        when the turn is gone)."""
        async with self._sessions() as session:
            turn = await chats.get_turn_by_id(session, organization_id, turn_id)
            if turn is None:
                return None, None, ""
            message = await chats.get_message(session, organization_id, turn.assistant_message_id)
        if message is None:
            return turn.status, None, ""
        return turn.status, message.status, answer_text(message.parts)


def web_client(record: IntegrationRecord, settings: Settings) -> AsyncWebClient:
    """A Web API client for the integration's workspace, without retries of its own."""
    return AsyncWebClient(
        token=record.secrets[BOT_TOKEN],
        base_url=settings.slack_api_url,
        timeout=CALL_TIMEOUT_SECONDS,
        retry_handlers=[],
    )


async def _heartbeat_forever(progress: Callable[[], dict[str, Any]]) -> None:
    # Apart from the Slack calls, so a slow call cannot make a live attempt look dead.
    while True:
        activity.heartbeat(progress())
        await asyncio.sleep(HEARTBEAT_SECONDS)


# Turn statuses that mean the turn ended, as the relay reads them when the stream says nothing.
_ENDED: Final[dict[str, Outcome]] = {
    TurnStatus.COMPLETED.value: "finish",
    TurnStatus.ABORTED.value: "abort",
    TurnStatus.REJECTED.value: "abort",
    TurnStatus.FAILED.value: "error",
}


class _Relay:
    """One attempt of `relay_answer`: the reply's messages and how to bring them to a text."""

    def __init__(
        self,
        client: AsyncWebClient,
        request: RelayInput,
        *,
        streams: TurnStreams,
        stored_answer: StoredAnswer,
        edit_interval_seconds: float,
        retried: bool,
    ) -> None:
        self._client = client
        self._thread = request.thread
        self._turn_id = request.turn_id
        self._streams = streams
        self._stored_answer = stored_answer
        self._interval = edit_interval_seconds
        self.messages = [dataclasses.replace(message) for message in request.messages]
        self.streaming_available = request.streaming_available
        # Each message's text, once the answer's text shows it is what the message was left with
        # (`_text_of`); None until then.
        self._texts: list[str | None] = [None] * len(self.messages)
        # What a failed attempt may have written without this one knowing: an open stream may
        # hold more than recorded, and the last message may have been edited. Each is rewritten
        # whole (a stream stopped first) before anything is appended to it again.
        self._unsure: set[int] = set()
        if retried and self.messages:
            self._unsure = {
                index for index, message in enumerate(self.messages) if message.streaming
            } | {len(self.messages) - 1}

    def progress(self) -> dict[str, Any]:
        """The heartbeat: which messages exist and how much text each holds (never the text)."""
        return {
            "messages": [
                {"ts": message.ts, "chars": message.chars, "streaming": message.streaming}
                for message in self.messages
            ]
        }

    def _result(self, outcome: Outcome | None = None) -> RelayResult:
        return RelayResult(
            messages=self.messages,
            streaming_available=self.streaming_available,
            outcome=outcome,
        )

    def _text_of(self, index: int, piece: str) -> str | None:
        """What message `index` holds, if known: recorded by this attempt, or the start of `piece`
        when that matches what an earlier attempt recorded."""
        known = self._texts[index]
        if known is None and index not in self._unsure:
            message = self.messages[index]
            start = piece[: message.chars]
            if len(start) == message.chars and text_digest(start) == message.digest:
                known = self._texts[index] = start
        return known

    def _holds(self, index: int, text: str, **state: Any) -> None:
        message = self.messages[index]
        message.chars, message.digest = len(text), text_digest(text)
        for name, value in state.items():
            setattr(message, name, value)
        self._texts[index] = text
        self._unsure.discard(index)

    async def run(self) -> RelayResult:
        organization_id = self._thread.organization_id
        follower = TurnFollower(self._streams, organization_id, self._turn_id)
        # Catch up with the stream first: a message is never rewritten to a text the stream had
        # only partly given back.
        while await follower.advance(0):
            activity.heartbeat(self.progress())
        started = last_entry = time.monotonic()
        last_write = float("-inf")
        last_check = started
        while True:
            if await follower.advance():
                last_entry = time.monotonic()
            progress = follower.progress
            if follower.finished:
                assert progress.ended is not None
                return await self._settle(progress.ended, progress.text)
            if progress.ended == "paused":
                return await self._settle("paused", progress.text)
            now = time.monotonic()
            if now - last_entry >= IDLE_CHECK_SECONDS and now - last_check >= IDLE_CHECK_SECONDS:
                last_check = now
                turn_status, _, _ = await self._stored_answer(organization_id, self._turn_id)
                if turn_status is None:
                    return self._result("gone")
                if turn_status in _ENDED:
                    return await self._settle(_ENDED[turn_status], progress.text)
            pieces = split_text(progress.text)
            if (self._unsure or now - last_write >= self._interval) and self._differs(pieces):
                last_write = now
                if await self._sync(pieces, final=False):
                    return self._result()
            if now - started >= RELAY_SLICE_SECONDS:
                return self._result()

    def _differs(self, pieces: list[str]) -> bool:
        if self._unsure or len(pieces) > len(self.messages):
            return True
        if any(self._stream_aged(message) for message in self.messages):
            return True
        return any(self._text_of(index, piece) != piece for index, piece in enumerate(pieces))

    async def _settle(self, outcome: Outcome, streamed_text: str) -> RelayResult:
        """Bring the thread to the turn's final text (or to its paused text), stopping every
        stream. Returns with the outcome once it is shown, or without one when it created a
        message on the way (the next attempt goes on)."""
        text = streamed_text
        if outcome != "paused":
            stored = await self._stored_text()
            if stored is None:
                return self._result("gone")
            text = stored
        if await self._sync(split_text(shown_text(text, outcome)), final=True):
            return self._result()
        return self._result(outcome)

    async def _stored_text(self) -> str | None:
        """The ended turn's stored answer, once stored (its stream may say it ended a moment
        before: a stop publishes `abort` first)."""
        deadline = time.monotonic() + STORED_WAIT_SECONDS
        while True:
            turn_status, message_status, text = await self._stored_answer(
                self._thread.organization_id, self._turn_id
            )
            if turn_status is None:
                return None
            if message_status != MessageStatus.STREAMING.value:
                return text
            if time.monotonic() > deadline:
                raise ApplicationError(
                    "the turn ended but its answer is not stored yet",
                    type=SlackErrorType.UNAVAILABLE,
                )
            await asyncio.sleep(0.25)

    def _stream_aged(self, message: PostedMessage) -> bool:
        started = message.stream_started_at
        return (
            message.streaming
            and started is not None
            and time.time() - started >= STREAM_LIFETIME_SECONDS
        )

    async def _sync(self, pieces: list[str], *, final: bool) -> bool:
        """Make message i hold piece i, oldest first; True when a message was created (the attempt
        returns then). While the answer runs, only its last message streams; `final` stops them
        all, and removes messages past the last piece (a retried step's text can shrink)."""
        for index, piece in enumerate(pieces):
            if index == len(self.messages):
                if not piece.strip():
                    return False  # Slack refuses an empty message: wait for text
                await self._create(piece, stream=self.streaming_available and not final)
                return True
            if not final and index not in self._unsure and self._shrank(index, piece):
                # The answer shrank to a prefix of what is shown (a retried step streams again):
                # it usually grows back the same, so the message waits rather than shrink.
                continue
            keep_streaming = not final and index == len(pieces) - 1
            await self._write(index, piece, keep_streaming=keep_streaming)
        if final:
            while len(self.messages) > len(pieces):
                await self._delete(self.messages[-1])
                self.messages.pop()
                self._texts.pop()
        return False

    def _shrank(self, index: int, piece: str) -> bool:
        known = self._texts[index]
        if known is None:
            return len(piece) < self.messages[index].chars
        return known != piece and known.startswith(piece)

    async def _create(self, piece: str, *, stream: bool) -> None:
        thread = self._thread
        if stream:
            try:
                answer = await slack_call(
                    "chat.startStream",
                    self._client.chat_startStream(
                        channel=thread.channel,
                        thread_ts=thread.thread_ts,
                        markdown_text=piece,
                        recipient_team_id=thread.team_id if thread.user_id else None,
                        recipient_user_id=thread.user_id,
                    ),
                )
                self.messages.append(
                    posted(str(answer["ts"]), piece, streaming=True, stream_started_at=time.time())
                )
                self._texts.append(piece)
                return
            except SlackCallFailed as refused:
                # Streaming is not offered here (an older workspace, no recipient, a channel kind
                # it does not cover): the reply posts and edits instead, from now on.
                activity.logger.info("streaming refused (%s): posting and editing", refused.error)
                self.streaming_available = False
        answer = await slack_call(
            "chat.postMessage",
            self._client.chat_postMessage(
                channel=thread.channel, thread_ts=thread.thread_ts, markdown_text=piece
            ),
        )
        self.messages.append(posted(str(answer["ts"]), piece))
        self._texts.append(piece)

    async def _write(self, index: int, piece: str, *, keep_streaming: bool) -> None:
        message = self.messages[index]
        known = self._text_of(index, piece)
        if message.streaming and known is not None and piece.startswith(known):
            new = piece[len(known) :]
            channel = self._thread.channel
            if keep_streaming and not self._stream_aged(message):
                if not new or await self._on_stream(
                    message,
                    "chat.appendStream",
                    self._client.chat_appendStream(
                        channel=channel, ts=message.ts, markdown_text=new
                    ),
                ):
                    self._holds(index, piece)
                    return
            elif await self._on_stream(
                message,
                "chat.stopStream",
                self._client.chat_stopStream(
                    channel=channel, ts=message.ts, markdown_text=new or None
                ),
            ):
                self._holds(index, piece, streaming=False)
                return
        if message.streaming:
            await self._stop_stream(message)
        if known != piece:
            await self._update(message, piece)
        self._holds(index, piece)

    async def _on_stream(
        self, message: PostedMessage, method: str, call: Awaitable[AsyncSlackResponse]
    ) -> bool:
        """A call on the message's stream; False when Slack had ended the stream (it expired, or
        the user stopped it in Slack, which stops the turn too): the message goes on with
        chat.update."""
        try:
            await slack_call(method, call)
        except SlackCallFailed as refused:
            if refused.error not in STREAM_OVER:
                raise
            message.streaming = False
            if refused.error == "stopped_by_user":
                await self._streams.request_stop(self._thread.organization_id, self._turn_id)
            return False
        return True

    async def _stop_stream(self, message: PostedMessage) -> None:
        await self._on_stream(
            message,
            "chat.stopStream",
            self._client.chat_stopStream(channel=self._thread.channel, ts=message.ts),
        )
        message.streaming = False

    async def _update(self, message: PostedMessage, piece: str) -> None:
        try:
            await slack_call(
                "chat.update",
                self._client.chat_update(
                    channel=self._thread.channel, ts=message.ts, markdown_text=piece
                ),
            )
        except SlackCallFailed as refused:
            if refused.error != "streaming_state_conflict":
                raise
            # Still streaming on Slack's side (an earlier attempt's stream): stop it, then edit.
            await self._stop_stream(message)
            await slack_call(
                "chat.update",
                self._client.chat_update(
                    channel=self._thread.channel, ts=message.ts, markdown_text=piece
                ),
            )

    async def _delete(self, message: PostedMessage) -> None:
        if message.streaming:
            await self._stop_stream(message)
        try:
            await slack_call(
                "chat.delete", self._client.chat_delete(channel=self._thread.channel, ts=message.ts)
            )
        except SlackCallFailed as refused:
            if refused.error != "message_not_found":
                raise
