"""The api's answer while Postgres is unavailable: a fast 503 problem with `Retry-After`, never a 500.
Never imports routers."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from api.problems import problem_response
from storage.db import is_database_unavailable

# A short fixed hint: an outage ends whenever the database is back, which no clock predicts, and a
# restarted Postgres serves again within seconds.
RETRY_AFTER_SECONDS = 2
log = structlog.get_logger(__name__)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    if not is_database_unavailable(exc):
        # A constraint, a bug, or an OSError of something else: the generic 500 handler's.
        raise exc
    # One line, no traceback: during an outage every request fails this way, and rendering a
    # traceback per request would cost the event loop more than the outage itself.
    log.warning(
        "api.database_unavailable",
        path=request.url.path,
        error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
    )
    return problem_response(
        503,
        "Service Unavailable",
        "the database is unavailable; try again shortly",
        problem_type="/problems/database-unavailable",
        extra={"retryAfter": RETRY_AFTER_SECONDS},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def install_database_error_handler(app: FastAPI) -> None:
    # SQLAlchemy wraps what the server says (starting up, shutting down, a statement timeout, a
    # connection that died) in DBAPIError; a connection that cannot be opened (refused, reset, timed
    # out) surfaces from asyncpg as a plain OSError, which no other client of the api raises unwrapped.
    for error_class in (DBAPIError, PoolTimeoutError, OSError):
        app.add_exception_handler(error_class, _database_unavailable)
