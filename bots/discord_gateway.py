"""The Discord Gateway process (`durachat discord-gateway`): bot mentions become turns, 🛑 stops them. Must never import the api's routers or the worker.

Discord sends plain messages and reactions to a bot only over its Gateway, a WebSocket the bot
keeps open. This process keeps one per connected application (every `discord` integration, read
again every minute, so applications connected, replaced or removed since are picked up), and acts
like the interactions endpoint: it starts turns through `api/bot_turns.py` and the reply workflow
that posts their answers, and leaves everything slow to Temporal.

- A message that mentions the bot (in a channel, a thread or a DM), from a person, becomes a turn of
  the channel's chat, idempotent on the message id, answered by a DiscordReplyWorkflow that posts
  bot messages in the channel, the first replying to the message.
- A 🛑 reaction on a message stops the running turn of its channel's chat.

The protocol: HELLO gives the heartbeat interval; the first heartbeat goes after a random part of
it, then one every interval, each carrying the last sequence number seen. IDENTIFY opens a session
(READY names it and the URL to resume it at); a dropped connection, a heartbeat Discord did not
acknowledge (a zombie connection) or Discord's RECONNECT resumes it (RESUME with the session id and
last sequence, and Discord replays what was missed); INVALID SESSION identifies again (resumes, if
Discord says the session may be) after 1 to 5 seconds. Close codes that no reconnect can fix (4004, a refused token; 4010 to 4014) stop that
application's connection, with an error logged, until its integration changes. Other failures
reconnect with backoff.

Only events on an application's own connection touch its organization's chats, and READY must name
that application. Bot tokens are never logged: the WebSocket's frame log (which would show
IDENTIFY) stays off and no URL holds a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import structlog
from sqlalchemy.exc import SQLAlchemyError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from activities.discord import USER_AGENT, DiscordReplyInput
from api.app import build_state
from api.bot_turns import start_channel_turn, start_reply_once, stop_channel_turn
from api.state import AppState
from core.errors import DurachatError
from core.secrets import SecretBox
from core.settings import Settings
from storage import integrations
from workflows.discord_reply import DiscordReplyWorkflow, reply_workflow_id

log = structlog.get_logger(__name__)

PLATFORM = "discord"
GATEWAY_QUERY = "v=10&encoding=json"

# Gateway opcodes.
DISPATCH = 0
HEARTBEAT = 1
IDENTIFY = 2
RESUME = 6
RECONNECT = 7
INVALID_SESSION = 9
HELLO = 10
HEARTBEAT_ACK = 11

# Messages in servers and DMs, and reactions in servers. Not the privileged MESSAGE_CONTENT:
# a message's text is then readable in DMs and when it mentions the bot, which is all this needs.
GUILD_MESSAGES = 1 << 9
GUILD_MESSAGE_REACTIONS = 1 << 10
DIRECT_MESSAGES = 1 << 12
INTENTS = GUILD_MESSAGES | GUILD_MESSAGE_REACTIONS | DIRECT_MESSAGES

# Close codes a reconnect cannot fix: the application's connection stops until its integration
# changes.
FATAL_CLOSE_CODES = {
    4004: "authentication failed",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents",
}
# Close codes after which the session is gone: the next connection identifies afresh.
SESSION_ENDING_CLOSE_CODES = {4007, 4009}
# How this process closes a connection it means to resume: Discord ends the session of a
# connection closed with 1000 or 1001, and keeps it for any other code.
RESUMABLE_CLOSE = 4900

STOP_EMOJI = "\N{OCTAGONAL SIGN}"
# DEFAULT and REPLY; the other types are system messages (joins, pins, thread starts).
PERSON_MESSAGE_TYPES = {0, 19}
REFRESH_SECONDS = 60.0
HELLO_TIMEOUT_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 60.0
# Failed attempts in a row after which a session is no longer resumed but identified afresh.
FORGET_SESSION_AFTER_FAILURES = 3
# Starting a turn is retried this often when Postgres, Redis or Temporal fail for a moment: the
# start is idempotent (the message id is its key), and the event is not delivered again.
START_ATTEMPTS = 4
# On shutdown, events already received get this long to finish starting their turns.
SHUTDOWN_GRACE_SECONDS = 5.0
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

# websockets logs every frame at DEBUG, IDENTIFY and RESUME (which carry the bot token) included;
# its connections log through this logger, which never logs below INFO.
_websocket_log = logging.getLogger("durachat.discord_gateway.websocket")


@dataclass(frozen=True)
class Application:
    """A connected Discord application: its organization, and its bot token (never in a repr)."""

    organization_id: str
    application_id: str
    bot_token: str = field(repr=False)


async def connected_applications(state: AppState) -> dict[str, Application]:
    """Every connected Discord application with a bot token, by application id."""
    async with state.sessions() as session:
        records = await integrations.list_integrations(
            session, SecretBox.from_settings(state.settings), PLATFORM
        )
    return {
        record.external_id: Application(
            record.organization_id, record.external_id, record.secrets["botToken"]
        )
        for record in records
        if record.secrets.get("botToken")
    }


class _Reconnect(Exception):
    """End this connection and open another: resuming the session, or identifying afresh."""

    def __init__(self, reason: str, *, resume: bool, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.resume = resume
        # None: the usual backoff.
        self.delay = delay


class _Fatal(Exception):
    """Discord refuses this application for good (a bad token, intents it may not have)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unavailable(Exception):
    """Discord's REST API could not give a Gateway URL for now (5xx, 429)."""


