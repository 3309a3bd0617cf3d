"""Bounds on the shape of JSON request bodies (nesting depth, item count), checked by an ASGI middleware
before anything parses a body for the app. Must never import routers or schemas.

A body's size is bounded elsewhere (`api.limits`), but a megabyte of JSON can nest a few hundred
thousand levels deep or hold half a million items, and the work done on a body afterwards grows
with both: pydantic builds one error per unknown key, the schemas' validators walk every value, and
some library code on the way (the standard library's recursive walks) overflows the stack on deep
values. So a body's shape is checked first, by an iterative walk whose cost stops at the bounds.
"""

from __future__ import annotations

import email.message
import json
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response
from core.errors import BadRequestError

log = structlog.get_logger(__name__)

# How much of a path a refusal quotes: enough to find the place, never an echo of a huge key.
_QUOTED_KEY_CHARS = 40
_QUOTED_PATH_CHARS = 300


@dataclass(frozen=True)
class BoundsExceeded:
    """Why a body was refused: `detail` for the caller, `limit` names the bound (`maxDepth` or
    `maxItems`) and `value` is its setting, both echoed in the problem."""

    detail: str
    limit: str
    value: int


class JsonBodyBoundsMiddleware:
    """Answers 400 to a JSON body that nests deeper than `max_depth` containers or holds more than
    `max_items` object members and array elements, before the app sees it.

    A body is JSON by the rule FastAPI uses to decide it parses one (an `application/json` or
    `application/*+json` content type); other bodies pass through untouched, as do bodies that
    are not valid JSON, which FastAPI answers itself. Sits inside the size limit, so the body it
    holds is bounded. Plain ASGI rather than BaseHTTPMiddleware, which would buffer and break
    streaming responses.
    """

    def __init__(self, app: ASGIApp, *, max_depth: int, max_items: int) -> None:
        self.app = app
        self.max_depth = max_depth
        self.max_items = max_items

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _declares_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left mid-upload; there is no one to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        exceeded = json_bounds_exceeded(body, max_depth=self.max_depth, max_items=self.max_items)
        if exceeded is not None:
            log.info("api.body_refused", limit=exceeded.limit, path=scope["path"])
            error = BadRequestError(exceeded.detail)
            response = problem_response(
                error.status_code,
                error.title,
                error.detail,
                problem_type=error.problem_type,
                extra={exceeded.limit: exceeded.value},
            )
            await response(scope, receive, send)
            return
        delivered = False

        async def replay_then_receive() -> Message:
            # The app reads the held body once; later reads (disconnect watchers) go to the client.
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay_then_receive, send)


def json_bounds_exceeded(body: bytes, *, max_depth: int, max_items: int) -> BoundsExceeded | None:
    """Which bound the JSON document `body` exceeds, if any; None also when it is not JSON at all."""
    too_deep = BoundsExceeded(
        f"the JSON body nests deeper than {max_depth} levels", "maxDepth", max_depth
    )
    try:
        document = json.loads(body)
    except RecursionError:
        # The decoder recurses once per level and gave up far beyond any depth allowed here.
        return too_deep
    except ValueError:
        return None  # not JSON (or not UTF-8): the app's own parsing refuses it as it always has
    return _shape_exceeded(document, max_depth, max_items, too_deep)


# The keys from the document's root down to a container, innermost first: (key, parent trail).
_Trail = tuple[str | int, "_Trail"] | None


def _shape_exceeded(
    document: Any, max_depth: int, max_items: int, too_deep: BoundsExceeded
) -> BoundsExceeded | None:
    items = 0
    # Containers still to look into, with their depth (the root is 1) and where they are.
    pending: list[tuple[dict[str, Any] | list[Any], int, _Trail]] = []
    if isinstance(document, (dict, list)):
        pending.append((document, 1, None))
    while pending:
        container, depth, trail = pending.pop()
        # Counted before looking inside, so a single huge container costs no more than a small one.
        items += len(container)
        if items > max_items:
            return BoundsExceeded(
                f"the JSON body holds more than {max_items} items (object members and array elements)",
                "maxItems",
                max_items,
            )
        children = container.items() if isinstance(container, dict) else enumerate(container)
        for key, child in children:
            if isinstance(child, (dict, list)):
                if depth == max_depth:
                    return BoundsExceeded(
                        f"{too_deep.detail} (at `{_quoted_path((key, trail))}`)",
                        too_deep.limit,
                        too_deep.value,
                    )
                pending.append((child, depth + 1, (key, trail)))
    return None


def _quoted_path(trail: _Trail) -> str:
    keys: list[str] = []
    while trail is not None:
        key, trail = trail
        text = str(key)
        keys.append(text if len(text) <= _QUOTED_KEY_CHARS else text[:_QUOTED_KEY_CHARS] + "…")
    path = ".".join(reversed(keys))
    return path if len(path) <= _QUOTED_PATH_CHARS else path[:_QUOTED_PATH_CHARS] + "…"


def _declares_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            # The parse FastAPI applies before it decides to decode a body as JSON.
            message = email.message.Message()
            message["content-type"] = value.decode("latin-1")
            subtype = message.get_content_subtype()
            return message.get_content_maintype() == "application" and (
                subtype == "json" or subtype.endswith("+json")
            )
    return False
