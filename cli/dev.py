"""`durachat dev` and `durachat services`: the local stack in one terminal, built on devstack."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click
import httpx

from core.settings import Settings
from devstack.stack import ServiceStack, StackEndpoints
from devstack.supervisor import ProcessSupervisor
from storage import api_keys
from storage.db import create_engine, create_session_factory
from storage.migrations import upgrade_database

READY_TIMEOUT_SECONDS = 60.0


def run_services(settings: Settings) -> None:
    with ServiceStack(settings) as stack:
        endpoints = stack.endpoints
        click.echo(
            "# Embedded services are up. Point `durachat api` and `durachat worker` at them with:"
        )
        for name, value in endpoints.as_environment().items():
            click.echo(f"export {name}={value}")
        if endpoints.temporal_ui_url:
            click.echo(f"# Temporal UI: {endpoints.temporal_ui_url}")
        click.echo(f"# Object store (S3): {endpoints.s3_endpoint_url}")
        click.echo("# Ctrl-C stops them. A service that dies is started again.")
        _wait_for_signal(while_waiting=stack.restart_exited)


def run_dev(settings: Settings) -> None:
    with ServiceStack(settings) as stack:
        endpoints = stack.endpoints
        upgrade_database(endpoints.database_url)
        secret = asyncio.run(_ensure_dev_key(settings, endpoints))
        environment = endpoints.as_environment()
        with ProcessSupervisor() as supervisor:
            for role in ("worker", "api"):
                supervisor.start(role, [sys.executable, "-m", "cli", role], env=environment)
            api_url = f"http://{settings.api_host}:{settings.api_port}"
            _wait_until_ready(api_url, supervisor)
            _print_banner(api_url, endpoints, secret)
            outcome = supervisor.wait(tick=stack.restart_exited)
        # A Ctrl-C or SIGTERM is the normal way to stop the dev stack; only a crashed child is a failure.
        if outcome.child is not None:
            raise SystemExit(outcome.exit_code)


async def _ensure_dev_key(settings: Settings, endpoints: StackEndpoints) -> str:
    """The dev organization's admin key: DURACHAT_DEV_API_KEY if set, else one kept in the data dir."""
    if settings.dev_api_key is not None:
        secret = settings.dev_api_key.get_secret_value()
    else:
        secret = _stored_dev_secret(settings.data_dir / "dev-api-key")
    engine = create_engine(endpoints.database_url, pool_size=1)
    try:
        async with create_session_factory(engine).begin() as session:
            organization_id = await api_keys.ensure_organization(session, settings.dev_organization)
            await api_keys.ensure_key_with_secret(session, organization_id, secret, name="dev")
    finally:
        await engine.dispose()
    return secret


def _stored_dev_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    secret = api_keys.generate_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def _wait_until_ready(api_url: str, supervisor: ProcessSupervisor) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if len(supervisor.pids) < 2:
            raise click.ClickException(
                "the api or the worker exited during start-up; see its output above"
            )
        try:
            if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"the api did not become ready within {READY_TIMEOUT_SECONDS:.0f}s")


def _print_banner(api_url: str, endpoints: StackEndpoints, secret: str) -> None:
    lines = [
        "",
        "durachat is ready.",
        f"  API          {api_url}   (OpenAPI docs: {api_url}/docs)",
        f"  Temporal     {endpoints.temporal_address}   (pass --address to the temporal CLI)",
        f"  Temporal UI  {endpoints.temporal_ui_url or 'none: Temporal is external'}",
        f"  Object store {endpoints.s3_endpoint_url}   (S3, path-style)",
        f"  Dev API key  {secret}",
        "",
        "Try:",
        f"  curl -N {api_url}/v1/chats -H 'Authorization: Bearer {secret}' \\",
        "       -H 'Content-Type: application/json' -d '{\"message\": \"Hello there\"}'",
        f"  temporal workflow list --address {endpoints.temporal_address} --query 'ExecutionStatus=\"Failed\"'",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    click.echo("\n".join(lines))


def _wait_for_signal(while_waiting: Callable[[], object]) -> None:
    """Block until SIGINT/SIGTERM, calling `while_waiting` about twice a second from this thread."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        while_waiting()
