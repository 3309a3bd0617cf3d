"""Run named long-lived child commands (api, worker) until a signal or a crash; never imports api, workflows or activities.

Who stops whom:

- Every child runs in its own process group, so a terminal Ctrl-C (SIGINT to the foreground group)
  reaches only the launcher. `ProcessSupervisor.wait()` turns SIGINT/SIGTERM into a return value.
- `wait()` also returns when any child exits on its own: one dead process (say, the worker) would
  otherwise leave a stack that looks alive and serves nothing.
- `stop()` then sends SIGTERM to every child's process group at once (api and worker shut down
  gracefully in parallel, nothing in one waits for the other: turns are durable in Temporal), waits
  for all of them against one shared deadline, and SIGKILLs the groups still alive after it.
- The caller stops the backing services only after `stop()` returns (`ServiceStack.__exit__` in
  `durachat dev`), so api and worker never lose Temporal, Postgres or Redis while draining.
- If the launcher itself is SIGKILLed, the kernel sends every child SIGTERM (PR_SET_PDEATHSIG).

Output: each child's stdout and stderr are merged and copied line by line to the launcher's stdout,
prefixed with the child's name, by one reader thread per child.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

import structlog

from devstack._process import spawn

__all__ = ["ChildExit", "ProcessSupervisor", "SupervisorExit"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ChildExit:
    """A supervised child that exited while it was expected to run."""

    name: str
    returncode: int


@dataclass(frozen=True)
class SupervisorExit:
    """Why `ProcessSupervisor.wait()` returned: a stop signal, or a child that exited on its own."""

    signal: signal.Signals | None = None
    child: ChildExit | None = None

    @property
    def exit_code(self) -> int:
        """The conventional exit status for the launcher: 128 + signal, or 1 when a child died."""
        if self.signal is not None:
            return 128 + int(self.signal)
        return 1


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    reader: threading.Thread


class ProcessSupervisor:
    """Start named commands, wait for a stop signal or a crash, then stop them all.

    Use it from the main thread: `wait()` installs the SIGINT/SIGTERM handlers, which Python allows
    only there, and PR_SET_PDEATHSIG ties each child to the thread that spawned it.
    """

    def __init__(self, *, stop_timeout: float = 10.0, output: IO[str] | None = None) -> None:
        self.stop_timeout = stop_timeout
        self._output = output if output is not None else sys.stdout
        self._output_lock = threading.Lock()
        self._children: dict[str, _Child] = {}
        self._stopping = False
        self._name_width = 0
        # The self-pipe wakes `wait()`: written by signal handlers and by a watcher thread per
        # child. os.write takes no Python locks, so it is safe inside a signal handler.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    @property
    def pids(self) -> dict[str, int]:
        return {name: child.process.pid for name, child in self._children.items()}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start `argv` under `name`; `env` adds to (and overrides) the launcher's environment."""
        if name in self._children:
            raise ValueError(f"a child named {name!r} is already supervised")
        if self._stopping:
            raise RuntimeError("the supervisor is stopping")
        child_env = {
            **os.environ,
            **(env or {}),
            # Output goes to a pipe, where Python would block-buffer it and delay log lines.
            "PYTHONUNBUFFERED": "1",
        }
        process = spawn(
            argv,
            death_signal=signal.SIGTERM,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=cwd,
        )
        assert process.stdout is not None
        reader = threading.Thread(
            target=self._copy_output,
            args=(name, process.stdout),
            name=f"supervisor-output-{name}",
            daemon=True,
        )
        watcher = threading.Thread(
            target=self._watch,
            args=(process,),
            name=f"supervisor-watch-{name}",
            daemon=True,
        )
        self._children[name] = _Child(name=name, process=process, reader=reader)
        self._name_width = max(self._name_width, len(name))
        reader.start()
        watcher.start()
        log.info("devstack.supervisor.started", child=name, pid=process.pid)

    def wait(
        self, *, tick: Callable[[], object] | None = None, tick_seconds: float = 0.5
    ) -> SupervisorExit:
        """Block until SIGINT/SIGTERM or until a child exits, then stop every child.

        `tick`, if given, is called about every `tick_seconds` meanwhile, from this thread (the
        launcher restarts crashed embedded services there, see `ServiceStack.restart_exited`).
        Returns why it stopped; a child's unexpected exit is also logged with its exit code.
        """
        received: list[signal.Signals] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            received.append(signal.Signals(signum))
            self._wake()

        previous = {
            signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            outcome = self._wait_for_event(received, tick, tick_seconds)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if outcome.child is not None:
            log.error(
                "devstack.supervisor.child_exited",
                child=outcome.child.name,
                exit_code=outcome.child.returncode,
            )
        else:
            log.info(
                "devstack.supervisor.signal", signal=outcome.signal.name if outcome.signal else None
            )
        self.stop()
        return outcome

    def stop(self) -> None:
        """SIGTERM every child's process group, wait up to `stop_timeout` in total, SIGKILL the rest."""
        self._stopping = True
        running = [child for child in self._children.values() if child.process.poll() is None]
        for child in running:
            # The whole group: a child that forks (uvicorn --reload, multiprocess workers) gets the
            # same signal a terminal would have sent it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("devstack.supervisor.kill", child=child.name, pid=child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in self._children.values():
            # Let the last lines reach the terminal; a grandchild holding the pipe must not hang us.
            child.reader.join(timeout=1.0)
        for child in running:
            log.info(
                "devstack.supervisor.stopped", child=child.name, exit_code=child.process.returncode
            )

    def close(self) -> None:
        self.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_for_event(
        self,
        received: list[signal.Signals],
        tick: Callable[[], object] | None,
        tick_seconds: float,
    ) -> SupervisorExit:
        while True:
            if received:
                return SupervisorExit(signal=received[0])
            for child in self._children.values():
                returncode = child.process.poll()
                if returncode is not None:
                    return SupervisorExit(child=ChildExit(name=child.name, returncode=returncode))
            # Blocks until a signal handler or a watcher writes (or the tick is due); select is
            # retried after a signal handler runs (PEP 475), and the handler's write makes it return.
            readable, _, _ = select.select(
                [self._wake_r], [], [], tick_seconds if tick is not None else None
            )
            if readable:
                os.read(self._wake_r, 1024)
            elif tick is not None:
                tick()

    def _wake(self) -> None:
        # A full pipe already holds a pending wake-up.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        process.wait()
        self._wake()

    def _copy_output(self, name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                # Padded to the longest name so the columns of interleaved children line up.
                with self._output_lock:
                    self._output.write(f"{name:<{self._name_width}} | {line}\n")
                    self._output.flush()