T = TypeVar("T")
EventHandler = Callable[[Application, str, str, dict[str, Any]], Awaitable[None]]


class GatewayConnection:
    """One application's Gateway session: connects, identifies or resumes, heartbeats, and hands
    the dispatches it receives to `handle`, one at a time and in order, so a channel's messages
    start their turns in the order they were written."""

    def __init__(
        self, application: Application, api_url: str, http: httpx.AsyncClient, handle: EventHandler
    ) -> None:
        self.application = application
        self._api_url = api_url.rstrip("/")
        self._http = http
        self._handle = handle
        self.session_id: str | None = None
        self.sequence: int | None = None
        self.resume_url: str | None = None
        self.bot_user_id: str | None = None
        self._failures = 0
        self._acknowledged = True
        self._zombie = False
        self._events: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self._log = log.bind(
            organization_id=application.organization_id,
            application_id=application.application_id,
        )
        _websocket_log.setLevel(max(logging.INFO, _websocket_log.getEffectiveLevel()))

    async def run(self) -> None:
        """Stay connected until cancelled, or until Discord refuses the application for good."""
        handler = asyncio.create_task(self._handle_events())
        try:
            while True:
                try:
                    await self._connect_once()
                except _Fatal as fatal:
                    self._log.error("discord_gateway.application_refused", reason=fatal.reason)
                    return
                except _Reconnect as again:
                    if not again.resume:
                        self.session_id = self.sequence = self.resume_url = None
                    delay = self._backoff() if again.delay is None else again.delay
                    self._log.info(
                        "discord_gateway.reconnecting",
                        reason=again.reason,
                        resume=again.resume,
                        delay_seconds=round(delay, 2),
                    )
                except (
                    OSError,
                    TimeoutError,
                    ConnectionClosed,
                    InvalidHandshake,
                    InvalidURI,
                    httpx.HTTPError,
                    _Unavailable,
                    ValueError,
                ) as exc:
                    delay = self._backoff()
                    if self._failures >= FORGET_SESSION_AFTER_FAILURES:
                        # The resume URL may be gone for good: a new session, from
                        # /gateway/bot's URL.
                        self.session_id = self.sequence = self.resume_url = None
                    self._log.warning(
                        "discord_gateway.connection_failed",
                        error=type(exc).__name__,
                        delay_seconds=round(delay, 2),
                    )
                except Exception:
                    # A payload this code did not expect: never the end of the application's
                    # connection.
                    delay = self._backoff()
                    self._log.exception(
                        "discord_gateway.connection_failed", delay_seconds=round(delay, 2)
                    )
                await asyncio.sleep(delay)
        finally:
            # Events already received still start their turns, for a few seconds.
            self._events.put_nowait(None)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(handler, SHUTDOWN_GRACE_SECONDS)

    def _backoff(self) -> float:
        """No wait after one failure, then 0.5 to 1 s doubling up to a minute: reconnects after a
        Discord outage spread out instead of arriving together."""
        self._failures += 1
        if self._failures == 1:
            return 0.0
        return min(MAX_BACKOFF_SECONDS, 2.0 ** (self._failures - 2)) * random.uniform(0.5, 1.0)

    async def _connect_once(self) -> None:
        resume = self.session_id is not None and self.sequence is not None and bool(self.resume_url)
        base = self.resume_url if resume and self.resume_url else await self._gateway_url()
        url = f"{base}{'&' if '?' in base else '?'}{GATEWAY_QUERY}"
        async with connect(
            url,
            # Discord's own heartbeat (below) finds dead connections.
            ping_interval=None,
            close_timeout=5,
            max_size=MAX_PAYLOAD_BYTES,
            user_agent_header=USER_AGENT,
            logger=_websocket_log,
        ) as websocket:
            try:
                await self._session(websocket, resume=resume)
            except _Reconnect as again:
                # Any code but 1000 keeps the session for RESUME.
                await websocket.close(RESUMABLE_CLOSE if again.resume else 1000)
                raise

    async def _gateway_url(self) -> str:
        """The Gateway's URL, from `GET /gateway/bot`; waits out an exhausted identify budget."""
        response = await self._http.get(
            f"{self._api_url}/gateway/bot",
            headers={
                "Authorization": f"Bot {self.application.bot_token}",
                "User-Agent": USER_AGENT,
            },
        )
        if response.status_code in (401, 403):
            raise _Fatal(f"Discord refused the bot token ({response.status_code})")
        if response.status_code >= 300:
            raise _Unavailable(f"GET /gateway/bot answered {response.status_code}")
        body = response.json()
        url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            raise _Unavailable("GET /gateway/bot named no URL")
        limit = body.get("session_start_limit")
        if isinstance(limit, dict) and limit.get("remaining") == 0:
            wait = float(limit.get("reset_after") or 0) / 1000
            self._log.warning("discord_gateway.identify_budget_spent", wait_seconds=round(wait))
            await asyncio.sleep(wait)
        return url

    async def _session(self, websocket: ClientConnection, *, resume: bool) -> None:
        try:
            hello = await asyncio.wait_for(self._receive(websocket), HELLO_TIMEOUT_SECONDS)
            if hello.get("op") != HELLO or not isinstance(hello.get("d"), dict):
                raise _Reconnect("the Gateway did not say HELLO", resume=resume)
            interval = float(hello["d"]["heartbeat_interval"]) / 1000
            self._acknowledged, self._zombie = True, False
            beating = asyncio.create_task(self._heartbeat(websocket, interval))
            try:
                await self._send(websocket, *self._opening(resume))
                while True:
                    await self._on_payload(websocket, await self._receive(websocket))
            finally:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
        except ConnectionClosed as closed:
            raise self._after_close(closed) from None

    def _opening(self, resume: bool) -> tuple[int, dict[str, Any]]:
        """RESUME of the session, or IDENTIFY for a new one."""
        token = self.application.bot_token
        if resume:
            return RESUME, {"token": token, "session_id": self.session_id, "seq": self.sequence}
        properties = {"os": sys.platform, "browser": "durachat", "device": "durachat"}
        return IDENTIFY, {"token": token, "intents": INTENTS, "properties": properties}

    def _after_close(self, closed: ConnectionClosed) -> Exception:
        if self._zombie:
            return _Reconnect("no heartbeat ACK", resume=True, delay=0.0)
        code = closed.rcvd.code if closed.rcvd is not None else None
        if code in FATAL_CLOSE_CODES:
            return _Fatal(f"Discord closed the connection: {code} {FATAL_CLOSE_CODES[code]}")
        return _Reconnect(f"closed ({code})", resume=code not in SESSION_ENDING_CLOSE_CODES)

    async def _heartbeat(self, websocket: ClientConnection, interval: float) -> None:
        # The first beat after a random part of the interval, as Discord asks, so that clients
        # reconnecting together do not beat together.
        await asyncio.sleep(interval * random.random())
        with contextlib.suppress(ConnectionClosed):
            while True:
                if not self._acknowledged:
                    # A zombie connection: Discord no longer answers. Closing ends the receive
                    # loop, and the next connection resumes.
                    self._zombie = True
                    await websocket.close(RESUMABLE_CLOSE, "no heartbeat ACK")
                    return
                self._acknowledged = False
                await self._send(websocket, HEARTBEAT, self.sequence)
                await asyncio.sleep(interval)

    async def _on_payload(self, websocket: ClientConnection, payload: dict[str, Any]) -> None:
        op = payload.get("op")
        if op == DISPATCH:
            if isinstance(payload.get("s"), int):
                self.sequence = payload["s"]
            kind = str(payload.get("t"))
            data = payload.get("d")
            if not isinstance(data, dict):
                return
            if kind == "READY":
                self._ready(data)
            elif kind == "RESUMED":
                self._failures = 0
                self._log.info("discord_gateway.resumed", session_id=self.session_id)
            elif kind in ("MESSAGE_CREATE", "MESSAGE_REACTION_ADD"):
                self._events.put_nowait((kind, data))
        elif op == HEARTBEAT:
            await self._send(websocket, HEARTBEAT, self.sequence)
        elif op == HEARTBEAT_ACK:
            self._acknowledged = True
        elif op == RECONNECT:
            raise _Reconnect("Discord asked for a reconnect", resume=True, delay=0.0)
        elif op == INVALID_SESSION:
            # Discord asks for a pause of 1 to 5 s before identifying again.
            raise _Reconnect(
                "invalid session", resume=payload.get("d") is True, delay=random.uniform(1, 5)
            )

    def _ready(self, data: dict[str, Any]) -> None:
        application = data.get("application")
        named = application.get("id") if isinstance(application, dict) else None
        if named is not None and str(named) != self.application.application_id:
            # Another application's token: its events are not this organization's to act on.
            raise _Fatal("the bot token belongs to another application")
        user = data.get("user")
        self.bot_user_id = str(user.get("id")) if isinstance(user, dict) else None
        self.session_id = str(data.get("session_id"))
        resume_url = data.get("resume_gateway_url")
        self.resume_url = resume_url if isinstance(resume_url, str) and resume_url else None
        self._failures = 0
        self._log.info(
            "discord_gateway.ready", session_id=self.session_id, bot_user_id=self.bot_user_id
        )

    async def _handle_events(self) -> None:
        while (event := await self._events.get()) is not None:
            kind, data = event
            if self.bot_user_id is None:
                continue
            try:
                await self._handle(self.application, self.bot_user_id, kind, data)
            except Exception:
                self._log.exception("discord_gateway.event_failed", event=kind)

    async def _receive(self, websocket: ClientConnection) -> dict[str, Any]:
        while True:
            payload = json.loads(await websocket.recv())
            if isinstance(payload, dict):
                return payload

    async def _send(self, websocket: ClientConnection, op: int, data: Any) -> None:
        await websocket.send(json.dumps({"op": op, "d": data}, separators=(",", ":")))


