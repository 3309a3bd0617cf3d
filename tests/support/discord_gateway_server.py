"""A local stand-in for Discord's Gateway: a `websockets` server on 127.0.0.1 in the test's event
loop. Never imports bots, api, activities or workflows: a fake that shared code with the client it
stands in front of could agree with its mistakes.

    gateway = DiscordGatewayServer()
    await gateway.start()
    discord_server.gateway_url = gateway.url          # what `GET /gateway/bot` answers
    gateway.add_bot("123", "bot-token", user_id="900")
    await gateway.dispatch("123", "MESSAGE_CREATE", message_create(...))

It speaks as Discord does: HELLO with the heartbeat interval, then IDENTIFY (a known token opens a
session: READY with its id, the URL to resume it at, the bot user and application) or RESUME (the
session's dispatches after the given sequence again, then RESUMED; an unknown session gets
INVALID SESSION). A heartbeat is acknowledged (op 11) unless `go_silent(application id)` said
otherwise, as a zombie connection would; an unknown token is closed with 4004. Dispatches carry increasing sequence numbers per session and are kept,
so one dispatched while the bot is disconnected arrives when it resumes. Every payload the bot sends
is recorded (`received`), with the session it belonged to.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

HELLO = 10
HEARTBEAT = 1
IDENTIFY = 2
RESUME = 6
INVALID_SESSION = 9
HEARTBEAT_ACK = 11


@dataclass(frozen=True)
class GatewayBot:
    application_id: str
    token: str
    user_id: str


@dataclass
class FakeSession:
    id: str
    bot: GatewayBot
    intents: int
    sequence: int = 0
    # Every dispatch of the session, for RESUME to replay.
    dispatched: list[dict[str, Any]] = field(default_factory=list)
    connection: ServerConnection | None = None


@dataclass(frozen=True)
class Received:
    """A payload the bot sent: its opcode and data, the session it belonged to, the path (query
    included) of the connection it came on."""

    op: int
    data: Any
    application_id: str | None
    session_id: str | None
    path: str
    at: float  # time.monotonic()


class DiscordGatewayServer:
    def __init__(self, *, heartbeat_interval_ms: int = 400) -> None:
        self.heartbeat_interval_ms = heartbeat_interval_ms
        # Applications whose heartbeats go unacknowledged.
        self._silent: set[str] = set()
        self.received: list[Received] = []
        self._bots: dict[str, GatewayBot] = {}  # token -> bot
        self._sessions: dict[str, FakeSession] = {}
        self._server: Server | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    # --- scripting ----------------------------------------------------------------------------

    def add_bot(self, application_id: str, token: str, *, user_id: str) -> None:
        self._bots[token] = GatewayBot(application_id, token, user_id)

    def go_silent(self, application_id: str, silent: bool = True) -> None:
        """Stop (or go back to) acknowledging the application's heartbeats."""
        if silent:
            self._silent.add(application_id)
        else:
            self._silent.discard(application_id)

    def session_of(self, application_id: str) -> FakeSession | None:
        """The application's newest session."""
        found = [s for s in self._sessions.values() if s.bot.application_id == application_id]
        return found[-1] if found else None

    def connected(self, application_id: str) -> bool:
        session = self.session_of(application_id)
        return session is not None and session.connection is not None

    async def dispatch(self, application_id: str, event: str, data: dict[str, Any]) -> int:
        """Send the event on the application's session (kept for RESUME if it is not connected);
        its sequence number."""
        session = self.session_of(application_id)
        assert session is not None, "the bot has no session"
        return await self._dispatch(session, event, data)

    async def drop(self, application_id: str) -> None:
        """Cut the application's connection without a closing handshake, as a network failure
        does."""
        session = self.session_of(application_id)
        if session is not None and session.connection is not None:
            session.connection.transport.abort()
            session.connection = None

    # --- reading ------------------------------------------------------------------------------

    def payloads(self, application_id: str, op: int) -> list[Received]:
        return [r for r in self.received if r.application_id == application_id and r.op == op]

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(self._serve, "127.0.0.1", 0, ping_interval=None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # --- the protocol -------------------------------------------------------------------------

    async def _dispatch(self, session: FakeSession, event: str, data: dict[str, Any]) -> int:
        session.sequence += 1
        payload = {"op": 0, "t": event, "s": session.sequence, "d": data}
        session.dispatched.append(payload)
        if session.connection is not None:
            with contextlib.suppress(ConnectionClosed):
                await session.connection.send(json.dumps(payload))
        return session.sequence

    async def _serve(self, connection: ServerConnection) -> None:
        path = connection.request.path if connection.request is not None else ""
        await connection.send(
            json.dumps({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        )
        session: FakeSession | None = None
        try:
            async for raw in connection:
                payload = json.loads(raw)
                op, data = payload.get("op"), payload.get("d")
                bot = self._bots.get(data.get("token")) if isinstance(data, dict) else None
                self.received.append(
                    Received(
                        op=op,
                        data=data,
                        application_id=(
                            bot.application_id
                            if bot is not None
                            else session.bot.application_id
                            if session is not None
                            else None
                        ),
                        session_id=session.id if session is not None else None,
                        path=path,
                        at=time.monotonic(),
                    )
                )
                if op == HEARTBEAT:
                    if session is None or session.bot.application_id not in self._silent:
                        await connection.send(json.dumps({"op": HEARTBEAT_ACK}))
                elif op == IDENTIFY:
                    if bot is None:
                        await connection.close(4004, "Authentication failed.")
                        return
                    session = await self._identify(connection, bot, data)
                elif op == RESUME:
                    session = await self._resume(connection, bot, data)
        except ConnectionClosed:
            pass  # the bot went away (or `drop` cut it off): its session stays, to be resumed
        finally:
            if session is not None and session.connection is connection:
                session.connection = None

    async def _identify(
        self, connection: ServerConnection, bot: GatewayBot, data: dict[str, Any]
    ) -> FakeSession:
        session = FakeSession(
            id=uuid.uuid4().hex, bot=bot, intents=int(data.get("intents", 0)), connection=None
        )
        self._sessions[session.id] = session
        session.connection = connection
        await self._dispatch(
            session,
            "READY",
            {
                "v": 10,
                "user": {"id": bot.user_id, "username": "durachat", "bot": True},
                "guilds": [],
                "session_id": session.id,
                "resume_gateway_url": f"{self.url}/resume-{next(self._ids)}",
                "application": {"id": bot.application_id, "flags": 0},
            },
        )
        return session

    async def _resume(
        self, connection: ServerConnection, bot: GatewayBot | None, data: Any
    ) -> FakeSession | None:
        session = (
            self._sessions.get(str(data.get("session_id"))) if isinstance(data, dict) else None
        )
        if session is None or bot is None or session.bot != bot:
            await connection.send(json.dumps({"op": INVALID_SESSION, "d": False}))
            return None
        session.connection = connection
        after = data.get("seq") or 0
        for payload in list(session.dispatched):
            if payload["s"] > after:
                await connection.send(json.dumps(payload))
        await self._dispatch(session, "RESUMED", {})
        return session


_snowflakes = itertools.count(int(time.time() * 1000) << 22)


def snowflake() -> str:
    return str(next(_snowflakes))


def message_create(
    *,
    channel_id: str,
    content: str,
    author_id: str = "u-1",
    guild_id: str | None = "g-1",
    mentions: Sequence[str] = (),
    bot: bool = False,
    message_id: str | None = None,
) -> dict[str, Any]:
    """A MESSAGE_CREATE's data as Discord sends it."""
    data: dict[str, Any] = {
        "id": message_id or snowflake(),
        "type": 0,
        "channel_id": channel_id,
        "author": {"id": author_id, "username": "someone", **({"bot": True} if bot else {})},
        "content": content,
        "mentions": [{"id": user_id, "username": "mentioned"} for user_id in mentions],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "timestamp": "2026-01-01T00:00:00.000000+00:00",
        "tts": False,
        "mention_everyone": False,
        "pinned": False,
    }
    if guild_id is not None:
        data["guild_id"] = guild_id
        data["member"] = {"roles": []}
    return data


def reaction_add(
    *, channel_id: str, message_id: str, emoji: str, user_id: str = "u-1", guild_id: str = "g-1"
) -> dict[str, Any]:
    """A MESSAGE_REACTION_ADD's data as Discord sends it (a Unicode emoji has no id)."""
    return {
        "user_id": user_id,
        "channel_id": channel_id,
        "message_id": message_id,
        "guild_id": guild_id,
        "member": {"user": {"id": user_id, "username": "someone"}, "roles": []},
        "emoji": {"id": None, "name": emoji},
        "burst": False,
        "type": 0,
    }
