"""Discord reply activities: edit a turn's answer into the `/ask` it answers as it streams. Never imports api or workflows.

One activity follows the turn's Redis Stream and keeps Discord's copy of the answer in line with
it: the interaction's original response first, follow-ups past 2,000 characters, and once the
interaction token nears its 15-minute end (or Discord refuses it), messages the bot posts in the
channel with its own token. A turn a plain message started (bots/discord_gateway.py) has no
interaction: its answer is bot messages in the channel from the start, the first replying to the
message. At most one call is in flight, edits are paced by `bot_edit_interval_seconds` and by
Discord's rate-limit answers, and the final text is the stored answer read from Postgres.

Which messages hold what is recorded after every call that creates or changes one: in Redis at
once, and in the activity's heartbeat. A retried attempt (a worker killed mid-relay) starts from
that record and edits the same messages, so the reply arrives once. The record holds message ids,
lengths and digests, never text; the interaction token reaches this module sealed (the workflow's
history never holds it) and never appears in a URL httpx logs or in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.turn_follow import POLL_SECONDS, TurnFollower, TurnText
from core.contracts import MessageStatus, TurnStatus
from core.secrets import SecretBox
from core.settings import Settings
from storage import chats, integrations
from storage.streams import TurnStreams

# Discord's limit on a message's `content`, in characters.
MESSAGE_LIMIT = 2000
# Interaction tokens live 15 minutes; the relay leaves them a minute early, so the last edit it
# makes with one (trimming the message to a word boundary) still lands.
TOKEN_LIFETIME = timedelta(minutes=14)
# `ApplicationError.type` values of the reply workflow's activity.
DISCORD_REFUSED = "DiscordRefused"  # a 4xx other than rate limits: retrying cannot help
DISCORD_UNAVAILABLE = "DiscordUnavailable"  # 5xx or the network: Temporal retries
# A rate-limit wait longer than this ends the attempt, and Temporal retries after it instead.
MAX_LOCAL_WAIT_SECONDS = 60.0
# How long the turn's stream may stay silent before the relay asks Postgres whether the turn is
# over (its stream expired, or it was dropped from a queue before it ran).
SILENT_STREAM_CHECK_SECONDS = 5.0
HEARTBEAT_SECONDS = 1.0
PAUSED_POLL_SECONDS = 2.0
# How long the relay's record of its messages is kept in Redis: longer than any relay runs.
PROGRESS_TTL_SECONDS = 2 * 86_400
STOPPED_NOTE = " *(stopped)*"
FAILED_NOTE = "⚠️ *Sorry, this answer failed. Try again with /ask.*"
EMPTY_ANSWER = "*(no text in this answer)*"
# Unreserved characters only, so the URL carries it unencoded and the transport finds it.
TOKEN_PLACEHOLDER = "__interaction_token__"  # noqa: S105 - a placeholder, replaced on the way out
USER_AGENT = "DiscordBot (https://github.com/durachat/durachat, 0.1)"


@dataclass
class DiscordReplyInput:
    """What the reply workflow needs: ids, and the interaction token sealed (SecretBox)."""

    organization_id: str
    application_id: str
    # The Discord channel (or thread) the interaction came from, for bot-token messages.
    channel_id: str
    turn_id: str
    assistant_message_id: str
    sealed_token: str
    # When the interaction arrived (unix seconds): its token expires 15 minutes later.
    token_issued_at: float
    # A turn started by a plain message (the Gateway process) has no interaction: `sealed_token`
    # is empty and the answer is posted in the channel with the bot token from the start, its
    # first message replying to this one.
    reply_to_message_id: str | None = None


@dataclass
class DiscordReplyResult:
    messages: int
    # Whether part of the answer went out as bot messages in the channel (the token ran out).
    via_channel: bool
    ended: str


@dataclass
class HeldMessage:
    """A Discord message holding part of the answer: its id (`@original` for the interaction's
    response), how it was sent, and the length and digest of the text it holds."""

    id: str
    via: Literal["token", "channel"]
    length: int = 0
    digest: str = ""


@dataclass
class RelayProgress:
    messages: list[HeldMessage] = field(default_factory=lambda: [HeldMessage("@original", "token")])
    # The token is no longer used: the rest of the answer goes to channel messages.
    token_retired: bool = False
    # The answer's text the token messages hold (the channel messages continue after it).
    token_prefix_length: int = 0
    token_prefix_digest: str = ""
    # The original response's message id, which the first channel message replies to.
    original_message_id: str | None = None
    # How the turn ended, once the final text is shown.
    ended: str | None = None

    def of(self, via: str) -> list[HeldMessage]:
        return [message for message in self.messages if message.via == via]

    @classmethod
    def load(cls, data: Any) -> RelayProgress | None:
        """A record written by `asdict`; None when it is not one (written by another version)."""
        if not isinstance(data, dict):
            return None
        try:
            messages = [HeldMessage(**message) for message in data.get("messages", [])]
            known = {name: value for name, value in data.items() if name in _PROGRESS_FIELDS}
            return cls(**{**known, "messages": messages})
        except TypeError:
            return None


_PROGRESS_FIELDS = frozenset(RelayProgress.__dataclass_fields__)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`text` cut into pieces of at most `limit` characters that concatenate back to it: after the
    last line break in a piece's second half, else after its last space, else at the limit.

    Each piece depends only on the text up to its end, so the pieces of a growing answer stay as
    they were: only the last one changes as the answer streams.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        window = text[start : start + limit]
        cut = window.rfind("\n", limit // 2) + 1 or window.rfind(" ", limit // 2) + 1 or limit
        pieces.append(window[:cut])
        start += cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def answer_text(parts: list[dict[str, Any]]) -> str:
    """A stored answer's text as the stream follower assembles it: each step's text, steps apart."""
    steps: list[str] = [""]
    for part in parts:
        if part.get("type") == "step-start" and steps[-1]:
            steps.append("")
        elif part.get("type") == "text":
            steps[-1] += str(part.get("text", ""))
    return "\n\n".join(step.strip() for step in steps if step.strip())


def streaming_document(progress: TurnText) -> str:
    """What Discord shows while the answer streams: its text, and a status line under it."""
    note = None
    if progress.ended == "paused":
        note = "waiting for input in durachat"
    elif progress.status:
        note = progress.status[:200]
    if note is None:
        return progress.text
    return f"{progress.text}\n\n-# {note}" if progress.text else f"-# {note}"


def final_document(text: str, ending: str) -> str:
    """What Discord shows once the turn has ended."""
    text = text.strip()
    if ending == "abort":
        return (text + STOPPED_NOTE) if text else STOPPED_NOTE.strip()
    if ending == "error":
        return f"{text}\n\n{FAILED_NOTE}" if text else FAILED_NOTE
    return text or EMPTY_ANSWER


def trimmed_to_word(piece: str) -> str:
    """The piece up to its last line break or space, so the next message starts on a whole word."""
    cut = max(piece.rfind("\n"), piece.rfind(" ")) + 1
    return piece[:cut] if cut > 0 and piece[:cut].strip() else piece


class TokenRejected(Exception):
    """Discord refused the interaction token (401/403/404): it expired or was revoked."""


class TokenHidingTransport(httpx.AsyncBaseTransport):
    """Puts the interaction token into the URL only on the way out, so httpx's request log and
    every error about the request name a placeholder instead."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path
        placeholder = TOKEN_PLACEHOLDER.encode()
        if placeholder in raw_path:
            real = request.url.copy_with(
                raw_path=raw_path.replace(placeholder, self._token.encode())
            )
            request = httpx.Request(
                request.method,
                real,
                headers=request.headers,
                stream=request.stream,
                extensions=request.extensions,
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class DiscordRest:
    """One activity attempt's calls to Discord's REST API, one at a time, paced by its rate-limit
    headers: a bucket with nothing remaining waits out `X-RateLimit-Reset-After`, a 429 its
    `retry_after`, then the call is made again."""

    def __init__(
        self, http: httpx.AsyncClient, *, bot_token: str | None, keep_alive: Callable[[], None]
    ) -> None:
        self._http = http
        self._bot_token = bot_token
        self._keep_alive = keep_alive
        self._not_before = 0.0

    async def call(
        self, method: str, path: str, label: str, *, body: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """`label` names the call in errors and logs (the path may hold the token's placeholder)."""
        webhook = path.startswith("/webhooks/")
        headers = {"User-Agent": USER_AGENT}
        if not webhook:
            if self._bot_token is None:
                raise ApplicationError(
                    "the Discord integration is gone: no bot token to post with",
                    type=DISCORD_REFUSED,
                    non_retryable=True,
                )
            headers["Authorization"] = f"Bot {self._bot_token}"
        while True:
            await self._wait(self._not_before - time.monotonic())
            try:
                response = await self._http.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                raise ApplicationError(
                    f"Discord could not be reached ({label}): {type(exc).__name__}",
                    type=DISCORD_UNAVAILABLE,
                ) from None
            self._note_bucket(response)
            if response.status_code == 429:
                retry_after = _retry_after(response)
                if retry_after > MAX_LOCAL_WAIT_SECONDS:
                    raise ApplicationError(
                        f"Discord rate-limited {label} for {retry_after:.0f} s",
                        type=DISCORD_UNAVAILABLE,
                        next_retry_delay=timedelta(seconds=retry_after),
                    )
                activity.logger.info("discord rate-limited %s for %.2f s", label, retry_after)
                self._not_before = max(self._not_before, time.monotonic() + retry_after)
                continue
            if response.status_code >= 500:
                raise ApplicationError(
                    f"Discord answered {response.status_code} to {label}", type=DISCORD_UNAVAILABLE
                )
            if webhook and response.status_code in (401, 403, 404):
                raise TokenRejected(label)
            if response.status_code >= 400:
                raise ApplicationError(
                    f"Discord refused {label}: {response.status_code} {_error_code(response)}",
                    type=DISCORD_REFUSED,
                    non_retryable=True,
                )
            if response.status_code == 204 or not response.content:
                return None
            answer = response.json()
            return answer if isinstance(answer, dict) else None

    def _note_bucket(self, response: httpx.Response) -> None:
        remaining = response.headers.get("X-RateLimit-Remaining")
        reset_after = response.headers.get("X-RateLimit-Reset-After")
        if remaining is None or reset_after is None:
            return
        try:
            if int(remaining) <= 0:
                self._not_before = max(self._not_before, time.monotonic() + float(reset_after))
        except ValueError:
            return

    async def _wait(self, seconds: float) -> None:
        # Waits can outlast the heartbeat timeout: heartbeat through them.
        while seconds > 0:
            self._keep_alive()
            step = min(seconds, HEARTBEAT_SECONDS)
            await asyncio.sleep(step)
            seconds -= step


def _retry_after(response: httpx.Response) -> float:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
            return max(0.0, float(body["retry_after"]))
    except ValueError:
        pass
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return f"(code {body.get('code')})" if isinstance(body, dict) and "code" in body else ""


class _Relay:
    """Keeps Discord's messages in line with the answer's text, recording each change."""

    def __init__(
        self,
        rest: DiscordRest,
        request: DiscordReplyInput,
        progress: RelayProgress,
        save: Callable[[], Any],
    ) -> None:
        self._rest = rest
        self._request = request
        self.progress = progress
        self._save = save
        self._webhook = f"/webhooks/{request.application_id}/{TOKEN_PLACEHOLDER}"
        self._channel = f"/channels/{request.channel_id}/messages"

    async def show(self, document: str, *, final: bool = False) -> None:
        """Make Discord's messages hold `document`. Messages it no longer needs (a retried
        generation starts its text again) are deleted only once the answer is final: while it
        streams they are about to be needed again."""
        if not self.progress.token_retired:
            try:
                await self._sync_token(split_message(document), drop_extra=final)
                return
            except TokenRejected:
                activity.logger.info(
                    "discord refused the interaction token: going on in the channel"
                )
                await self.retire_token(None)
        await self._sync_channel(document, drop_extra=final)

    async def retire_token(self, document: str | None) -> None:
        """Stop using the interaction token. With `document`, the token's messages first get it,
        the last one cut back to a word boundary, so the channel messages go on from a whole word."""
        if document is not None:
            pieces = split_message(document)
            try:
                if pieces:
                    pieces[-1] = trimmed_to_word(pieces[-1])
                    await self._sync_token(pieces)
                elif self.progress.messages[0].length == 0:
                    # Nothing shown yet: the deferred "thinking…" would otherwise stay forever.
                    await self._rest.call(
                        "PATCH",
                        f"{self._webhook}/messages/@original",
                        "edit original",
                        body={"content": "-# The answer follows in a new message."},
                    )
            except TokenRejected:
                pass
        held = self.progress.of("token")
        # The channel messages carry the rest of the answer only while it still begins with the
        # text the token's messages hold (see `_after_token_prefix`).
        self.progress.token_retired = True
        self.progress.token_prefix_length = sum(message.length for message in held)
        self.progress.token_prefix_digest = digest("".join(message.digest for message in held))
        await self._save()

    async def _sync_token(self, pieces: list[str], *, drop_extra: bool = False) -> None:
        held = self.progress.of("token")
        for index, piece in enumerate(pieces):
            if index < len(held):
                message = held[index]
                if message.digest == digest(piece) and message.length == len(piece):
                    continue
                answer = await self._rest.call(
                    "PATCH",
                    f"{self._webhook}/messages/{message.id}",
                    "edit original" if message.id == "@original" else "edit follow-up",
                    body={"content": piece},
                )
                if message.id == "@original" and answer and answer.get("id"):
                    self.progress.original_message_id = str(answer["id"])
            else:
                answer = await self._rest.call(
                    "POST", f"{self._webhook}?wait=true", "post follow-up", body={"content": piece}
                )
                if not answer or "id" not in answer:
                    raise ApplicationError(
                        "Discord answered a follow-up without its message",
                        type=DISCORD_UNAVAILABLE,
                    )
                message = HeldMessage(str(answer["id"]), "token")
                self.progress.messages.append(message)
            message.length, message.digest = len(piece), digest(piece)
            await self._save()
        if drop_extra:
            await self._drop_extra(held[max(len(pieces), 1) :], self._webhook + "/messages/")

    async def _sync_channel(self, document: str, *, drop_extra: bool = False) -> None:
        rest = self._after_token_prefix(document)
        pieces = split_message(rest)
        held = self.progress.of("channel")
        for index, piece in enumerate(pieces):
            if index < len(held):
                message = held[index]
                if message.digest == digest(piece) and message.length == len(piece):
                    continue
                await self._rest.call(
                    "PATCH",
                    f"{self._channel}/{message.id}",
                    "edit channel message",
                    body={"content": piece},
                )
            else:
                body: dict[str, Any] = {"content": piece}
                if index == 0 and self.progress.original_message_id is not None:
                    body["message_reference"] = {
                        "message_id": self.progress.original_message_id,
                        "fail_if_not_exists": False,
                    }
                answer = await self._rest.call(
                    "POST", self._channel, "post channel message", body=body
                )
                if not answer or "id" not in answer:
                    raise ApplicationError(
                        "Discord answered a channel message without its id",
                        type=DISCORD_UNAVAILABLE,
                    )
                message = HeldMessage(str(answer["id"]), "channel")
                self.progress.messages.append(message)
            message.length, message.digest = len(piece), digest(piece)
            await self._save()
        if drop_extra:
            await self._drop_extra(held[len(pieces) :], self._channel + "/")

    def _after_token_prefix(self, document: str) -> str:
        """The part of `document` the channel messages carry: what follows the text the token's
        messages hold, or all of it when the answer no longer begins with that text (a retried
        generation rewrote it)."""
        progress = self.progress
        held = progress.of("token")
        offset = 0
        digests = []
        for message in held:
            digests.append(digest(document[offset : offset + message.length]))
            offset += message.length
        if offset == progress.token_prefix_length and digest("".join(digests)) == (
            progress.token_prefix_digest
        ):
            return document[offset:]
        return document

    async def _drop_extra(self, extra: list[HeldMessage], prefix: str) -> None:
        """Delete messages a shorter answer no longer needs (a retried generation wrote less)."""
        for message in extra:
            with contextlib.suppress(TokenRejected):
                await self._rest.call("DELETE", prefix + message.id, "delete extra message")
            self.progress.messages.remove(message)
            await self._save()


class DiscordActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        box: SecretBox,
        settings: Settings,
        redis: Redis,
        *,
        token_lifetime: timedelta = TOKEN_LIFETIME,
    ) -> None:
        self._sessions = session_factory
        self._streams = streams
        self._box = box
        self._api_url = settings.discord_api_url.rstrip("/")
        self._edit_interval = settings.bot_edit_interval_seconds
        self._redis = redis
        self._token_lifetime = token_lifetime.total_seconds()

    # Named for its platform: activity names are one namespace per worker, and Slack's relay is
    # `relay_answer` too.
    @activity.defn(name="relay_discord_answer")
    async def relay_answer(self, request: DiscordReplyInput) -> DiscordReplyResult:
        """Edit the turn's answer into Discord as it streams, and its final text once it ends."""
        progress = await self._load_progress(request)
        if progress.ended is not None:
            return self._result(progress)
        token = str(self._box.open(request.sealed_token)["token"]) if request.sealed_token else ""
        bot_token = await self._bot_token(request)

        async def save() -> None:
            await self._save_progress(request, progress)

        def keep_alive() -> None:
            activity.heartbeat(asdict(progress))

        transport = TokenHidingTransport(token)
        async with httpx.AsyncClient(
            base_url=self._api_url, transport=transport, timeout=httpx.Timeout(15.0)
        ) as http:
            relay = _Relay(
                DiscordRest(http, bot_token=bot_token, keep_alive=keep_alive),
                request,
                progress,
                save,
            )
            follower = TurnFollower(self._streams, request.organization_id, request.turn_id)
            shown: str | None = None
            last_show = float("-inf")
            heard_from = time.monotonic()
            while not follower.finished:
                # A turn waiting for a person's approval may wait for hours: look less often.
                paused = follower.progress.ended == "paused"
                if await follower.advance(PAUSED_POLL_SECONDS if paused else POLL_SECONDS):
                    heard_from = time.monotonic()
                elif time.monotonic() - heard_from > SILENT_STREAM_CHECK_SECONDS:
                    if await self._turn_is_over(request):
                        break
                    heard_from = time.monotonic()
                keep_alive()
                document = streaming_document(follower.progress)
                if not progress.token_retired and time.time() >= (
                    request.token_issued_at + self._token_lifetime
                ):
                    await relay.retire_token(document)
                    shown = None
                if (
                    document.strip()
                    and document != shown
                    and time.monotonic() - last_show >= self._edit_interval
                ):
                    await relay.show(document)
                    shown, last_show = document, time.monotonic()
            text, ending = await self._final_text(request, follower.progress)
            final = final_document(text, ending)
            # The last edit keeps the pace too.
            await asyncio.sleep(max(0.0, last_show + self._edit_interval - time.monotonic()))
            await relay.show(final, final=True)
        progress.ended = ending
        await save()
        activity.logger.info(
            "discord reply of turn %s done in %d messages", request.turn_id, len(progress.messages)
        )
        return self._result(progress)

    def _result(self, progress: RelayProgress) -> DiscordReplyResult:
        return DiscordReplyResult(
            messages=len(progress.messages),
            via_channel=bool(progress.of("channel")),
            ended=progress.ended or "finish",
        )

    async def _bot_token(self, request: DiscordReplyInput) -> str | None:
        async with self._sessions() as session:
            record = await integrations.get_integration(
                session, self._box, request.organization_id, "discord"
            )
        if record is None or record.external_id != request.application_id:
            return None
        return record.secrets.get("botToken")

    async def _turn_is_over(self, request: DiscordReplyInput) -> bool:
        async with self._sessions() as session:
            turn = await chats.get_turn_by_id(session, request.organization_id, request.turn_id)
        return turn is not None and turn.status not in (TurnStatus.QUEUED, TurnStatus.RUNNING)

    async def _final_text(self, request: DiscordReplyInput, streamed: TurnText) -> tuple[str, str]:
        """The stored answer's text and how the turn ended; what the stream showed if nothing
        was stored (a queued turn dropped before it ran)."""
        async with self._sessions() as session:
            message = await chats.get_message(
                session, request.organization_id, request.assistant_message_id
            )
        endings = {
            MessageStatus.COMPLETE: "finish",
            MessageStatus.ABORTED: "abort",
            MessageStatus.FAILED: "error",
        }
        if message is not None and message.status in endings:
            return answer_text(message.parts), endings[MessageStatus(message.status)]
        return streamed.text, streamed.ended if streamed.ended in ("abort", "error") else "finish"

    def _progress_key(self, request: DiscordReplyInput) -> str:
        return f"discord:reply:{request.organization_id}:{request.turn_id}"

    async def _load_progress(self, request: DiscordReplyInput) -> RelayProgress:
        """Where an earlier attempt got to: Redis is written after every call, the heartbeat
        only every few seconds, so Redis wins when it has a record."""
        stored = await self._redis.get(self._progress_key(request))
        if stored is not None:
            loaded = RelayProgress.load(json.loads(stored))
            if loaded is not None:
                return loaded
        details = activity.info().heartbeat_details
        loaded = RelayProgress.load(details[0]) if details else None
        if loaded is not None:
            return loaded
        if not request.sealed_token:
            # No interaction to answer: channel messages from the start, replying to the message.
            return RelayProgress(
                messages=[],
                token_retired=True,
                token_prefix_digest=digest(""),
                original_message_id=request.reply_to_message_id,
            )
        return RelayProgress()

    async def _save_progress(self, request: DiscordReplyInput, progress: RelayProgress) -> None:
        await self._redis.set(
            self._progress_key(request),
            json.dumps(asdict(progress), separators=(",", ":")),
            ex=PROGRESS_TTL_SECONDS,
        )
        activity.heartbeat(asdict(progress))
