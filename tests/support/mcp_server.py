"""A streamable-HTTP MCP server built with the MCP SDK's MCPServer (FastMCP in SDK 1.x), for tests of
MCP toolkits.

Served by uvicorn from a background thread on a free port of the given address (the test stack's
outbound guard lets only REMOTE_FILES_HOST through). Every request must carry `Authorization: Bearer
<token>` (401 otherwise); `fail_http(status, times)` answers the next `times` requests with `status`.
Tools: `add(a, b)` (structured output), `lookup(term)`, `fail()` (an `isError` result), `slow(seconds)`
and `secret_admin()`. Every tool call (`calls`) and every request's headers (`headers_seen`) are
recorded.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.background_app import BackgroundApp

MCP_PATH = "/mcp"


@dataclass(frozen=True)
class RecordedCall:
    tool: str
    arguments: dict[str, Any]


class McpTestServer:
    """`start()` serves until `stop()`; also a context manager."""

    def __init__(self, host: str, *, token: str) -> None:
        self.host = host
        self.token = token
        self.calls: list[RecordedCall] = []
        # Lower-cased header names to values, one dict per HTTP request the server received.
        self.headers_seen: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._fail_status: int | None = None
        self._fail_times = 0
        self._background: BackgroundApp
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{MCP_PATH}"

    def fail_http(self, status: int, times: int = 1) -> None:
        """Answer the next `times` HTTP requests with `status`, before any MCP handling."""
        with self._lock:
            self._fail_status, self._fail_times = status, times

    def called(self, tool: str) -> list[RecordedCall]:
        with self._lock:
            return [call for call in self.calls if call.tool == tool]

    def _record(self, tool: str, **arguments: Any) -> None:
        with self._lock:
            self.calls.append(RecordedCall(tool, arguments))

    def _mcp(self) -> MCPServer:
        mcp: MCPServer = MCPServer("durachat-test-tools")

        @mcp.tool(description="Add two integers.")
        def add(a: int, b: int) -> int:
            self._record("add", a=a, b=b)
            return a + b

        @mcp.tool(description="Look a term up in the glossary.")
        def lookup(term: str) -> str:
            self._record("lookup", term=term)
            return f"{term}: a word worth knowing"

        @mcp.tool(description="Always fails.")
        def fail() -> str:
            self._record("fail")
            raise ToolError("the glossary service is down for maintenance")

        @mcp.tool(description="Waits, then answers.")
        async def slow(seconds: float) -> str:
            self._record("slow", seconds=seconds)
            await asyncio.sleep(seconds)
            return "done"

        @mcp.tool(description="A tool an allow list should hide.")
        def secret_admin() -> str:
            self._record("secret_admin")
            return "you should not see this"

        return mcp

    def _app(self) -> ASGIApp:
        inner = self._mcp().streamable_http_app(
            streamable_http_path=MCP_PATH,
            transport_security=TransportSecuritySettings(
                allowed_hosts=[f"{self.host}:*"], allowed_origins=[f"http://{self.host}:*"]
            ),
            host=self.host,
        )
        server = self

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in scope["headers"]
            }
            with server._lock:
                server.headers_seen.append(headers)
                status = server._fail_status if server._fail_times > 0 else None
                if status is not None:
                    server._fail_times -= 1
            if status is None and headers.get("authorization") != f"Bearer {server.token}":
                status = 401
            if status is not None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"0")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            await inner(scope, receive, send)

        return app

    def start(self) -> None:
        self._background = BackgroundApp(
            self._app(), name="MCP test server", host=self.host, lifespan=True
        )
        self._background.start()
        self.port = self._background.port

    def stop(self) -> None:
        self._background.stop()

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
