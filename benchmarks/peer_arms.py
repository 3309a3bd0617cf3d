"""The benchmark's peers: two other servers answering the same turns, started beside the rig and timed like durachat's api.

- stateless (`benchmarks.peers.stateless_sse`): FastAPI + sse-starlette streaming `local/lorem`
  straight from the request handler; nothing durable.
- resumable (Node) (`benchmarks/peers/resumable/server.mjs`): the AI SDK's resumable-chat recipe, the
  UI message stream over Vercel's `resumable-stream` on the rig's Redis, messages in the rig's Postgres.

`PeerServers.start` runs each on a free loopback port as a child of the benchmark process, in its own
process group and sent SIGTERM if the benchmark dies (`devstack._process.spawn`, as the rig's
services), and waits until it answers `/readyz`; `stop` ends them before the rig stops Redis and
Postgres. Their output goes to one log file beside the rig's. The arms are `UiStreamArm`s, so a peer
turn is timed by the same reader, on the same clock, as a turn through durachat's api.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

from benchmarks.arms import UiStreamArm
from benchmarks.rig import RigError, answers_readyz, log_tail
from devstack._process import spawn, stop_child
from devstack.ports import free_port_block

__all__ = [
    "RESUMABLE_ARM",
    "STATELESS_ARM",
    "PeerServers",
    "PeerStartError",
    "ResumableArm",
    "StatelessArm",
    "node_versions",
    "resumable_unavailable",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESUMABLE_DIR = REPO_ROOT / "benchmarks" / "peers" / "resumable"
STATELESS_ARM = "stateless"
RESUMABLE_ARM = "resumable (Node)"
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 5.0
HOST = "127.0.0.1"
# The npm packages on a resumable turn's path whose version changes the figures.
_NODE_PACKAGES = ("ai", "resumable-stream", "redis", "pg")

# A peer's command line, given the port it is to listen on.
_Argv = Callable[[int], list[str]]


class PeerStartError(RigError):
    """A peer server did not start or answer `/readyz`; the message carries its log's last lines."""


class StatelessArm(UiStreamArm):
    """Turns answered by the stateless FastAPI peer."""

    def __init__(self, url: str, *, max_connections: int, timeout: float) -> None:
        super().__init__(STATELESS_ARM, url, max_connections=max_connections, timeout=timeout)


class ResumableArm(UiStreamArm):
    """Turns answered by the Node peer built on `ai` and `resumable-stream`."""

    def __init__(self, url: str, *, max_connections: int, timeout: float) -> None:
        super().__init__(RESUMABLE_ARM, url, max_connections=max_connections, timeout=timeout)


@dataclass
class _Peer:
    arm_name: str
    # Its name in the CPU figures.
    process_name: str
    url: str
    process: subprocess.Popen[bytes]


def resumable_unavailable() -> str | None:
    """Why the Node peer cannot run on this machine, or None when it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (RESUMABLE_DIR / "node_modules").is_dir():
        relative = (RESUMABLE_DIR / "node_modules").relative_to(REPO_ROOT)
        return f"{relative} is missing (`make {relative}` installs it)"
    return None


def node_versions() -> str:
    """Node's version and those of the peer's packages, as installed."""
    node = shutil.which("node")
    if node is None:
        return ""
    found = [
        "node "
        + subprocess.run(
            [node, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    ]
    for package in _NODE_PACKAGES:
        manifest = RESUMABLE_DIR / "node_modules" / package / "package.json"
        try:
            found.append(f"{package} {json.loads(manifest.read_text())['version']}")
        except (OSError, ValueError, KeyError):
            continue
    return ", ".join(found)


class PeerServers:
    """Start the peer servers on free ports against the rig's Redis and Postgres; `stop()` ends them.

    Use it from the main thread, like the rig: the children are tied to the thread that spawns them.
    """

    def __init__(
        self, *, redis_url: str, database_url: str, log_path: Path, resumable: bool
    ) -> None:
        self.redis_url = redis_url
        # The rig's URL names SQLAlchemy's driver (`postgresql+asyncpg://`); node-postgres wants
        # the plain scheme. The embedded Postgres listens on loopback TCP with trust auth.
        self.database_url = (
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        self.log_path = log_path
        self.resumable = resumable
        self._peers: list[_Peer] = []
        self._output: IO[bytes] | None = None

    def start(self) -> None:
        try:
            self._output = self.log_path.open("ab")
            self._spawn(
                STATELESS_ARM,
                "stateless",
                lambda port: [
                    sys.executable,
                    "-m",
                    "benchmarks.peers.stateless_sse",
                    "--port",
                    str(port),
                ],
                cwd=REPO_ROOT,
                env={"PYTHONUNBUFFERED": "1"},
            )
            if self.resumable:
                node = shutil.which("node") or "node"
                self._spawn(
                    RESUMABLE_ARM,
                    "resumable",
                    lambda port: [node, "server.mjs", "--port", str(port)],
                    cwd=RESUMABLE_DIR,
                    env={"REDIS_URL": self.redis_url, "DATABASE_URL": self.database_url},
                )
            for peer in self._peers:
                self._wait_until_ready(peer)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        while self._peers:
            peer = self._peers.pop()
            stop_child(
                peer.process,
                name=peer.process_name,
                stop_signal=signal.SIGTERM,
                timeout=STOP_TIMEOUT_SECONDS,
                whole_group=True,
            )
        if self._output is not None:
            self._output.close()
            self._output = None

    def process_ids(self) -> dict[str, int]:
        """The pid of each peer server, by its name in the CPU figures."""
        return {peer.process_name: peer.process.pid for peer in self._peers}

    def process_names(self) -> dict[str, str]:
        """Each running peer's name in the CPU figures, by its arm's name."""
        return {peer.arm_name: peer.process_name for peer in self._peers}

    def arms(self, *, max_connections: int, timeout: float) -> list[UiStreamArm]:
        """One arm per running peer, in start order (stateless, then resumable)."""
        arm_classes: dict[str, type[StatelessArm | ResumableArm]] = {
            STATELESS_ARM: StatelessArm,
            RESUMABLE_ARM: ResumableArm,
        }
        return [
            arm_classes[peer.arm_name](peer.url, max_connections=max_connections, timeout=timeout)
            for peer in self._peers
        ]

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def _spawn(
        self,
        arm_name: str,
        process_name: str,
        argv: _Argv,
        *,
        cwd: Path,
        env: dict[str, str],
    ) -> None:
        assert self._output is not None
        port = free_port_block()
        self._output.write(f"--- {process_name} on port {port}\n".encode())
        self._output.flush()
        process = spawn(
            argv(port),
            death_signal=signal.SIGTERM,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=cwd,
        )
        self._peers.append(_Peer(arm_name, process_name, f"http://{HOST}:{port}", process))

    def _wait_until_ready(self, peer: _Peer) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if peer.process.poll() is not None:
                raise PeerStartError(
                    f"the {peer.arm_name} peer exited with code {peer.process.returncode}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if answers_readyz(peer.url):
                return
            time.sleep(0.2)
        raise PeerStartError(
            f"the {peer.arm_name} peer was not ready within {READY_TIMEOUT_SECONDS:.0f}s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )
