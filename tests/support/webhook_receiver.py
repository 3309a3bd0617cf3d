"""A local webhook receiver that checks every delivery with the Standard Webhooks reference verifier
(`standardwebhooks.Webhook(secret).verify(body, headers)`), as a receiver would. Never imports
durachat code: a receiver sharing code with the sender could agree with its mistakes.

    with WebhookReceiver("127.0.0.2") as receiver:
        url = receiver.route("/hooks/a", secret)  # verify with this secret
        receiver.fail_next("/hooks/a", 5, status=500)  # then answer 500 five times
        receiver.answer("/hooks/a", 410)  # answer 410 from now on (or 302 with `location`)
        receiver.received("/hooks/a")  # every request, in order

Each request is recorded with its raw body and headers, whether the route's secret verified it
(`verified`), and what the receiver answered (`accepted`: verified and answered 2xx). A request that does not verify gets 400, as a
careful receiver answers; one that verifies gets 200, unless the route is told to fail.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    # Whether the route's secret verified it, and the verifier's complaint when it did not.
    verified: bool
    rejection: str | None
    status: int  # what the receiver answered
    at: float  # time.monotonic() on arrival

    @property
    def accepted(self) -> bool:
        """Verified and answered 2xx: delivered, as far as the sender can tell."""
        return self.verified and 200 <= self.status < 300

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def timestamp(self) -> int:
        return int(self.headers.get("webhook-timestamp", "0"))

    @property
    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split(" ")

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


@dataclass
class _Route:
    secret: str | None
    fail_status: int = 500
    fail_times: int = 0
    retry_after: str | None = None
    # An answer to every request from now on (410, a redirect), verified or not.
    status: int | None = None
    location: str | None = None
    received: list[Received] = field(default_factory=list)


class WebhookReceiver:
    def __init__(self, host: str) -> None:
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, location, retry_after = receiver._handle(self.path, headers, body)
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handle(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str | None, str | None]:
        arrived = time.monotonic()
        with self._lock:
            route = self._routes.get(path)
            if route is None:
                return 404, None, None
            verified, rejection = _verify(route.secret, body, headers)
            location = retry_after = None
            if route.status is not None:
                status, location = route.status, route.location
            elif route.fail_times > 0:
                route.fail_times -= 1
                status, retry_after = route.fail_status, route.retry_after
            else:
                status = 200 if verified else 400
            route.received.append(
                Received(path, headers, body, verified, rejection, status, arrived)
            )
            return status, location, retry_after

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        host = self._server.server_address[0]
        return f"http://{host!s}:{self.port}{path}"

    def route(self, path: str, secret: str | None) -> str:
        """Receive at `path`, verifying with `secret`; the route's URL."""
        with self._lock:
            self._routes[path] = _Route(secret)
        return self.url(path)

    def set_secret(self, path: str, secret: str) -> None:
        with self._lock:
            self._routes[path].secret = secret

    def fail_next(
        self, path: str, times: int, *, status: int = 500, retry_after: str | None = None
    ) -> None:
        with self._lock:
            route = self._routes[path]
            route.fail_times, route.fail_status, route.retry_after = times, status, retry_after

    def answer(self, path: str, status: int, *, location: str | None = None) -> None:
        with self._lock:
            route = self._routes[path]
            route.status, route.location = status, location

    def received(self, path: str) -> list[Received]:
        with self._lock:
            route = self._routes.get(path)
            return list(route.received) if route is not None else []

    def accepted(self, path: str) -> list[Received]:
        return [request for request in self.received(path) if request.accepted]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _verify(secret: str | None, body: bytes, headers: dict[str, str]) -> tuple[bool, str | None]:
    if secret is None:
        return False, "no secret to verify with"
    try:
        Webhook(secret).verify(body, headers)
    except (WebhookVerificationError, ValueError) as exc:
        return False, str(exc) or type(exc).__name__
    return True, None
