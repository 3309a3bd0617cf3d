"""A local HTTP server serving files by path, for tests of remote attachments and the outbound guard.

Runs `http.server` in a background thread on a free port of the given address. `serve(path, body,
content_type)` publishes a file (`serve_slowly` trickles it); `redirect(path, location)` answers 302; `fail(path, status, times)`
answers `status` for the first `times` requests. Every request's path is recorded (`requests`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass
class _Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    location: str | None = None
    fail_status: int | None = None
    fail_times: int = 0
    # Seconds between 64 KiB pieces of the body: a download that takes a while.
    piece_delay: float = 0.0


class FileServer:
    def __init__(self, host: str) -> None:
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append(self.path)
                    route = server._routes.get(self.path)
                    failing = route is not None and route.fail_times > 0
                    if route is not None and failing:
                        route.fail_times -= 1
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if failing:
                    self.send_response(route.fail_status or 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    for start in range(0, len(route.body), 65536):
                        self.wfile.write(route.body[start : start + 65536])
                        self.wfile.flush()
                        if route.piece_delay:
                            time.sleep(route.piece_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away mid-download

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def serve(self, path: str, body: bytes, content_type: str) -> str:
        self._routes[path] = _Route(body=body, content_type=content_type)
        return self.base_url + path

    def serve_slowly(self, path: str, body: bytes, content_type: str, piece_delay: float) -> str:
        self._routes[path] = _Route(body=body, content_type=content_type, piece_delay=piece_delay)
        return self.base_url + path

    def redirect(self, path: str, location: str) -> str:
        self._routes[path] = _Route(status=302, location=location)
        return self.base_url + path

    def fail(self, path: str, status: int, times: int) -> None:
        route = self._routes[path]
        route.fail_status, route.fail_times = status, times

    def __enter__(self) -> FileServer:
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
