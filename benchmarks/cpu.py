"""CPU time of the stack's processes, so latency figures come with what each turn cost; reads /proc via psutil."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

__all__ = ["CpuMeter", "CpuSample"]


@dataclass(frozen=True)
class CpuSample:
    """Cumulative user + system CPU seconds per named process, children included."""

    seconds: dict[str, float]

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        return CpuSample(
            {name: value - earlier.seconds.get(name, 0.0) for name, value in self.seconds.items()}
        )


class CpuMeter:
    """Samples the CPU time of this process and of a fixed set of other processes and their live children.

    Children count because Postgres serves each connection from a forked backend. A child that has
    already exited is missed; the pooled backends of a benchmark live as long as the run. This process
    is counted alone (under `self_name`): the services it launched are its children too.
    """

    def __init__(self, pids: Mapping[str, int], *, self_name: str = "client") -> None:
        self._self_name = self_name
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}

    def sample(self) -> CpuSample:
        seconds = {self._self_name: time.process_time()}
        seconds.update((name, _tree_seconds(process)) for name, process in self._processes.items())
        return CpuSample(seconds)


def _tree_seconds(process: psutil.Process) -> float:
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for member in [process, *process.children(recursive=True)]:
            # A backend may exit between listing and reading; its time is then simply not counted.
            with contextlib.suppress(psutil.NoSuchProcess):
                times = member.cpu_times()
                total += times.user + times.system
    return total
