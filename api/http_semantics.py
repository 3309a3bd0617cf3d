"""HTTP behaviour the framework and the server leave out: HEAD wherever GET works, and problem answers
to requests the HTTP server itself refuses. Must never import routers."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.problems import PROBLEM_MEDIA_TYPE, problem_body


class HeadAsGetMiddleware:
    """Answers HEAD wherever GET works (RFC 9110 9.3.2): the app handles the request as a GET, and
    the client gets that answer's status and headers, Content-Length included, without its body.

    FastAPI routes answer only the methods they declare, so a GET route alone would answer HEAD 405.
    The response ends as soon as its headers are out, so a HEAD of a stream does not follow the
    stream: the app is told the response is complete, as ASGI servers tell it, and what it still
    sends is dropped.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        headers_sent = False

        async def send_headers_only(message: Message) -> None:
            nonlocal headers_sent
            if headers_sent or message["type"] != "http.response.start":
                return
            headers_sent = True
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        # A copy: the server keeps reading its own scope, and must still see a HEAD (no body to send).
        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class ProblemHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools, what uvicorn runs by default), answering a request it
    cannot parse (a malformed request line or header, a Content-Length of -1 or past 64 bits) with a
    problem like every other error, instead of its own `text/plain` 400."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            problem_body(
                400,
                "Bad Request",
                "the request is not valid HTTP/1.1 (a malformed request line or header, such as "
                "an invalid Content-Length)",
            )
        ).encode()
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head += [
            b"content-type: " + PROBLEM_MEDIA_TYPE.encode() + b"\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
