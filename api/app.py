"""The FastAPI application factory and its lifespan: clients are built here, once per process, never at import."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.body_bounds import JsonBodyBoundsMiddleware
from api.database_errors import install_database_error_handler
from api.deps import KnownQueryParameters, StorableParameters
from api.docs_page import install_docs_page
from api.http_semantics import HeadAsGetMiddleware, ProblemHttpToolsProtocol
from api.limits import RequestSizeLimitMiddleware
from api.openapi import install_openapi
from api.problems import install_problem_handlers
from api.routers import (
    approvals,
    budgets,
    chat_management,
    chats,
    discord,
    files,
    health,
    keys,
    models,
    slack,
    toolkits,
    webhooks,
)
from api.state import AppState
from api.unavailable import (
    install_object_store_unavailable_handler,
    install_redis_unavailable_handlers,
)
from core.logging import configure_logging
from core.settings import Settings, get_settings
from core.temporal import connect_temporal
from providers.registry import ProviderRegistry
from storage.db import DatabaseTimeouts, create_engine, create_session_factory
from storage.limits import RateLimiter, StreamLeases
from storage.lost_turns import LostTurns
from storage.objects import ObjectStore
from storage.redis import create_redis
from storage.stream_reader import MultiplexedStreamReader
from storage.streams import TurnStreams

log = structlog.get_logger(__name__)

# Every response header the README documents, readable by browser apps on another origin.
EXPOSED_RESPONSE_HEADERS = (
    "X-Chat-Id",
    "X-Turn-Id",
    "X-Queue-Position",
    "X-Request-Id",
    "Retry-After",
    "x-vercel-ai-ui-message-stream",
)


class RequestIdMiddleware:
    """Gives every request an id (the caller's `X-Request-Id` or a new one), logs it, and echoes it back.

    Plain ASGI rather than BaseHTTPMiddleware, which would buffer and break streaming responses.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "api.request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )


@asynccontextmanager
async def build_state(
    settings: Settings, *, client_name: str = "durachat-api", read_streams: bool = True
) -> AsyncIterator[AppState]:
    """The api's process-wide resources, built once and closed on exit. Other processes that start
    turns as the api does (the Discord Gateway process) build theirs here too; `read_streams`
    False leaves the shared stream reader unstarted, for a process that never relays a stream."""
    engine = create_engine(
        settings.resolved_database_url, timeouts=DatabaseTimeouts.from_settings(settings)
    )
    redis = create_redis(
        settings.resolved_redis_url,
        max_connections=settings.redis_max_connections,
        pool_timeout_seconds=settings.redis_pool_timeout_seconds,
        client_name=client_name,
    )
    providers = ProviderRegistry.from_settings(settings)
    resources = AsyncExitStack()
    try:
        objects = await resources.enter_async_context(ObjectStore.from_settings(settings))
        await objects.ensure_bucket_if_reachable()
        streams = TurnStreams(
            redis,
            max_lifetime_seconds=settings.stream_max_lifetime_seconds,
            retention_seconds=settings.stream_retention_seconds,
        )
        stream_reader = MultiplexedStreamReader(
            streams,
            settings.resolved_redis_url,
            redis,
            connections=settings.stream_reader_connections,
            buffer_entries=settings.stream_subscriber_buffer_entries,
        )
        temporal = await connect_temporal(settings)
        state = AppState(
            settings=settings,
            engine=engine,
            sessions=create_session_factory(engine),
            redis=redis,
            streams=streams,
            stream_reader=stream_reader,
            temporal=temporal,
            providers=providers,
            rate_limiter=RateLimiter(redis, settings.resolved_redis_url),
            stream_leases=StreamLeases(redis, lease_seconds=settings.stream_lease_seconds),
            lost_turns=LostTurns(temporal, streams),
            objects=objects,
        )
        if read_streams:
            # Last in, so it stops first: before the object store and the clients it reads with.
            await resources.enter_async_context(stream_reader)
        yield state
    finally:
        await resources.aclose()
        await providers.aclose()
        await redis.aclose()
        await engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with build_state(settings) as state:
            app.state.durachat = state
            log.info("api.started", host=settings.api_host, port=settings.api_port)
            yield

    app = FastAPI(
        title="durachat",
        version="0.1.0",
        summary="Durable multi-tenant AI chat: every turn a Temporal workflow, streamed as the AI SDK UI message stream.",
        lifespan=lifespan,
        # Served by install_docs_page from packaged assets; ReDoc would load its own from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_problem_handlers(app)
    install_database_error_handler(app)
    install_redis_unavailable_handlers(app)
    install_object_store_unavailable_handler(app)
    install_openapi(app)
    install_docs_page(app)
    app.include_router(health.router)
    # Before chats: its fixed paths (`/v1/chats/by-external`) must win over `/v1/chats/{chat_id}`.
    parameter_checks = [KnownQueryParameters, StorableParameters]
    app.include_router(chat_management.router, dependencies=parameter_checks)
    app.include_router(files.router, dependencies=parameter_checks)
    app.include_router(chats.router, dependencies=parameter_checks)
    app.include_router(keys.router, dependencies=parameter_checks)
    app.include_router(budgets.router, dependencies=parameter_checks)
    app.include_router(models.router, dependencies=parameter_checks)
    app.include_router(toolkits.router, dependencies=parameter_checks)
    app.include_router(approvals.router, dependencies=parameter_checks)
    app.include_router(webhooks.router, dependencies=parameter_checks)
    app.include_router(discord.router, dependencies=parameter_checks)
    app.include_router(slack.router, dependencies=parameter_checks)
    # Inside the size limit, so the body it holds is bounded; outside everything that parses one.
    app.add_middleware(
        JsonBodyBoundsMiddleware,
        max_depth=settings.max_json_depth,
        max_items=settings.max_json_items,
    )
    # Inside CORS (so a browser can read the 413) and outside everything that reads a body.
    app.add_middleware(
        RequestSizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        upload_max_bytes=settings.max_upload_request_bytes,
    )
    # Everything inside sees a HEAD as the GET it answers like.
    app.add_middleware(HeadAsGetMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_RESPONSE_HEADERS),
        )
    app.add_middleware(RequestIdMiddleware)
    return app


def serve(settings: Settings) -> None:
    """Run the api under uvicorn (the `durachat api` command)."""
    import uvicorn

    configure_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        http=ProblemHttpToolsProtocol,
        # The relay streams for minutes; shutting down should not wait for every open stream forever.
        timeout_graceful_shutdown=5,
    )
