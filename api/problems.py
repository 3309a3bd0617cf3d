"""RFC 9457 problem responses: every error the api returns is `application/problem+json`, of one family
of types (`/problems/<name>`). Must never import routers."""

from __future__ import annotations

import re
from http import HTTPMethod, HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from core.errors import BudgetExceededError, DurachatError
from storage.budgets import BudgetExhausted
from storage.chats import iso
from storage.turn_usage import usd_text

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "/problems/"
# A 422 lists this many of its errors (and counts them all): one body of many thousand unknown keys
# would otherwise answer megabytes.
LISTED_VALIDATION_ERRORS = 20
log = structlog.get_logger(__name__)


def problem_type_for(status: int) -> str:
    """The problem type of a plain HTTP status: `/problems/not-found`, `/problems/method-not-allowed`."""
    return PROBLEM_TYPE_PREFIX + re.sub(r"[^a-z0-9]+", "-", _reason(status).lower()).strip("-")


def problem_body(
    status: int,
    title: str,
    detail: str,
    *,
    problem_type: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type or problem_type_for(status),
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra or {})
    return body


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    problem_type: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, problem_type=problem_type, extra=extra),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


_BUDGET_OWNERS = {"organization": "the organization's", "user": "the user's"}


def budget_exceeded_error(exhausted: BudgetExhausted) -> BudgetExceededError:
    """The 403 problem of a send that a spent budget refuses."""
    owner = exhausted.budget.split(".")[0]
    limit, spent = usd_text(exhausted.limit_usd), usd_text(exhausted.spent_usd)
    if exhausted.resets_at is not None:
        resets_at: str | None = iso(exhausted.resets_at)
        detail = (
            f"{_BUDGET_OWNERS[owner]} weekly budget ({exhausted.budget}) of {limit} USD is spent: "
            f"{spent} USD this week; it resets at {resets_at}"
        )
    else:
        resets_at = None
        detail = (
            f"{_BUDGET_OWNERS[owner]} per-chat budget ({exhausted.budget}) of {limit} USD is "
            f"spent in this chat: {spent} USD"
        )
    return BudgetExceededError(
        detail,
        budget=exhausted.budget,
        limit_usd=limit,
        spent_usd=spent,
        remaining_usd=usd_text(exhausted.remaining_usd),
        resets_at=resets_at,
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(DurachatError)
    async def _durachat_error(request: Request, exc: DurachatError) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return problem_response(
            exc.status_code,
            exc.title,
            exc.detail,
            problem_type=exc.problem_type,
            extra=exc.extra,
            headers=headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()
        errors = [
            {
                "loc": list(error.get("loc", ())),
                "msg": error.get("msg", ""),
                "type": error.get("type", ""),
            }
            for error in found[:LISTED_VALIDATION_ERRORS]
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        if len(found) > 1:
            detail += f" (and {len(found) - 1} more)"
        return problem_response(
            422,
            "Unprocessable Content",
            detail,
            problem_type="/problems/validation",
            extra={"errors": errors, "errorCount": len(found)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else {}
        detail = str(exc.detail)
        if exc.status_code == 405:
            # The router names only the methods of the first route whose path matched.
            allowed = ", ".join(allowed_methods(request.app, request.scope))
            headers["Allow"] = allowed
            detail = f"{request.method} is not allowed here; this path allows {allowed}"
        elif exc.status_code == 404 and detail == _reason(404):
            detail = "no endpoint at this path"
        return problem_response(
            exc.status_code, _reason(exc.status_code), detail, headers=headers or None
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unhandled_error", path=request.url.path)
        return problem_response(500, "Internal Server Error", "an unexpected error occurred")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route answers at the path of `scope`, HEAD wherever GET works."""
    allowed = {
        method.value
        for method in HTTPMethod
        if any(
            # A copy per question: matching records what it found in the scope it is given.
            route.matches({**scope, "method": method.value, "fastapi": {}})[0] is Match.FULL
            for route in app.router.routes
        )
    }
    if HTTPMethod.GET.value in allowed:
        allowed.add(HTTPMethod.HEAD.value)
    return sorted(allowed)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
