"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import StateDep
from api.problems import problem_response
from api.state import AppState

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    # Never touches a dependency: it must answer while Postgres, Redis or Temporal is down.
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Postgres, Redis, Temporal and the object store are reachable",
    responses={
        503: {"description": "A dependency is down", "content": {"application/problem+json": {}}}
    },
)
async def readyz(state: StateDep) -> JSONResponse:
    checks: dict[str, Callable[[AppState], Awaitable[object]]] = {
        "postgres": _check_postgres,
        "redis": _check_redis,
        "temporal": _check_temporal,
        "objects": _check_objects,
    }
    results = await asyncio.gather(
        *(asyncio.wait_for(check(state), CHECK_TIMEOUT_SECONDS) for check in checks.values()),
        return_exceptions=True,
    )
    down = [
        name
        for name, result in zip(checks, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if down:
        return problem_response(
            503,
            "Service Unavailable",
            "unreachable: " + ", ".join(down),
            problem_type="/problems/not-ready",
            extra={"down": down},
        )
    return JSONResponse({"status": "ready", "checks": dict.fromkeys(checks, "ok")})


async def _check_postgres(state: AppState) -> None:
    async with state.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def _check_redis(state: AppState) -> None:
    await state.redis.ping()


async def _check_temporal(state: AppState) -> None:
    await state.temporal.service_client.check_health()


async def _check_objects(state: AppState) -> None:
    await state.objects.ping()
