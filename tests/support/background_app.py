"""Serves an ASGI app with uvicorn from a background thread (on a free port of 127.0.0.1 by default).

The provider wire-format servers run this way, so a worker started as a separate process can be
pointed at them as well as an adapter in the test's own event loop.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp


class BackgroundApp:
    """`start()` serves `app` until `stop()`; also a context manager."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        lifespan: bool = False,
    ) -> None:
        self._app = app
        self._name = name
        self.host = host
        # 0: a free port, read back once bound. A port chosen in advance serves processes that
        # were configured with it before the app started (the api and worker of the test stack).
        self._requested_port = port
        # Apps whose own machinery starts in the lifespan (the MCP SDK's session manager) need it.
        self._lifespan = lifespan
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            loop="asyncio",
            lifespan="on" if self._lifespan else "off",
            log_config=None,
            access_log=False,
            # Slow streams still open at shutdown must not hold the test run for a minute.
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self._name} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

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