class ChannelEvents:
    """What the dispatches do: a mention starts a turn and its reply, a 🛑 stops a turn."""

    def __init__(self, state: AppState, http: httpx.AsyncClient) -> None:
        self._state = state
        self._http = http
        self._api_url = state.settings.discord_api_url.rstrip("/")

    async def __call__(
        self, application: Application, bot_user_id: str, kind: str, data: dict[str, Any]
    ) -> None:
        if kind == "MESSAGE_CREATE":
            await self.message(application, bot_user_id, data)
        elif kind == "MESSAGE_REACTION_ADD":
            await self.reaction(application, bot_user_id, data)

    async def message(
        self, application: Application, bot_user_id: str, data: dict[str, Any]
    ) -> None:
        author = data.get("author")
        if (
            not isinstance(author, dict)
            or author.get("bot")
            or str(author.get("id")) == bot_user_id
            or data.get("webhook_id")
        ):
            return  # bots (this one included) and webhooks never start turns
        if data.get("type", 0) not in PERSON_MESSAGE_TYPES:
            return
        mentions = data.get("mentions") or []
        if not any(
            isinstance(user, dict) and str(user.get("id")) == bot_user_id for user in mentions
        ):
            return
        message_id, channel_id = str(data.get("id", "")), str(data.get("channel_id", ""))
        text = re.sub(rf"<@!?{re.escape(bot_user_id)}>", " ", str(data.get("content", ""))).strip()
        if not message_id or not channel_id or not text:
            return
        guild_id = data.get("guild_id")
        channel = f"{guild_id or 'dm'}:{channel_id}"
        where = {
            "organization_id": application.organization_id,
            "application_id": application.application_id,
            "channel": channel,
            "message_id": message_id,
        }
        try:
            turn_id = await _retried(
                lambda: self._start_answer(application, channel, channel_id, message_id, text),
                what="discord_gateway.start_failed",
                **where,
            )
        except DurachatError as refused:
            # A refusal the chat endpoints would give (a spent budget, a message too long, too
            # many running turns) is the asker's to read.
            log.info("discord_gateway.turn_refused", status=refused.status_code, **where)
            await self._post_notice(
                application,
                channel_id,
                message_id,
                f"durachat could not start this answer: {refused.detail}",
            )
            return
        if turn_id is not None:
            log.info("discord_gateway.turn_started", turn_id=turn_id, **where)

    async def _start_answer(
        self,
        application: Application,
        channel: str,
        channel_id: str,
        message_id: str,
        text: str,
    ) -> str:
        state = self._state
        accepted = await start_channel_turn(
            state,
            organization_id=application.organization_id,
            source=PLATFORM,
            channel_id=channel,
            text=text,
            event_key=f"message:{message_id}",
        )
        reply = DiscordReplyInput(
            organization_id=application.organization_id,
            application_id=application.application_id,
            channel_id=channel_id,
            turn_id=accepted.turn_id,
            assistant_message_id=accepted.assistant_message_id,
            # No interaction: the answer is posted with the bot token from the start.
            sealed_token="",
            token_issued_at=time.time(),
            reply_to_message_id=message_id,
        )
        await start_reply_once(
            state, DiscordReplyWorkflow.run, reply, workflow_id=reply_workflow_id(accepted.turn_id)
        )
        return accepted.turn_id

    async def reaction(
        self, application: Application, bot_user_id: str, data: dict[str, Any]
    ) -> None:
        emoji = data.get("emoji")
        name = emoji.get("name") if isinstance(emoji, dict) else None
        if not isinstance(name, str) or name.replace("\N{VARIATION SELECTOR-16}", "") != STOP_EMOJI:
            return
        member = data.get("member")
        user = member.get("user") if isinstance(member, dict) else None
        if str(data.get("user_id")) == bot_user_id or (isinstance(user, dict) and user.get("bot")):
            return
        channel_id = str(data.get("channel_id", ""))
        if not channel_id:
            return
        channel = f"{data.get('guild_id') or 'dm'}:{channel_id}"
        stopped = await _retried(
            lambda: stop_channel_turn(
                self._state,
                organization_id=application.organization_id,
                source=PLATFORM,
                channel_id=channel,
            ),
            what="discord_gateway.stop_failed",
            application_id=application.application_id,
            channel=channel,
        )
        log.info(
            "discord_gateway.stop_reaction",
            organization_id=application.organization_id,
            application_id=application.application_id,
            channel=channel,
            stopped_turn_id=stopped,
        )

    async def _post_notice(
        self, application: Application, channel_id: str, message_id: str, text: str
    ) -> None:
        """Best effort: a notice the asker may miss is better than a Gateway that stalls."""
        try:
            response = await self._http.post(
                f"{self._api_url}/channels/{channel_id}/messages",
                json={
                    "content": text[:2000],
                    "message_reference": {"message_id": message_id, "fail_if_not_exists": False},
                    "allowed_mentions": {"parse": []},
                },
                headers={
                    "Authorization": f"Bot {application.bot_token}",
                    "User-Agent": USER_AGENT,
                },
            )
        except httpx.HTTPError as exc:
            log.warning("discord_gateway.notice_not_posted", error=type(exc).__name__)
            return
        if response.status_code >= 300:
            log.warning("discord_gateway.notice_not_posted", status=response.status_code)


