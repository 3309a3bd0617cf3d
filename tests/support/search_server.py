"""A local stand-in for the web search backends durachat calls: SearXNG's JSON API, Brave's web
search API and Tavily's search API, each at its own path of one server. Never imports agent_tools:
a fake that shared code with the client it stands in front of could agree with its mistakes.

    with SearchServer() as server:
        server.results_for("durable", [SearchHit("Temporal", "https://temporal.io/", "…")])
        Settings(searxng_url=server.searxng_url)  # or brave_search_url / tavily_search_url

Each backend answers as the real one does: SearXNG `GET /search?q=&format=json` (403 for a format
not enabled, as a SearXNG whose settings.yml lacks it does), Brave `GET /res/v1/web/search?q=&count=`
(401 without the right `X-Subscription-Token`), Tavily `POST /tavily/search` with a JSON body
(401 without the right `Authorization: Bearer`). A query without canned results gets ten made-up
ones. `fail(backend, status, times)` answers `status` to the next `times` requests to a backend;
`delay(backend, seconds)` holds its answers back. Every request is recorded (`requests`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.background_app import BackgroundApp

Backend = Literal["searxng", "brave", "tavily"]

BRAVE_KEY = "brave-test-key-0123456789"
TAVILY_KEY = "tvly-test-key-0123456789"


@dataclass(frozen=True)
class SearchHit:
    """One canned result; each backend spells it its own way."""

    title: str
    url: str
    content: str
    score: float = 1.0


@dataclass(frozen=True)
class SearchRequest:
    backend: Backend
    method: str
    params: dict[str, str]  # the query string
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]  # {} unless a JSON object was posted


@dataclass
class _Failure:
    status: int
    times: int


@dataclass
class _State:
    results: dict[str, list[SearchHit]] = field(default_factory=dict)
    failures: dict[Backend, _Failure] = field(default_factory=dict)
    delays: dict[Backend, float] = field(default_factory=dict)
    requests: list[SearchRequest] = field(default_factory=list)


def made_up_hits(query: str, count: int = 10) -> list[SearchHit]:
    """What a query without canned results finds."""
    slug = "-".join(query.lower().split()) or "empty"
    return [
        SearchHit(
            title=f"{query} — result {index}",
            url=f"https://example.com/{slug}/{index}",
            content=f"Snippet {index} about {query}.",
            score=1.0 / index,
        )
        for index in range(1, count + 1)
    ]


class SearchServer:
    def __init__(self, *, searxng_formats: tuple[str, ...] = ("html", "json")) -> None:
        self.brave_key = BRAVE_KEY
        self.tavily_key = TAVILY_KEY
        self.searxng_formats = searxng_formats
        self._state = _State()
        self._lock = threading.Lock()
        self._background: BackgroundApp | None = None

    @property
    def origin(self) -> str:
        assert self._background is not None, "the search server is not running"
        return self._background.origin

    @property
    def searxng_url(self) -> str:
        return self.origin

    @property
    def brave_url(self) -> str:
        return self.origin + "/res/v1/web/search"

    @property
    def tavily_url(self) -> str:
        return self.origin + "/tavily/search"

    def results_for(self, query: str, hits: list[SearchHit]) -> None:
        with self._lock:
            self._state.results[query] = list(hits)

    def fail(self, backend: Backend, status: int, times: int = 1) -> None:
        with self._lock:
            self._state.failures[backend] = _Failure(status, times)

    def delay(self, backend: Backend, seconds: float) -> None:
        with self._lock:
            self._state.delays[backend] = seconds

    @property
    def requests(self) -> list[SearchRequest]:
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, backend: Backend) -> list[SearchRequest]:
        return [request for request in self.requests if request.backend == backend]

    def reset(self) -> None:
        """Forget canned results, failures, delays and recorded requests."""
        with self._lock:
            self._state = _State()

    def start(self) -> None:
        self._background = BackgroundApp(self._app(), name="search server")
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

    # --- the app ----------------------------------------------------------------------------

    async def _arrived(
        self, backend: Backend, request: Request
    ) -> tuple[dict[str, Any], Response | None]:
        """Records the request and waits out a delay; gives the posted JSON object ({} if none)
        and the scripted failure to answer, if any."""
        posted: Any = {}
        if request.method == "POST":
            try:
                posted = json.loads(await request.body())
            except ValueError:
                posted = {}
        body = posted if isinstance(posted, dict) else {}
        with self._lock:
            self._state.requests.append(
                SearchRequest(
                    backend=backend,
                    method=request.method,
                    params=dict(request.query_params),
                    headers={key.lower(): value for key, value in request.headers.items()},
                    body=body,
                )
            )
            delay = self._state.delays.get(backend, 0.0)
            failure = self._state.failures.get(backend)
            failing = failure is not None and failure.times > 0
            if failure is not None and failing:
                failure.times -= 1
        if delay:
            await asyncio.sleep(delay)
        if failure is not None and failing:
            return body, JSONResponse(
                {"error": f"scripted failure {failure.status}"}, failure.status
            )
        return body, None

    def _hits(self, query: str) -> list[SearchHit]:
        with self._lock:
            canned = self._state.results.get(query)
        return canned if canned is not None else made_up_hits(query)

    async def _searxng(self, request: Request) -> Response:
        _, failed = await self._arrived("searxng", request)
        if failed is not None:
            return failed
        output = request.query_params.get("format", "html")
        if output not in self.searxng_formats:
            return Response("Forbidden", 403, media_type="text/plain")
        if output != "json":
            return Response("<html><body>results</body></html>", media_type="text/html")
        query = request.query_params.get("q", "")
        hits = self._hits(query)
        return JSONResponse(
            {
                "query": query,
                "number_of_results": len(hits),
                "results": [
                    {
                        "url": hit.url,
                        "title": hit.title,
                        "content": hit.content,
                        "score": hit.score,
                        "engine": "duckduckgo",
                        "category": "general",
                    }
                    for hit in hits
                ],
                "answers": [],
                "infoboxes": [],
                "suggestions": [],
            }
        )

    async def _brave(self, request: Request) -> Response:
        _, failed = await self._arrived("brave", request)
        if failed is not None:
            return failed
        if request.headers.get("x-subscription-token") != self.brave_key:
            return JSONResponse(
                {
                    "type": "ErrorResponse",
                    "error": {
                        "code": "SUBSCRIPTION_TOKEN_INVALID",
                        "status": 401,
                        "detail": "The provided subscription token is invalid.",
                    },
                },
                401,
            )
        query = request.query_params.get("q", "")
        count_param = request.query_params.get("count", "20")
        count = min(int(count_param), 20) if count_param.isdigit() else 20
        hits = self._hits(query)[:count]
        body: dict[str, Any] = {"type": "search", "query": {"original": query}}
        if hits:  # Brave leaves `web` out when it found nothing
            body["web"] = {
                "type": "search",
                "results": [
                    {
                        "type": "search_result",
                        "title": hit.title,
                        "url": hit.url,
                        "description": hit.content,
                    }
                    for hit in hits
                ],
            }
        return JSONResponse(body)

    async def _tavily(self, request: Request) -> Response:
        body, failed = await self._arrived("tavily", request)
        if failed is not None:
            return failed
        if request.headers.get("authorization") != f"Bearer {self.tavily_key}":
            return JSONResponse(
                {"detail": {"error": "Unauthorized: missing or invalid API key."}}, 401
            )
        query = body.get("query")
        if not isinstance(query, str):
            return JSONResponse({"detail": {"error": "query is required"}}, 400)
        max_results = body.get("max_results", 5)
        hits = self._hits(query)[: max_results if isinstance(max_results, int) else 5]
        return JSONResponse(
            {
                "query": query,
                "answer": None,
                "images": [],
                "results": [
                    {
                        "title": hit.title,
                        "url": hit.url,
                        "content": hit.content,
                        "score": hit.score,
                        "raw_content": None,
                    }
                    for hit in hits
                ],
                "response_time": 0.1,
            }
        )

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/search", self._searxng, methods=["GET"]),
                Route("/res/v1/web/search", self._brave, methods=["GET"]),
                Route("/tavily/search", self._tavily, methods=["POST"]),
            ]
        )
