"""A local stand-in for Discord's REST API (the routes durachat calls, under `/api/v10`), and a signer
that signs interactions as Discord does. Never imports api, activities or workflows: a fake that
shared code with the client it stands in front of could agree with its mistakes.

    server = DiscordServer(port)              # the port the api and worker were configured with
    server.add_application("123", "bot-token")
    token = server.open_interaction("123", channel_id="c1")   # a deferred /ask's token
    ... durachat edits the answer in ...
    server.reply_text(token)                  # the original response and its follow-ups, joined

What it checks as Discord does: the interaction token on webhook routes (401, code 50027, once
expired or unknown), `Authorization: Bot <token>` on the others (401), content of 1 to 2,000
characters (400). Every answer carries rate-limit headers; `rate_limit(times, retry_after)`
answers the next calls 429 with `retry_after`, `exhaust_bucket(reset_after)` answers the next call
with `X-RateLimit-Remaining: 0`, `fail(status, times)` answers 5xx. Every call is recorded, and
every message keeps its current content and the contents it had. `GET /gateway/bot` answers
`gateway_url` (a local Gateway, tests/support/discord_gateway_server.py), 503 while it is unset.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.background_app import BackgroundApp

MessageKind = Literal["original", "follow-up", "channel"]
CONTENT_LIMIT = 2000


@dataclass(frozen=True)
class DiscordCall:
    """One request the server answered: `route` names what it was (`edit-original`, `post-follow-up`,
    `edit-follow-up`, `delete-follow-up`, `post-channel`, `edit-channel`, `put-commands`,
    `get-gateway-bot`)."""

    method: str
    route: str
    path: str
    headers: dict[str, str]
    body: Any
    # The 429 or 5xx it was answered by script, if it was.
    scripted_status: int | None
    at: float  # time.monotonic() when it arrived


@dataclass
class FakeMessage:
    id: str
    kind: MessageKind
    channel_id: str
    token: str | None
    content: str = ""
    # Every content it was given, in order.
    contents: list[str] = field(default_factory=list)
    reference: str | None = None
    deleted: bool = False


@dataclass
class _Interaction:
    application_id: str
    channel_id: str
    original_id: str
    expired: bool = False


@dataclass
class _State:
    bots: dict[str, str] = field(default_factory=dict)  # application id -> bot token
    interactions: dict[str, _Interaction] = field(default_factory=dict)  # token -> interaction
    messages: dict[str, FakeMessage] = field(default_factory=dict)
    calls: list[DiscordCall] = field(default_factory=list)
    commands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rate_limits: int = 0
    retry_after: float = 0.0
    exhausted_reset_after: float | None = None
    failures: int = 0
    failure_status: int = 500


class DiscordServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self._state = _State()
        self._lock = threading.Lock()
        self._ids = itertools.count(1_000_000_000_000_000_000)
        self._background: BackgroundApp | None = None
        # Where `GET /gateway/bot` sends bots: set by the tests that run a local Gateway.
        self.gateway_url: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    # --- scripting ----------------------------------------------------------------------------

    def add_application(self, application_id: str, bot_token: str) -> None:
        with self._lock:
            self._state.bots[application_id] = bot_token

    def open_interaction(self, application_id: str, channel_id: str) -> str:
        """A new interaction token, whose deferred original response exists (empty) from now."""
        token = f"aW50ZXJhY3Rpb24{next(self._ids)}"
        with self._lock:
            original = self._new_message("original", channel_id, token)
            self._state.interactions[token] = _Interaction(application_id, channel_id, original.id)
        return token

    def expire_token(self, token: str) -> None:
        """From now on the token is refused, as Discord refuses one older than 15 minutes."""
        with self._lock:
            self._state.interactions[token].expired = True

    def rate_limit(self, times: int = 1, retry_after: float = 0.5) -> None:
        with self._lock:
            self._state.rate_limits = times
            self._state.retry_after = retry_after

    def exhaust_bucket(self, reset_after: float) -> None:
        """The next answer says the bucket has nothing left until `reset_after` seconds pass."""
        with self._lock:
            self._state.exhausted_reset_after = reset_after

    def fail(self, status: int = 502, times: int = 1) -> None:
        with self._lock:
            self._state.failures = times
            self._state.failure_status = status

    # --- reading ------------------------------------------------------------------------------

    @property
    def calls(self) -> list[DiscordCall]:
        with self._lock:
            return list(self._state.calls)

    def calls_for(self, token: str) -> list[DiscordCall]:
        return [call for call in self.calls if f"/{token}" in call.path]

    def reply_messages(self, token: str) -> list[FakeMessage]:
        """The interaction's original response and its follow-ups, oldest first (not deleted)."""
        with self._lock:
            return [
                message
                for message in self._state.messages.values()
                if message.token == token and not message.deleted
            ]

    def channel_messages(self, channel_id: str) -> list[FakeMessage]:
        """What the bot posted in the channel with its own token, oldest first (not deleted)."""
        with self._lock:
            return [
                message
                for message in self._state.messages.values()
                if message.kind == "channel"
                and message.channel_id == channel_id
                and not message.deleted
            ]

    def reply_text(self, token: str) -> str:
        return "".join(message.content for message in self.reply_messages(token))

    def commands(self, application_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._state.commands.get(application_id, []))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._background = BackgroundApp(self._app(), name="discord server", port=self.port)
        self._background.start()

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the app ------------------------------------------------------------------------------

    def _new_message(
        self, kind: MessageKind, channel_id: str, token: str | None, content: str = ""
    ) -> FakeMessage:
        message = FakeMessage(str(next(self._ids)), kind, channel_id, token, content)
        if content:
            message.contents.append(content)
        self._state.messages[message.id] = message
        return message

    def _app(self) -> Starlette:
        prefix = "/api/v10"
        return Starlette(
            routes=[
                Route(
                    prefix + "/webhooks/{application_id}/{token}",
                    self._post_follow_up,
                    methods=["POST"],
                ),
                Route(
                    prefix + "/webhooks/{application_id}/{token}/messages/{message_id}",
                    self._webhook_message,
                    methods=["PATCH", "DELETE", "GET"],
                ),
                Route(
                    prefix + "/channels/{channel_id}/messages",
                    self._post_channel_message,
                    methods=["POST"],
                ),
                Route(
                    prefix + "/channels/{channel_id}/messages/{message_id}",
                    self._channel_message,
                    methods=["PATCH", "DELETE"],
                ),
                Route(
                    prefix + "/applications/{application_id}/commands",
                    self._put_commands,
                    methods=["PUT"],
                ),
                Route(prefix + "/gateway/bot", self._gateway_bot, methods=["GET"]),
            ]
        )

    async def _arrive(self, request: Request, route: str) -> tuple[Any, Response | None]:
        """Record the call; give its JSON body and the scripted answer (429, 5xx), if any."""
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        scripted: Response | None = None
        with self._lock:
            state = self._state
            if state.rate_limits > 0:
                state.rate_limits -= 1
                scripted = JSONResponse(
                    {
                        "message": "You are being rate limited.",
                        "retry_after": state.retry_after,
                        "global": False,
                    },
                    429,
                    headers={
                        "Retry-After": str(max(1, round(state.retry_after))),
                        "X-RateLimit-Limit": "5",
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset-After": f"{state.retry_after:.3f}",
                        "X-RateLimit-Scope": "user",
                        "X-RateLimit-Bucket": "fake-bucket",
                    },
                )
            elif state.failures > 0:
                state.failures -= 1
                scripted = JSONResponse(
                    {"message": "scripted failure", "code": 0}, state.failure_status
                )
            state.calls.append(
                DiscordCall(
                    method=request.method,
                    route=route,
                    path=request.url.path,
                    headers={key.lower(): value for key, value in request.headers.items()},
                    body=body,
                    scripted_status=scripted.status_code if scripted is not None else None,
                    at=time.monotonic(),
                )
            )
        return body, scripted

    def _answer(self, body: Any, status: int = 200) -> Response:
        """An answer with the rate-limit headers Discord sends with every one."""
        with self._lock:
            reset_after = self._state.exhausted_reset_after
            self._state.exhausted_reset_after = None
        headers = {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0" if reset_after is not None else "4",
            "X-RateLimit-Reset-After": f"{reset_after if reset_after is not None else 1.0:.3f}",
            "X-RateLimit-Bucket": "fake-bucket",
        }
        if status == 204:
            return Response(status_code=204, headers=headers)
        return JSONResponse(body, status, headers=headers)

    def _error(self, status: int, code: int, message: str) -> Response:
        return self._answer({"message": message, "code": code}, status)

    def _interaction(self, request: Request) -> _Interaction | None:
        token = request.path_params["token"]
        with self._lock:
            found = self._state.interactions.get(token)
        if (
            found is None
            or found.expired
            or found.application_id != request.path_params["application_id"]
        ):
            return None
        return found

    def _bot_allowed(self, request: Request, application_id: str | None = None) -> bool:
        given = request.headers.get("authorization", "")
        with self._lock:
            tokens = (
                [self._state.bots.get(application_id)]
                if application_id is not None
                else list(self._state.bots.values())
            )
        return any(token is not None and given == f"Bot {token}" for token in tokens)

    def _content_problem(self, body: Any) -> Response | None:
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str) or not content.strip():
            return self._error(400, 50006, "Cannot send an empty message")
        if len(content) > CONTENT_LIMIT:
            return self._error(
                400,
                50035,
                f"Invalid Form Body: content must be {CONTENT_LIMIT} or fewer in length.",
            )
        return None

    def _message_json(self, message: FakeMessage) -> dict[str, Any]:
        return {
            "id": message.id,
            "channel_id": message.channel_id,
            "content": message.content,
            "type": 20 if message.kind == "original" else 0,
        }

    async def _post_follow_up(self, request: Request) -> Response:
        body, scripted = await self._arrive(request, "post-follow-up")
        if scripted is not None:
            return scripted
        interaction = self._interaction(request)
        if interaction is None:
            return self._error(401, 50027, "Invalid Webhook Token")
        problem = self._content_problem(body)
        if problem is not None:
            return problem
        with self._lock:
            message = self._new_message(
                "follow-up", interaction.channel_id, request.path_params["token"], body["content"]
            )
        if request.query_params.get("wait") != "true":
            return self._answer(None, 204)
        return self._answer(self._message_json(message))

    async def _webhook_message(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        kind = "original" if message_id == "@original" else "follow-up"
        verb = {"PATCH": "edit", "DELETE": "delete", "GET": "get"}[request.method]
        body, scripted = await self._arrive(request, f"{verb}-{kind}")
        if scripted is not None:
            return scripted
        interaction = self._interaction(request)
        if interaction is None:
            return self._error(401, 50027, "Invalid Webhook Token")
        if message_id == "@original":
            message_id = interaction.original_id
        with self._lock:
            message = self._state.messages.get(message_id)
        if message is None or message.deleted or message.token != request.path_params["token"]:
            return self._error(404, 10008, "Unknown Message")
        return self._change(request, message, body)

    async def _post_channel_message(self, request: Request) -> Response:
        body, scripted = await self._arrive(request, "post-channel")
        if scripted is not None:
            return scripted
        if not self._bot_allowed(request):
            return self._error(401, 0, "401: Unauthorized")
        problem = self._content_problem(body)
        if problem is not None:
            return problem
        reference = body.get("message_reference") if isinstance(body, dict) else None
        with self._lock:
            message = self._new_message(
                "channel", request.path_params["channel_id"], None, body["content"]
            )
            if isinstance(reference, dict):
                message.reference = str(reference.get("message_id"))
        return self._answer(self._message_json(message))

    async def _channel_message(self, request: Request) -> Response:
        verb = {"PATCH": "edit", "DELETE": "delete"}[request.method]
        body, scripted = await self._arrive(request, f"{verb}-channel")
        if scripted is not None:
            return scripted
        if not self._bot_allowed(request):
            return self._error(401, 0, "401: Unauthorized")
        with self._lock:
            message = self._state.messages.get(request.path_params["message_id"])
        if (
            message is None
            or message.deleted
            or message.kind != "channel"
            or message.channel_id != request.path_params["channel_id"]
        ):
            return self._error(404, 10008, "Unknown Message")
        return self._change(request, message, body)

    def _change(self, request: Request, message: FakeMessage, body: Any) -> Response:
        if request.method == "GET":
            return self._answer(self._message_json(message))
        if request.method == "DELETE":
            with self._lock:
                message.deleted = True
            return self._answer(None, 204)
        problem = self._content_problem(body)
        if problem is not None:
            return problem
        with self._lock:
            message.content = body["content"]
            message.contents.append(body["content"])
        return self._answer(self._message_json(message))

    async def _put_commands(self, request: Request) -> Response:
        body, scripted = await self._arrive(request, "put-commands")
        if scripted is not None:
            return scripted
        application_id = request.path_params["application_id"]
        if not self._bot_allowed(request, application_id):
            return self._error(401, 0, "401: Unauthorized")
        if not isinstance(body, list):
            return self._error(400, 50035, "Invalid Form Body")
        registered = [
            {**command, "id": str(next(self._ids)), "application_id": application_id}
            for command in body
        ]
        with self._lock:
            self._state.commands[application_id] = registered
        return self._answer(registered)

    async def _gateway_bot(self, request: Request) -> Response:
        _, scripted = await self._arrive(request, "get-gateway-bot")
        if scripted is not None:
            return scripted
        if not self._bot_allowed(request):
            return self._error(401, 0, "401: Unauthorized")
        if self.gateway_url is None:
            return self._error(503, 0, "no gateway in this test")
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return self._answer({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})


class InteractionSigner:
    """Signs interaction requests with a test Ed25519 key, as Discord signs them with its own."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()

    @property
    def public_key(self) -> str:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def headers(self, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        return {
            "Content-Type": "application/json",
            "X-Signature-Ed25519": self._key.sign(stamp.encode() + body).hex(),
            "X-Signature-Timestamp": stamp,
        }


_interaction_ids = itertools.count(int(time.time() * 1000) << 22)


def command_interaction(
    application_id: str,
    name: str,
    *,
    token: str,
    channel_id: str,
    guild_id: str | None = "g-1",
    prompt: str | None = None,
) -> dict[str, Any]:
    """An APPLICATION_COMMAND interaction as Discord posts it."""
    data: dict[str, Any] = {"id": "cmd", "name": name, "type": 1}
    if prompt is not None:
        data["options"] = [{"name": "prompt", "type": 3, "value": prompt}]
    interaction: dict[str, Any] = {
        "type": 2,
        "id": str(next(_interaction_ids)),
        "application_id": application_id,
        "token": token,
        "version": 1,
        "channel_id": channel_id,
        "channel": {"id": channel_id, "type": 0},
        "data": data,
    }
    user = {"id": "u-1", "username": "asker"}
    if guild_id is not None:
        interaction["guild_id"] = guild_id
        interaction["member"] = {"user": user}
    else:
        interaction["user"] = user
    return interaction
