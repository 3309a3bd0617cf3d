"""A killed embedded service is reaped at once and started again by the launcher, with its data:
`durachat services` run as a user runs it, its Postgres SIGKILLed."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest

from devstack.ports import free_port_block
from devstack.supervisor import ProcessSupervisor

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def reaped(pid: int) -> bool:
    """Gone for good: not even a zombie waiting for its parent."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


async def serves(dsn: str) -> bool:
    try:
        connection = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


@dataclass(frozen=True)
class ServicesLauncher:
    process: subprocess.Popen[bytes]
    output: Path
    pgdata: Path
    dsn: str


@pytest.fixture
def services_launcher(tmp_path: Path) -> Iterator[ServicesLauncher]:
    """`durachat services` with only Postgres embedded, up and serving."""
    data_dir, port = tmp_path / "data", free_port_block()
    output = tmp_path / "services.log"
    environment = {
        **os.environ,
        "DURACHAT_DATA_DIR": str(data_dir),
        "DURACHAT_EMBEDDED_POSTGRES_PORT": str(port),
        # Set, so only Postgres is embedded; `durachat services` never connects to them.
        "DURACHAT_REDIS_URL": "redis://127.0.0.1:1/0",
        "DURACHAT_TEMPORAL_ADDRESS": "127.0.0.1:1",
        "DURACHAT_S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "PYTHONUNBUFFERED": "1",
    }
    with output.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "services"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(lambda: "Embedded services are up" in output.read_text()), (
            output.read_text()
        )
        yield ServicesLauncher(
            process,
            output,
            data_dir / "postgres",
            f"postgresql://postgres@127.0.0.1:{port}/durachat",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_durachat_services_restarts_a_killed_postgres_with_its_data(
    services_launcher: ServicesLauncher,
) -> None:
    launcher = services_launcher
    connection = await asyncpg.connect(launcher.dsn)
    await connection.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('x')")
    await connection.close()
    killed = postmaster_pid(launcher.pgdata)
    assert killed is not None
    assert psutil.Process(killed).ppid() == launcher.process.pid

    os.kill(killed, signal.SIGKILL)

    assert await asyncio.to_thread(wait_until, lambda: reaped(killed)), (
        "the killed postmaster is left a zombie"
    )

    async def restarted() -> bool:
        current = postmaster_pid(launcher.pgdata)
        return current not in (None, killed) and await serves(launcher.dsn)

    deadline = time.monotonic() + 60
    while not await restarted():
        assert time.monotonic() < deadline, launcher.output.read_text()[-3000:]
        await asyncio.sleep(0.1)
    connection = await asyncpg.connect(launcher.dsn)
    try:
        assert await connection.fetchval("SELECT value FROM kept") == "x"
    finally:
        await connection.close()
    assert launcher.process.poll() is None
    assert "devstack.postgres.exited" in launcher.output.read_text()


def test_supervisor_wait_calls_its_tick_while_children_run() -> None:
    ticks: list[float] = []
    with ProcessSupervisor(stop_timeout=5, output=io.StringIO()) as supervisor:
        supervisor.start("short", [sys.executable, "-c", "import time; time.sleep(1.5)"])
        outcome = supervisor.wait(tick=lambda: ticks.append(time.monotonic()), tick_seconds=0.1)
    assert outcome.child is not None
    assert outcome.child.name == "short"
    assert len(ticks) >= 3
