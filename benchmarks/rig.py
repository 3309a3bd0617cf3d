"""A private, throwaway durachat stack for benchmarks: embedded services, api and worker on free ports.

It never touches the default ports or `.durachat/`, so it runs next to a `make run` stack. Everything
it writes (service data, api/worker output, the launcher's own log lines) stays in one temporary
directory, kept only when asked or when the run failed, so a benchmark's terminal shows its report.

Stop order mirrors `durachat dev`: api and worker first (they drain against live services), then
Temporal, Redis, SeaweedFS and Postgres. Every child sits in its own process group and gets SIGTERM if
this process dies (see `devstack._process`), so a Ctrl-C or a crash leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx
import structlog

from core.settings import Environment, Settings
from devstack.embedded import EmbeddedSeaweedFS, EmbeddedTemporal
from devstack.ports import free_port_block
from devstack.stack import ServiceStack, StackEndpoints
from devstack.supervisor import ProcessSupervisor
from storage import api_keys
from storage.db import create_engine, create_session_factory
from storage.migrations import upgrade_database

__all__ = ["BenchRig", "RigError", "answers_readyz", "log_tail"]

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 60.0

log = structlog.get_logger(__name__)


class RigError(RuntimeError):
    """The stack could not be started or broke while measuring; the message says where to look."""


@dataclass(frozen=True)
class RigPorts:
    postgres: int
    redis: int
    temporal: int
    s3: int
    api: int

    @classmethod
    def pick(cls) -> RigPorts:
        taken: set[int] = set()
        # Temporal also binds its HTTP API and metrics ports at fixed offsets from its gRPC port.
        temporal_offsets = (
            0,
            EmbeddedTemporal.HTTP_PORT_OFFSET,
            EmbeddedTemporal.METRICS_PORT_OFFSET,
        )
        return cls(
            postgres=free_port_block(taken=taken),
            redis=free_port_block(taken=taken),
            temporal=free_port_block(temporal_offsets, taken=taken),
            # SeaweedFS binds nine more ports after its S3 port.
            s3=free_port_block((0, *EmbeddedSeaweedFS.INTERNAL_PORT_OFFSETS.values()), taken=taken),
            api=free_port_block(taken=taken),
        )


class BenchRig:
    """Start a complete durachat stack in a temporary directory; `stop()` (or the `with` exit) removes it all.

    Use it from the main thread: the children are tied to the thread that spawns them.
    `environment` adds `DURACHAT_*` settings of the api and the worker over the rig's own (a load
    benchmark raises the worker's concurrency, say).
    """

    def __init__(
        self, *, keep_work_dir: bool = False, environment: Mapping[str, str] | None = None
    ) -> None:
        self.keep_work_dir = keep_work_dir
        self.extra_environment = dict(environment or {})
        self.work_dir = Path(tempfile.mkdtemp(prefix="durachat-bench-"))
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir()
        self.ports = RigPorts.pick()
        self.settings = Settings(
            environment=Environment.DEVELOPMENT,
            data_dir=self.work_dir / "data",
            # Explicit Nones: a DURACHAT_*_URL in the caller's environment must not send the benchmark
            # to somebody's real services.
            database_url=None,
            redis_url=None,
            temporal_address=None,
            s3_endpoint_url=None,
            embedded_postgres_port=self.ports.postgres,
            embedded_redis_port=self.ports.redis,
            embedded_temporal_port=self.ports.temporal,
            embedded_temporal_ui=False,
            embedded_s3_port=self.ports.s3,
            api_port=self.ports.api,
            temporal_task_queue=f"durachat-bench-{uuid.uuid4().hex[:8]}",
        )
        self.api_url = f"http://{self.settings.api_host}:{self.ports.api}"
        self.api_key = ""
        self._stack = ServiceStack(self.settings, redis_persistent=False)
        # The worker has a supervisor of its own, so `restart_worker` can replace it alone.
        self._api_supervisor: ProcessSupervisor | None = None
        self._worker_supervisor: ProcessSupervisor | None = None
        self._process_environment: dict[str, str] = {}
        self._process_output: IO[str] | None = None
        self._stopped = False
        self.failed = False

    @property
    def process_log(self) -> Path:
        """Where the api's and the worker's output goes, prefixed with their names."""
        return self.log_dir / "api-worker.log"

    def start(self) -> None:
        _log_to_file(self.log_dir / "bench.log")
        try:
            endpoints = self._stack.start()
            upgrade_database(endpoints.database_url)
            self.api_key = asyncio.run(_create_api_key(endpoints.database_url))
            self._start_processes(endpoints)
            self._wait_until_ready()
        except BaseException:
            self.failed = True
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process this rig started, then delete the work dir unless it should be kept."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for supervisor in (self._api_supervisor, self._worker_supervisor):
                if supervisor is not None:
                    supervisor.close()
            self._api_supervisor = self._worker_supervisor = None
            if self._process_output is not None:
                self._process_output.close()
                self._process_output = None
            self._stack.stop()
        finally:
            if self.keep_work_dir or self.failed:
                log.info("bench.rig.kept", work_dir=str(self.work_dir))
            else:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def process_ids(self) -> dict[str, int]:
        """The pid of every server and service process this rig runs, by name, in a turn's path order."""
        pids: dict[str, int] = {}
        for supervisor in (self._api_supervisor, self._worker_supervisor):
            if supervisor is not None:
                pids.update(supervisor.pids)
        pids.update((service.name, service.pid) for service in self._stack.services if service.pid)
        order = ("api", "worker", "temporal", "postgres", "redis", "s3")
        return dict(sorted(pids.items(), key=lambda item: order.index(item[0])))

    def restart_worker(self, *, kill: bool = True) -> int:
        """Replace the worker: SIGKILL it (a crash: its activities are lost until their heartbeat
        times out) or, with `kill=False`, SIGTERM it (a graceful shutdown), wait until it is gone,
        then start a new one. Returns the new worker's pid. Call it from the thread that started
        the rig.
        """
        if self._worker_supervisor is None:
            raise RigError("the rig is not running")
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._worker_supervisor.pids["worker"], signal.SIGKILL)
        # SIGTERMs what is still alive, waits for it and reaps it.
        self._worker_supervisor.close()
        self._worker_supervisor = self._start_role("worker")
        return self._worker_supervisor.pids["worker"]

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.process_log, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.failed = True
        self.stop()

    def _start_processes(self, endpoints: StackEndpoints) -> None:
        self._process_environment = {
            **endpoints.as_environment(),
            "DURACHAT_ENVIRONMENT": self.settings.environment.value,
            "DURACHAT_DATA_DIR": str(self.settings.data_dir),
            "DURACHAT_API_HOST": self.settings.api_host,
            "DURACHAT_API_PORT": str(self.ports.api),
            "DURACHAT_TEMPORAL_TASK_QUEUE": self.settings.temporal_task_queue,
            # Every benchmark turn comes from one key, as fast as the rig can send: the per-key and
            # per-organization limits would otherwise be what gets measured.
            "DURACHAT_SEND_RATE_LIMIT": "",
            "DURACHAT_STREAM_OPEN_RATE_LIMIT": "",
            "DURACHAT_MAX_OPEN_STREAMS_PER_KEY": "0",
            "DURACHAT_MAX_ACTIVE_TURNS_PER_ORGANIZATION": "0",
            **self.extra_environment,
        }
        # Line-buffered: the supervisor writes whole lines, and a reader of the file during a run
        # (tail -f) should see them as they come.
        self._process_output = self.process_log.open("a", buffering=1, encoding="utf-8")
        self._worker_supervisor = self._start_role("worker")
        self._api_supervisor = self._start_role("api")

    def _start_role(self, role: str) -> ProcessSupervisor:
        supervisor = ProcessSupervisor(output=self._process_output)
        supervisor.start(
            role,
            [sys.executable, "-m", "cli", role],
            env=self._process_environment,
            cwd=REPO_ROOT,
        )
        return supervisor

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if answers_readyz(self.api_url):
                return
            time.sleep(0.2)
        raise RigError(
            f"the api was not ready within {READY_TIMEOUT_SECONDS:.0f}s; "
            f"last lines of {self.process_log}:\n{self.log_tail()}"
        )


def answers_readyz(url: str) -> bool:
    """Whether the server at `url` answers GET /readyz with 200; not answering at all is a no."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or "" when there is none yet."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


async def _create_api_key(database_url: str) -> str:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine).begin() as session:
            organization_id = await api_keys.ensure_organization(session, "bench")
            created = await api_keys.create_key(
                session, organization_id, is_admin=True, name="bench"
            )
    finally:
        await engine.dispose()
    return created.secret


def _log_to_file(path: Path) -> None:
    """Send this process's structlog and stdlib records (devstack, alembic) to `path`, not the terminal."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    # A run of several rigs in one process (`benchmarks.suite`) replaces the last rig's file.
    for previous in root.handlers:
        previous.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
