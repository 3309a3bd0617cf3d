"""Percentiles, the machine description and the plain-text tables the benchmarks print; no I/O but /proc reads."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ArmFigures",
    "ArmReport",
    "Percentiles",
    "machine_description",
    "percentiles",
    "render_case",
    "render_stop",
    "render_table",
    "versions",
]

# The libraries on a turn's path whose version changes the figures.
_VERSIONED = ("temporalio", "fastapi", "uvicorn", "sse-starlette", "redis", "asyncpg", "httpx")


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p95: float
    p99: float

    def __sub__(self, other: Percentiles) -> Percentiles:
        return Percentiles(self.p50 - other.p50, self.p95 - other.p95, self.p99 - other.p99)


def percentiles(values: Sequence[float]) -> Percentiles:
    """p50/p95/p99 with linear interpolation between order statistics (numpy's default method)."""
    if not values:
        raise ValueError("no samples")
    if len(values) == 1:
        return Percentiles(values[0], values[0], values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return Percentiles(cuts[49], cuts[94], cuts[98])


@dataclass(frozen=True)
class ArmFigures:
    """One arm of one case, in milliseconds."""

    time_to_first_token: Percentiles
    token_delay: Percentiles
    turns_per_second: float


@dataclass(frozen=True)
class ArmReport:
    """What the report prints of one arm in one case."""

    name: str
    figures: ArmFigures
    # HTTP arms: the time until the response headers arrived.
    accepted: Percentiles | None
    # CPU milliseconds per turn of each process on this arm's path (`client` is the benchmark).
    cpu_ms_per_turn: Mapping[str, float]

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_ms_per_turn.values())


def render_case(
    title: str, arms: Sequence[ArmReport], reference: str, *, cpu_ratio_to: Sequence[str] = ()
) -> str:
    """One case as a small table: every arm, then what the `reference` arm (durachat's api) adds over
    each other arm, TTFT and per-token delay side by side; then throughput, CPU per turn, and the
    reference's CPU per turn as a multiple of each arm named in `cpu_ratio_to`."""
    by_name = {arm.name: arm for arm in arms}
    ref = by_name[reference]
    others = [arm for arm in arms if arm.name != reference]
    rows: list[tuple[str, Percentiles | None, Percentiles | None]] = [
        (arm.name, arm.figures.time_to_first_token, arm.figures.token_delay) for arm in arms
    ]
    rows += [
        (
            f"added over {arm.name}",
            ref.figures.time_to_first_token - arm.figures.time_to_first_token,
            ref.figures.token_delay - arm.figures.token_delay,
        )
        for arm in others
    ]
    rows += [(f"headers: {arm.name}", arm.accepted, None) for arm in arms if arm.accepted]
    label_width = max(26, *(len(label) for label, _, _ in rows))
    name_width = max(len(arm.name) for arm in arms)

    def row(label: str, *groups: Percentiles | None) -> str:
        cells = "".join(
            "   " + ("" if group is None else f"{group.p50:8.2f}{group.p95:8.2f}{group.p99:8.2f}")
            for group in groups
        )
        return f"  {label:<{label_width}}{cells}".rstrip()

    header_groups = "   " + f"{'p50':>8}{'p95':>8}{'p99':>8}"
    lines = [
        title,
        f"  {'':<{label_width}}   {'time to first token (ms)':<24}   per-token delay (ms)",
        f"  {'':<{label_width}}{header_groups * 2}",
        *(row(label, *groups) for label, *groups in rows),
        "  turns/s achieved: "
        + ", ".join(f"{arm.name} {arm.figures.turns_per_second:.1f}" for arm in arms),
        "  cpu per turn (ms):",
        *(
            f"    {arm.name:<{name_width}}  "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in arm.cpu_ms_per_turn.items())
            + f"; total {arm.cpu_total:.1f}"
            for arm in arms
        ),
    ]
    ratios = [
        f"{ref.cpu_total / arm.cpu_total:.1f}x {arm.name}"
        for arm in others
        if arm.name in cpu_ratio_to and arm.cpu_total > 0
    ]
    if ratios:
        lines.append(f"  cpu per turn, {reference} / peer: " + ", ".join(ratios))
    return "\n".join(lines)


def render_stop(
    title: str, rows: Sequence[tuple[str, Sequence[float]]], notes: Sequence[str]
) -> str:
    """The stop case: p50/p95/p99 and max of each timed step, in milliseconds, then free-text notes."""
    label_width = 34
    lines = [
        title,
        f"  {'ms after the stop request was sent':<{label_width}}"
        f"{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}",
    ]
    for label, values in rows:
        cut = percentiles(values)
        lines.append(
            f"  {label:<{label_width}}{cut.p50:8.2f}{cut.p95:8.2f}{cut.p99:8.2f}{max(values):8.2f}"
        )
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


def render_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    labels: bool = True,
    text: bool = False,
) -> str:
    """Columns as wide as their widest cell under a title line, figures right-aligned (left-aligned
    when the cells are `text`); the first column left-aligned when it holds `labels`."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [title]
    for first, *cells in (header, *rows):
        figures = (
            cell.ljust(width) if text else cell.rjust(width)
            for cell, width in zip(cells, widths[1:], strict=True)
        )
        label = first.ljust(widths[0]) if labels else first.rjust(widths[0])
        lines.append("  " + "  ".join([label, *figures]).rstrip())
    return "\n".join(lines)


def machine_description() -> str:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    core_text = f"{cores} cores" if usable == cores else f"{usable} of {cores} cores usable"
    memory = _meminfo_gib()
    memory_text = f", {memory:.0f} GiB RAM" if memory is not None else ""
    return (
        f"{core_text} ({_cpu_model()}){memory_text}, {platform.system()} {platform.release()}; "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def versions() -> str:
    found = []
    for name in _VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None
