"""Tests of the dev launcher engine: embedded services, the service stack and the process supervisor."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus

from core.contracts import SEARCH_ATTRIBUTE_NAMES
from core.settings import Settings
from devstack.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedSeaweedFS,
    EmbeddedService,
    EmbeddedTemporal,
    ServiceStartError,
)
from devstack.ports import free_port_block, port_is_free
from devstack.stack import ServiceStack
from devstack.supervisor import ProcessSupervisor
from storage.objects import ObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every probe socket stays bound until all are picked."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def free_temporal_port(taken: Sequence[int]) -> int:
    """A free port whose derived HTTP and metrics ports are free too, outside `taken`."""
    offsets = (0, EmbeddedTemporal.HTTP_PORT_OFFSET, EmbeddedTemporal.METRICS_PORT_OFFSET)
    while True:
        port = free_port()
        ports = [port + offset for offset in offsets]
        if max(ports) < 65536 and not set(ports) & set(taken) and all(map(port_is_free, ports)):
            return port


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(text in arg for arg in cmdline):
            found.append(process)
    return found


def descendants(service: EmbeddedService) -> list[int]:
    assert service.pid is not None
    leader = psutil.Process(service.pid)
    return [leader.pid, *(child.pid for child in leader.children(recursive=True))]


def stack_settings(data_dir: Path, **overrides: object) -> Settings:
    postgres_port, redis_port, ui_port = free_ports(3)
    values: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": None,
        "redis_url": None,
        "temporal_address": None,
        "embedded_postgres_port": postgres_port,
        "embedded_redis_port": redis_port,
        "embedded_temporal_port": free_temporal_port([postgres_port, redis_port, ui_port]),
        "embedded_temporal_ui_port": ui_port,
        "embedded_temporal_ui": False,
        "s3_endpoint_url": None,
        "embedded_s3_port": free_port_block(tuple(range(10))),
    }
    values.update(overrides)
    return Settings.model_validate(values)


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"
    # Whatever a test did, nothing it started may outlive it.
    leftovers = processes_mentioning(str(tmp_path))
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    assert not leftovers, f"processes survived the test: {leftovers}"


async def test_postgres_starts_with_durachat_database(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir, free_port()) as postgres:
        connection = await asyncpg.connect(postgres.dsn)
        try:
            assert await connection.fetchval("SELECT current_database()") == "durachat"
            assert await connection.fetchval("SHOW server_encoding") == "UTF8"
        finally:
            await connection.close()
    assert (data_dir / "logs" / "postgres.log").stat().st_size > 0


async def test_redis_starts_and_serves_streams(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir, free_port(), persistent=False) as server:
        client = aioredis.from_url(server.url)
        try:
            assert await client.ping()
            await client.xadd("turn:1", {"delta": "hello"})
            assert await client.xlen("turn:1") == 1
            assert await client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            await client.aclose()


async def test_temporal_starts_with_search_attributes_and_ui(data_dir: Path) -> None:
    import httpx

    port, ui_port, http_port, metrics_port = free_ports(4)
    temporal = EmbeddedTemporal(
        data_dir, port, ui_port, True, http_port=http_port, metrics_port=metrics_port
    )
    with temporal:
        client = await Client.connect(temporal.address)
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default")
        )
        registered = dict(response.custom_attributes)
        for name in SEARCH_ATTRIBUTE_NAMES:
            assert registered.get(name) == IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD, name
        assert temporal.ui_url is not None
        async with httpx.AsyncClient() as http:
            assert (await http.get(temporal.ui_url)).status_code == 200


async def test_seaweedfs_serves_s3_enforces_sigv4_and_binds_only_its_ports(
    data_dir: Path,
) -> None:
    port = free_port_block(tuple(range(10)))
    server = EmbeddedSeaweedFS(
        data_dir, port, access_key_id="durachat", secret_access_key="the-secret"
    )
    with server:
        store = ObjectStore(
            endpoint_url=server.endpoint_url,
            bucket="probe",
            region="us-east-1",
            access_key_id="durachat",
            secret_access_key="the-secret",
            connect_timeout_seconds=2,
            read_timeout_seconds=10,
        )
        async with store:
            await store.ensure_bucket()
            await store.ensure_bucket()
            await store.put_bytes("org1", "a.txt", b"hello", content_type="text/plain")
            assert await store.read_bytes("org1", "a.txt") == b"hello"
        listening = {
            connection.laddr.port
            for pid in descendants(server)
            for connection in psutil.Process(pid).net_connections("tcp")
            if connection.status == psutil.CONN_LISTEN
        }
        assert listening == {port + offset for offset in range(10)}
        pids = descendants(server)
    # It takes a few seconds to exit on SIGTERM; stop() waited for it.
    assert all(is_gone(pid) for pid in pids)
    # Small volumes: a fresh data directory does not preallocate gigabytes.
    used = sum(path.stat().st_size for path in (data_dir / "s3").rglob("*") if path.is_file())
    assert used < 200 * 1024 * 1024


def test_stack_does_not_start_twins_of_external_services(data_dir: Path) -> None:
    external_database = "postgresql+asyncpg://app:secret@db.internal:5432/durachat"
    external_temporal = "temporal.internal:7233"
    external_s3 = "https://s3.internal"
    settings = stack_settings(
        data_dir,
        database_url=external_database,
        temporal_address=external_temporal,
        s3_endpoint_url=external_s3,
    )
    with ServiceStack(settings, redis_persistent=False) as stack:
        assert [service.name for service in stack.services] == ["redis"]
        endpoints = stack.endpoints
        assert endpoints.database_url == external_database
        assert endpoints.temporal_address == external_temporal
        assert endpoints.temporal_ui_url is None
        assert endpoints.redis_url == settings.embedded_redis_url
        assert endpoints.as_environment() == {
            "DURACHAT_DATABASE_URL": external_database,
            "DURACHAT_REDIS_URL": settings.embedded_redis_url,
            "DURACHAT_TEMPORAL_ADDRESS": external_temporal,
            "DURACHAT_S3_ENDPOINT_URL": external_s3,
        }
    assert not (data_dir / "postgres").exists()
    assert not (data_dir / "s3").exists()
    assert not (data_dir / "temporal.db").exists()


def test_stack_stop_leaves_no_process_behind(data_dir: Path) -> None:
    with ServiceStack(stack_settings(data_dir), redis_persistent=False) as stack:
        assert {service.name for service in stack.services} == {
            "postgres",
            "redis",
            "temporal",
            "s3",
        }
        # Also by pid: Valkey rewrites its command line and Postgres backends have their own.
        pids = [pid for service in stack.services for pid in descendants(service)]
        assert processes_mentioning(str(data_dir))
    assert all(is_gone(pid) for pid in pids)
    assert processes_mentioning(str(data_dir)) == []


async def test_stack_restart_keeps_data(data_dir: Path) -> None:
    settings = stack_settings(data_dir)
    workflow_id = f"devstack-restart-{uuid.uuid4()}"

    with ServiceStack(settings) as stack:
        endpoints = stack.endpoints
        connection = await asyncpg.connect(asyncpg_dsn(endpoints.database_url))
        try:
            await connection.execute("CREATE TABLE notes (body text)")
            await connection.execute("INSERT INTO notes VALUES ('kept')")
        finally:
            await connection.close()
        redis_client = aioredis.from_url(endpoints.redis_url)
        try:
            await redis_client.xadd("turn:restart", {"delta": "kept"})
        finally:
            await redis_client.aclose()
        temporal = await Client.connect(endpoints.temporal_address)
        # No worker polls this queue: the execution stays open, and only persistence keeps it.
        await temporal.start_workflow(
            "DevstackRestartProbe", id=workflow_id, task_queue="devstack-restart-probe"
        )

    with ServiceStack(settings) as stack:
        endpoints = stack.endpoints
        connection = await asyncpg.connect(asyncpg_dsn(endpoints.database_url))
        try:
            assert await connection.fetchval("SELECT body FROM notes") == "kept"
        finally:
            await connection.close()
        redis_client = aioredis.from_url(endpoints.redis_url)
        try:
            entries = await redis_client.xrange("turn:restart")
            assert [fields for _, fields in entries or []] == [{b"delta": b"kept"}]
        finally:
            await redis_client.aclose()
        temporal = await Client.connect(endpoints.temporal_address)
        description = await temporal.get_workflow_handle(workflow_id).describe()
        assert description.workflow_type == "DevstackRestartProbe"
        assert description.status == WorkflowExecutionStatus.RUNNING


def test_port_in_use_gives_clear_error(data_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        postgres = EmbeddedPostgres(data_dir, port)
        with pytest.raises(
            ServiceStartError, match=rf"postgres cannot listen on 127\.0\.0\.1:{port}"
        ):
            postgres.start()
        assert not postgres.is_running()


def test_stack_start_failure_stops_started_services(data_dir: Path) -> None:
    settings = stack_settings(data_dir)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.embedded_postgres_port))
        squatter.listen()
        stack = ServiceStack(settings, redis_persistent=False)
        with pytest.raises(ServiceStartError, match="postgres cannot listen"):
            stack.start()
    assert stack.services == ()
    assert processes_mentioning(str(data_dir)) == []


def test_failed_start_reports_log_tail(data_dir: Path) -> None:
    # A directory where the SQLite file should be makes the server exit at once.
    (data_dir / "temporal.db").mkdir(parents=True)
    port, ui_port, http_port, metrics_port = free_ports(4)
    temporal = EmbeddedTemporal(
        data_dir, port, ui_port, False, http_port=http_port, metrics_port=metrics_port
    )
    temporal.start()
    try:
        with pytest.raises(ServiceStartError) as failure:
            temporal.wait_ready(timeout=20)
    finally:
        temporal.stop()
    message = str(failure.value)
    assert "temporal exited with code" in message
    assert str(temporal.log_path) in message
    assert "unable to open database file" in message


_LAUNCHER = """
import socket, sys
from pathlib import Path
from devstack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedTemporal

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

