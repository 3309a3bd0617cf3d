"""How a benchmark command runs: a private rig (or none) around an async measurement, Ctrl-C and SIGTERM, progress on stderr, the report on stdout.

Shared by `benchmarks.turn_latency`, `benchmarks.load`, `benchmarks.many_streams` and
`benchmarks.recovery`; it knows nothing of what they measure, and imports none of them. Each of them
also hands what it measured back as an `Outcome`, which `benchmarks.suite` collects.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from benchmarks.arms import TurnFailedError
from benchmarks.report import machine_description, versions
from benchmarks.rig import BenchRig, RigError

__all__ = [
    "EXIT_INTERRUPTED",
    "Outcome",
    "ReportHeader",
    "Servers",
    "progress",
    "run_benchmark",
    "stack_description",
]

# The exit code of a run cut short by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

FiguresT_co = TypeVar("FiguresT_co", covariant=True)


@dataclass(frozen=True)
class Outcome(Generic[FiguresT_co]):
    """A benchmark command's exit code and what it measured; `figures` is None when it measured nothing."""

    exit_code: int
    figures: FiguresT_co | None


class Servers(Protocol):
    """More servers started after the rig, on its services, and stopped before it (the peers)."""

    @property
    def log_path(self) -> Path: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def log_tail(self) -> str: ...


@dataclass(frozen=True)
class ReportHeader:
    """The lines above a report's sections: what ran, on what machine and stack, and for how long."""

    title: str
    stack: str
    details: Sequence[str] = ()
    # Said after the run's length on its line.
    run_note: str = ""

    def lines(self, elapsed: float) -> list[str]:
        run = f"run       {elapsed / 60:.1f} min in total"
        return [
            self.title,
            f"machine   {machine_description()}",
            f"versions  {versions()}",
            self.stack,
            *self.details,
            f"{run}; {self.run_note}" if self.run_note else run,
        ]


def run_benchmark(
    rig: BenchRig | None,
    measure: Callable[[list[str]], Coroutine[Any, Any, int]],
    header: Callable[[], ReportHeader],
    *,
    servers: Callable[[], Servers | None] | None = None,
) -> int:
    """Start `rig` (if any) and `servers`, run `measure`, stop them whatever happens, print the report; the exit code.

    `measure` appends the report's sections as they become final, so a run cut short by Ctrl-C or a
    failure still prints what it measured, and returns the exit code (1 when a check failed).
    `servers`, called once the rig is up, builds the servers to start beside it (None: none).
    SIGTERM takes the same way out as Ctrl-C.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    sections: list[str] = []
    beside: Servers | None = None
    exit_code = 0
    try:
        if rig is not None:
            progress(f"starting a private stack in {rig.work_dir} ...")
            rig.start()
            if servers is not None:
                beside = servers()
                if beside is not None:
                    beside.start()
            progress(f"stack ready in {time.monotonic() - started:.1f}s; measuring")
        exit_code = asyncio.run(measure(sections))
    except KeyboardInterrupt:
        progress("interrupted")
        exit_code = EXIT_INTERRUPTED
    except (TurnFailedError, RigError) as error:
        progress(f"benchmark failed: {error}")
        exit_code = 1
        if rig is not None:
            rig.failed = True
            progress(f"last lines of {rig.process_log}:\n{rig.log_tail()}")
        if beside is not None:
            progress(f"last lines of {beside.log_path}:\n{beside.log_tail()}")
    except BaseException:
        if rig is not None:
            rig.failed = True
        raise
    finally:
        if rig is not None:
            progress("stopping the stack ...")
            with _signals_ignored():
                # The servers beside the rig first: they use its services.
                if beside is not None:
                    beside.stop()
                rig.stop()
            if rig.failed or rig.keep_work_dir:
                progress(f"data and logs kept in {rig.work_dir}")
    if sections:
        lines = [*header().lines(time.monotonic() - started), ""]
        sys.stdout.write("\n".join(lines) + "\n" + "\n\n".join(sections) + "\n")
        sys.stdout.flush()
    return exit_code


def stack_description(rig: BenchRig | None, url: str | None = None) -> str:
    if rig is None:
        return f"stack     the deployment at {url}; its processes are not measured"
    return (
        "stack     private: embedded Temporal dev server, Postgres, Valkey, SeaweedFS; 1 api, "
        "1 worker; all on this machine"
    )


def progress(message: str) -> None:
    # Progress goes to stderr, so stdout holds only the report (`make bench-load > report.txt`).
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let the stack stop: a second Ctrl-C must not abandon half-stopped servers."""
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
