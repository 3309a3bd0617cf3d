"""Redis and object store trouble as a 503 problem: an exhausted connection pool, or a Redis server that cannot be
reached, answers at once with `Retry-After` instead of a hang or a 500. Must never import routers."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError, TimeoutError

from api.problems import problem_response
from core.errors import ServiceUnavailableError
from storage.objects import ObjectStoreUnavailable
from storage.redis import RedisPoolExhaustedError

log = structlog.get_logger(__name__)

# Pool exhaustion passes as soon as a command or two complete; a Redis restart takes a few seconds.
POOL_EXHAUSTED_RETRY_AFTER_SECONDS = 1
REDIS_DOWN_RETRY_AFTER_SECONDS = 5


def unavailable_response(detail: str, retry_after: int) -> JSONResponse:
    """A 503 problem telling the client when to try again."""
    error = ServiceUnavailableError(detail, headers={"Retry-After": str(retry_after)})
    return problem_response(
        error.status_code,
        error.title,
        error.detail,
        problem_type=error.problem_type,
        extra={"retryAfter": retry_after},
        headers=error.headers,
    )


def install_redis_unavailable_handlers(app: FastAPI) -> None:
    """Map redis-py's connection errors (pool exhaustion is one) to `ServiceUnavailableError`."""

    async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RedisPoolExhaustedError):
            log.warning("api.redis_pool_exhausted", path=request.url.path, error=str(exc))
            retry_after = POOL_EXHAUSTED_RETRY_AFTER_SECONDS
            detail = "the service is busy: no Redis connection was free in time; retry shortly"
        else:
            log.warning("api.redis_unavailable", path=request.url.path, error=repr(exc))
            retry_after = REDIS_DOWN_RETRY_AFTER_SECONDS
            detail = "Redis is unreachable; retry shortly"
        return unavailable_response(detail, retry_after)

    app.add_exception_handler(ConnectionError, _redis_unavailable)
    app.add_exception_handler(TimeoutError, _redis_unavailable)


# An object store restart, like a Redis one, takes seconds.
OBJECT_STORE_DOWN_RETRY_AFTER_SECONDS = 5


def install_object_store_unavailable_handler(app: FastAPI) -> None:
    """An unreachable object store (uploads, file reads, sends carrying files) is a 503 with
    `Retry-After`; what the request had stored so far is removed by the code that stored it."""

    async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("api.object_store_unavailable", path=request.url.path, error=repr(exc))
        return unavailable_response(
            "the object store is unreachable; retry shortly", OBJECT_STORE_DOWN_RETRY_AFTER_SECONDS
        )

    app.add_exception_handler(ObjectStoreUnavailable, _store_unavailable)