async def _retried(make: Callable[[], Awaitable[T]], *, what: str, **where: Any) -> T | None:
    """`make()`, tried again while Postgres, Redis or Temporal fail for a moment; None when they
    keep failing. Refusals (DurachatError) are the caller's."""
    for attempt in range(START_ATTEMPTS):
        try:
            return await make()
        except DurachatError:
            raise
        except Exception:
            if attempt == START_ATTEMPTS - 1:
                log.exception(what, attempts=START_ATTEMPTS, **where)
                return None
            log.warning(what, attempt=attempt + 1, **where)
            await asyncio.sleep(2.0**attempt)
    return None


class DiscordGateway:
    """Keeps one GatewayConnection per connected application, in line with the database."""

    def __init__(self, state: AppState, *, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self._state = state
        self._refresh = refresh_seconds

    async def run(self, stop: asyncio.Event) -> None:
        running: dict[str, tuple[Application, asyncio.Task[None]]] = {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(15.0)) as http:
            events = ChannelEvents(self._state, http)
            log.info("discord_gateway.started")
            try:
                while not stop.is_set():
                    await self._reconcile(running, http, events)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._refresh)
            finally:
                await _cancel([task for _, task in running.values()])
        log.info("discord_gateway.stopped")

    async def _reconcile(
        self,
        running: dict[str, tuple[Application, asyncio.Task[None]]],
        http: httpx.AsyncClient,
        events: ChannelEvents,
    ) -> None:
        try:
            wanted = await connected_applications(self._state)
        except (SQLAlchemyError, OSError) as exc:
            # Keep the connections as they are until the database answers again.
            log.warning("discord_gateway.applications_unreadable", error=type(exc).__name__)
            return
        ending = []
        for application_id, (application, task) in list(running.items()):
            if wanted.get(application_id) != application:
                # Disconnected, moved to another organization, or given a new token. A
                # connection Discord refused for good stays stopped until then.
                log.info(
                    "discord_gateway.application_changed",
                    organization_id=application.organization_id,
                    application_id=application_id,
                    connected=application_id in wanted,
                )
                ending.append(task)
                del running[application_id]
        await _cancel(ending)
        for application_id, application in wanted.items():
            if application_id not in running:
                connection = GatewayConnection(
                    application, self._state.settings.discord_api_url, http, events
                )
                task = asyncio.create_task(
                    connection.run(), name=f"discord-gateway-{application_id}"
                )
                running[application_id] = (application, task)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def serve(settings: Settings) -> None:
    """Run the Gateway process until SIGTERM or SIGINT (the `durachat discord-gateway` command)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with build_state(
            settings, client_name="durachat-discord-gateway", read_streams=False
        ) as state:
            await DiscordGateway(state).run(stop)

    asyncio.run(main())