data_dir = Path(sys.argv[1])
service = {constructor}
service.start()
service.wait_ready(30)
# structlog writes to stdout; the pid goes to stderr, the one channel read.
print(service.pid, file=sys.stderr, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    "constructor",
    [
        "EmbeddedPostgres(data_dir, free_port())",
        "EmbeddedRedis(data_dir, free_port(), persistent=False)",
        "EmbeddedTemporal(data_dir, free_port(), free_port(), False,"
        " http_port=free_port(), metrics_port=free_port())",
    ],
    ids=["postgres", "redis", "temporal"],
)
def test_killed_launcher_leaves_no_orphan(data_dir: Path, constructor: str) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER.format(constructor=constructor), str(data_dir)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert launcher.stderr is not None
        server_pid = int(launcher.stderr.readline())
        server = psutil.Process(server_pid)
        pids = [server_pid, *(child.pid for child in server.children(recursive=True))]
        launcher.kill()
        launcher.wait()
        assert wait_until(lambda: all(is_gone(pid) for pid in pids)), "outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()


def test_supervisor_stops_everything_when_a_child_dies() -> None:
    output = io.StringIO()
    with ProcessSupervisor(stop_timeout=5, output=output) as supervisor:
        supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        supervisor.start(
            "crasher", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        )
        sleeper_pid = supervisor.pids["sleeper"]
        outcome = supervisor.wait()
    assert outcome.child is not None
    assert (outcome.child.name, outcome.child.returncode) == ("crasher", 3)
    assert outcome.signal is None
    assert outcome.exit_code == 1
    assert is_gone(sleeper_pid)
    assert "crasher | boom" in output.getvalue()


def test_supervisor_stops_children_on_sigterm() -> None:
    output = io.StringIO()
    with ProcessSupervisor(stop_timeout=5, output=output) as supervisor:
        supervisor.start(
            "api", [sys.executable, "-c", "import time; print('serving'); time.sleep(60)"]
        )
        api_pid = supervisor.pids["api"]

        def signal_once_wait_listens() -> None:
            # Only once wait() has installed its handler: the default SIGTERM would end pytest.
            wait_until(lambda: signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=signal_once_wait_listens).start()
        outcome = supervisor.wait()
    assert outcome.signal is signal.SIGTERM
    assert outcome.child is None
    assert outcome.exit_code == 128 + signal.SIGTERM
    assert is_gone(api_pid)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_supervisor_kills_child_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = textwrap.dedent(
        f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
        """
    )
    with ProcessSupervisor(stop_timeout=0.3, output=io.StringIO()) as supervisor:
        supervisor.start("stubborn", [sys.executable, "-c", stubborn])
        pid = supervisor.pids["stubborn"]
        assert wait_until(ready.exists)
        started = time.monotonic()
        supervisor.stop()
        assert time.monotonic() - started < 3
    assert is_gone(pid)
