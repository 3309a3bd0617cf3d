"""A local Slack: the Web API methods the Slack adapter calls, and events signed as Slack signs them.
Never imports durachat code: a fake sharing code with the adapter could agree with its mistakes.

    with SlackServer(port) as slack:  # serves http://127.0.0.1:<port>/api/<method>
        slack.add_token("xoxb-...", "T123")  # a bot token and its workspace
        slack.fail_next(2, status=503)  # the next two calls answer HTTP 503 (`methods=`: only
                                        # calls to those)
        slack.fail_next(1, error="internal_error")  # ... or `ok: false` with that error
        slack.rate_limit_next(1, retry_after=1)  # ... or 429 with Retry-After
        slack.stream_lifetime_seconds = 1.0  # streams expire (or after stream_max_appends):
                                             # appends get `message_not_in_streaming_state`
        slack.thread("C1", "1700000000.000100")  # the bot's messages in a thread, oldest first
        slack.calls_to("chat.update")  # every call, in order

Each message keeps its current text: `chat.postMessage` and `chat.update` set it, `chat.startStream`
starts it, `chat.appendStream` and `chat.stopStream` add to it (Slack renders `markdown_text` as it
comes; the fake keeps it as sent). A streaming message refuses `chat.update`
(`streaming_state_conflict`) until its stream stops or expires; an expired stream refuses appends
and stops (`message_not_in_streaming_state`) and takes `chat.update`, as Slack's does.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

# chat.update's documented limit ("cannot exceed 4,000 characters"), and markdown_text's.
UPDATE_LIMIT = 4_000
MARKDOWN_LIMIT = 12_000


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    team_id: str | None  # the token's workspace; None when the token was refused
    status: int  # the HTTP status answered
    answer: dict[str, Any]
    at: float  # time.monotonic()

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.answer.get("ok"))

    @property
    def error(self) -> str | None:
        error = self.answer.get("error")
        return str(error) if error is not None else None


@dataclass
class Message:
    team_id: str
    channel: str
    ts: str
    thread_ts: str | None
    text: str
    streamed: bool = False
    streaming: bool = False
    stream_started: float = 0.0
    appends: int = 0
    deleted: bool = False
    edits: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    status: int = 200
    error: str | None = None
    retry_after: int | None = None
    methods: tuple[str, ...] = ()  # only calls to these methods, or to any


class SlackServer:
    """Serves the fake Web API from a background thread until `stop()`; a context manager too."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Streams expire this long after chat.startStream, or after this many appends.
        self.stream_lifetime_seconds: float | None = None
        self.stream_max_appends: int | None = None
        self._tokens: dict[str, str] = {}
        self._calls: list[Call] = []
        self._messages: list[Message] = []
        self._failures: list[_Failure] = []
        self._ts = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # --- set-up -----------------------------------------------------------------------------------

    def add_token(self, token: str, team_id: str) -> None:
        with self._lock:
            self._tokens[token] = team_id

    def fail_next(
        self,
        count: int,
        *,
        status: int = 200,
        error: str | None = None,
        methods: tuple[str, ...] = (),
    ) -> None:
        """Fail the next `count` calls (to `methods`, if given): with an HTTP status, or with
        `ok: false` and `error` at 200."""
        failure = _Failure(status=status, error=error or "internal_error", methods=methods)
        with self._lock:
            self._failures.extend([failure] * count)

    def rate_limit_next(
        self, count: int, *, retry_after: int = 1, methods: tuple[str, ...] = ()
    ) -> None:
        failure = _Failure(
            status=429, error="ratelimited", retry_after=retry_after, methods=methods
        )
        with self._lock:
            self._failures.extend([failure] * count)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._messages.clear()
            self._failures.clear()
        self.stream_lifetime_seconds = None
        self.stream_max_appends = None

    # --- what happened ----------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str, *, channel: str | None = None) -> list[Call]:
        return [
            call
            for call in self.calls
            if call.method == method
            and (
                channel is None
                or channel in (call.params.get("channel"), call.params.get("channel_id"))
            )
        ]

    def thread(self, channel: str, thread_ts: str) -> list[Message]:
        """The bot's messages in a thread (not deleted), oldest first."""
        with self._lock:
            return [
                Message(**{**vars(message), "edits": list(message.edits)})
                for message in self._messages
                if message.channel == channel
                and message.thread_ts == thread_ts
                and not message.deleted
            ]

    def thread_text(self, channel: str, thread_ts: str) -> str:
        return "".join(message.text for message in self.thread(channel, thread_ts))

    # --- serving ----------------------------------------------------------------------------------

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="slack-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the Web API ------------------------------------------------------------------------------

    def handle(
        self, method: str, token: str | None, params: dict[str, Any]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer one call: (HTTP status, body, extra headers); every call is recorded."""
        with self._lock:
            team_id = self._tokens.get(token or "")
            failure = self._take_failure(method)
            headers: dict[str, str] = {}
            if failure is not None:
                status = failure.status
                answer: dict[str, Any] = {"ok": False, "error": failure.error or "failed"}
                if failure.retry_after is not None:
                    headers["Retry-After"] = str(failure.retry_after)
            elif team_id is None:
                status, answer = 200, {"ok": False, "error": "invalid_auth"}
            else:
                status, answer = 200, self._answer(method, team_id, params)
            self._calls.append(Call(method, params, team_id, status, answer, time.monotonic()))
            return status, answer, headers

    def _take_failure(self, method: str) -> _Failure | None:
        for index, failure in enumerate(self._failures):
            if not failure.methods or method in failure.methods:
                return self._failures.pop(index)
        return None

    def _answer(self, method: str, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.delete": self._delete,
            "chat.startStream": self._start_stream,
            "chat.appendStream": self._append_stream,
            "chat.stopStream": self._stop_stream,
            "assistant.threads.setStatus": self._set_status,
        }.get(method)
        if handler is None:
            return {"ok": False, "error": "unknown_method"}
        return handler(team_id, params)

    def _new_ts(self) -> str:
        return f"1800000000.{next(self._ts):06d}"

    @staticmethod
    def _text_of(params: dict[str, Any]) -> str | None:
        text = params.get("markdown_text", params.get("text"))
        return str(text) if text is not None else None

    def _message(self, team_id: str, params: dict[str, Any]) -> Message | None:
        for message in self._messages:
            if (
                message.team_id == team_id
                and message.channel == params.get("channel")
                and message.ts == params.get("ts")
                and not message.deleted
            ):
                return message
        return None

    def _expired(self, message: Message) -> bool:
        lifetime, max_appends = self.stream_lifetime_seconds, self.stream_max_appends
        return (lifetime is not None and time.monotonic() - message.stream_started > lifetime) or (
            max_appends is not None and message.appends >= max_appends
        )

    def _streaming(self, message: Message) -> bool:
        if message.streaming and self._expired(message):
            message.streaming = False
        return message.streaming

    def _auth_test(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "team_id": team_id, "user_id": "UBOT", "bot_id": "BBOT"}

    def _post_message(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        text = self._text_of(params)
        if not text or not text.strip():
            return {"ok": False, "error": "no_text"}
        if len(text) > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message = Message(
            team_id, str(params.get("channel")), self._new_ts(), params.get("thread_ts"), text
        )
        self._messages.append(message)
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _update(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        message = self._message(team_id, params)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if self._streaming(message):
            return {"ok": False, "error": "streaming_state_conflict"}
        text = self._text_of(params)
        if not text or not text.strip():
            return {"ok": False, "error": "no_text"}
        if len(text) > UPDATE_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message.text = text
        message.edits.append(text)
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _delete(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        message = self._message(team_id, params)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message.deleted = True
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _start_stream(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel"))
        if not params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        if not channel.startswith("D") and not (
            params.get("recipient_user_id") and params.get("recipient_team_id")
        ):
            return {"ok": False, "error": "missing_recipient_user_id"}
        text = self._text_of(params) or ""
        if len(text) > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message = Message(
            team_id,
            channel,
            self._new_ts(),
            str(params["thread_ts"]),
            text,
            streamed=True,
            streaming=True,
            stream_started=time.monotonic(),
        )
        self._messages.append(message)
        return {"ok": True, "channel": channel, "ts": message.ts}

    def _append_stream(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        message = self._message(team_id, params)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if not self._streaming(message):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        text = self._text_of(params) or ""
        if len(text) > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message.text += text
        message.appends += 1
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _stop_stream(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        message = self._message(team_id, params)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if not self._streaming(message):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message.text += self._text_of(params) or ""
        message.streaming = False
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _set_status(self, team_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if not params.get("channel_id") or not params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True}


def _handler_for(slack: SlackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if not self.path.startswith("/api/"):
                self._send(404, {"ok": False, "error": "not_found"}, {})
                return
            method = self.path.removeprefix("/api/").split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            params = _params(self.headers.get("Content-Type") or "", raw)
            authorization = self.headers.get("Authorization") or ""
            token = authorization.removeprefix("Bearer ").strip() or params.pop("token", None)
            status, answer, headers = slack.handle(method, token, params)
            self._send(status, answer, headers)

        def _send(self, status: int, answer: dict[str, Any], headers: dict[str, str]) -> None:
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the calls are recorded instead

    return Handler


def _params(content_type: str, raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    if content_type.startswith("application/json"):
        loaded = json.loads(raw)
        return loaded if isinstance(loaded, dict) else {}
    return {key: value for key, value in urllib.parse.parse_qsl(raw.decode())}


# --- events ---------------------------------------------------------------------------------------


class SlackEvents:
    """Builds a workspace's event payloads and signs them as Slack does (v0: HMAC-SHA256 over
    `v0:<timestamp>:<raw body>` with the app's signing secret)."""

    def __init__(self, team_id: str, signing_secret: str, *, bot_user_id: str = "UBOT") -> None:
        self.team_id = team_id
        self.signing_secret = signing_secret
        self.bot_user_id = bot_user_id
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)

    def new_ts(self) -> str:
        """A user message's ts, unique in this workspace."""
        return f"1700000000.{next(self._ts):06d}"

    def callback(self, event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        """An `event_callback` envelope around `event`."""
        return {
            "token": "verification-token-unused",
            "team_id": self.team_id,
            "api_app_id": "A0APP",
            "type": "event_callback",
            "event": event,
            "event_id": event_id or f"Ev{self.team_id}{next(self._ids):06d}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
        }

    def mention(
        self,
        text: str,
        *,
        channel: str = "C0GENERAL",
        user: str = "U0ASKER",
        ts: str | None = None,
        thread_ts: str | None = None,
    ) -> dict[str, Any]:
        ts = ts or self.new_ts()
        event = {
            "type": "app_mention",
            "user": user,
            "text": f"<@{self.bot_user_id}> {text}",
            "ts": ts,
            "channel": channel,
            "event_ts": ts,
        }
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        return self.callback(event)

    def direct_message(
        self, text: str, *, channel: str = "D0DIRECT", user: str = "U0ASKER", **extra: Any
    ) -> dict[str, Any]:
        ts = self.new_ts()
        return self.callback(
            {
                "type": "message",
                "channel_type": "im",
                "user": user,
                "text": text,
                "ts": ts,
                "channel": channel,
                "event_ts": ts,
                **extra,
            }
        )

    def reaction(
        self, reaction: str, *, channel: str, ts: str, user: str = "U0ASKER"
    ) -> dict[str, Any]:
        return self.callback(
            {
                "type": "reaction_added",
                "user": user,
                "reaction": reaction,
                "item": {"type": "message", "channel": channel, "ts": ts},
                "item_user": self.bot_user_id,
                "event_ts": self.new_ts(),
            }
        )

    def signed(
        self,
        payload: dict[str, Any],
        *,
        timestamp: int | None = None,
        secret: str | None = None,
        retry: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The raw body and the headers Slack sends with it (`retry`: `X-Slack-Retry-Num`)."""
        body = json.dumps(payload).encode()
        stamp = str(timestamp if timestamp is not None else int(time.time()))
        digest = hmac.new(
            (secret or self.signing_secret).encode(),
            b"v0:" + stamp.encode() + b":" + body,
            hashlib.sha256,
        ).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": f"v0={digest}",
        }
        if retry is not None:
            headers["X-Slack-Retry-Num"] = str(retry)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        return body, headers
