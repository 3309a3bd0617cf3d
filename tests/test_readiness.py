"""Liveness and readiness probes: ready on the session stack, and a 503 naming exactly what is down.

The outage tests run an api process of their own, pointed at a service they can take away, so the
session stack's services are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from core.settings import Settings
from devstack.embedded import EmbeddedRedis
from devstack.ports import free_port_block
from tests.conftest import process_environment
from tests.support.processes import ServiceProcess, wait_until_ready


async def test_healthz_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_every_dependency_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"postgres": "ok", "redis": "ok", "temporal": "ok", "objects": "ok"},
    }


@contextmanager
def api_process(
    settings: Settings, log_dir: Path, overrides: dict[str, str]
) -> Iterator[tuple[ServiceProcess, str]]:
    """An api of its own on a free port, configured like the session's except for `overrides`."""
    port = free_port_block()
    environment = {**process_environment(settings), "DURACHAT_API_PORT": str(port), **overrides}
    process = ServiceProcess("api", environment, log_dir)
    process.start()
    try:
        yield process, f"http://{settings.api_host}:{port}"
    finally:
        process.stop()


def poll_readyz(
    base_url: str,
    process: ServiceProcess,
    until: Callable[[httpx.Response], bool],
    timeout: float = 30.0,
) -> httpx.Response:
    """The first /readyz response that satisfies `until`."""
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        assert process.process is not None
        if process.process.poll() is not None:
            raise AssertionError(f"the api exited:\n{process.log_tail()}")
        try:
            last = httpx.get(f"{base_url}/readyz", timeout=5)
            if until(last):
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    detail = last.text if last is not None else "no response"
    raise AssertionError(f"/readyz never matched in {timeout}s: {detail}\n{process.log_tail()}")


def assert_not_ready_because_of(response: httpx.Response, service: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"] == "/problems/not-ready"
    assert problem["title"] == "Service Unavailable"
    assert problem["status"] == 503
    assert problem["down"] == [service]
    assert problem["detail"] == f"unreachable: {service}"


def test_readyz_names_redis_when_redis_goes_down(settings: Settings, tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis-data", free_port_block(), persistent=False)
    with redis, api_process(settings, tmp_path, {"DURACHAT_REDIS_URL": redis.url}) as (api, url):
        wait_until_ready(url, api)

        redis.stop()

        response = poll_readyz(url, api, until=lambda response: response.status_code != 200)
        assert_not_ready_because_of(response, "redis")


def test_readyz_names_postgres_when_nothing_listens(settings: Settings, tmp_path: Path) -> None:
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port_block()}/durachat"
    with api_process(settings, tmp_path, {"DURACHAT_DATABASE_URL": unreachable}) as (api, url):
        response = poll_readyz(url, api, until=lambda _: True)

        assert_not_ready_because_of(response, "postgres")


def test_readyz_names_the_object_store_when_nothing_listens(
    settings: Settings, tmp_path: Path
) -> None:
    unreachable = f"http://127.0.0.1:{free_port_block()}"
    with api_process(settings, tmp_path, {"DURACHAT_S3_ENDPOINT_URL": unreachable}) as (api, url):
        response = poll_readyz(url, api, until=lambda _: True)

        assert_not_ready_because_of(response, "objects")
