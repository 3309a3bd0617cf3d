"""`python -m benchmarks.many_streams` (`make bench-streams`): N live streams at 10 tokens/s through one api and one worker.

On a private stack (`benchmarks.rig.BenchRig`) it opens N turns (new chats, POST /v1/chats with
`local/lorem`, 100 ms between deltas by default) on a ramp, keeps reading all of them, and reports:
turns completed and failed (a run with a failed turn fails), the delay each delta adds to the
provider's pace (gap minus the pace) while all N are live and over the whole run, the api's RSS
before the first stream and with all N live (so its memory per live stream), the api's and the
worker's established TCP connections to Redis with 100 and with N streams live, and the CPU of
every process, the client's included.

A stream is live from its first text delta to its end. The answers are long enough (`--words`) that
the first stream is still live when the last one starts, so all N are live at once for a while.

`run` also hands the figures back (`StreamsFigures`), for the summary of `benchmarks.suite`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import psutil

from benchmarks.arms import Pace
from benchmarks.cpu import CpuMeter, CpuSample
from benchmarks.load import CLIENT_BUSY_WARNING, MS_PER_S, StreamedTurn, TurnClient
from benchmarks.report import Percentiles, percentiles, render_table
from benchmarks.rig import BenchRig, RigError
from benchmarks.running import (
    Outcome,
    ReportHeader,
    progress,
    run_benchmark,
    stack_description,
)

# Connections to Redis are counted with this many streams live, and again with all of them.
FIRST_MARK = 100
KIB = 1024
MIB = 1024 * 1024


@dataclass
class LiveTally:
    """How many streams are live (first delta seen, not ended), and the moments that matter."""

    streams: int
    live: int = 0
    peak: int = 0
    ended_before_all_live: int = 0
    first_mark: asyncio.Event = field(default_factory=asyncio.Event)
    all_live: asyncio.Event = field(default_factory=asyncio.Event)
    all_live_at: float | None = None
    # The first stream to end once all were live closes the window in which N were live at once.
    window_closed: asyncio.Event = field(default_factory=asyncio.Event)
    window_closed_at: float | None = None

    def on_delta(self, turn: StreamedTurn) -> None:
        if len(turn.delta_at) != 1:
            return
        self.live += 1
        self.peak = max(self.peak, self.live)
        if self.live >= min(FIRST_MARK, self.streams):
            self.first_mark.set()
        if self.live == self.streams and self.all_live_at is None:
            self.all_live_at = turn.delta_at[0]
            self.all_live.set()

    def on_end(self, turn: StreamedTurn) -> None:
        if turn.delta_at:
            self.live -= 1
        if self.all_live_at is None:
            self.ended_before_all_live += 1
        elif self.window_closed_at is None:
            self.window_closed_at = time.perf_counter()
            self.window_closed.set()


@dataclass(frozen=True)
class WindowCpu:
    """CPU each process spent while all streams were live, and how long that was."""

    spent: CpuSample
    seconds: float

    def core_share(self, name: str) -> float:
        return self.spent.seconds[name] / self.seconds


@dataclass(frozen=True)
class Snapshot:
    """The api's RSS and the Redis connections of the api and the worker at one moment."""

    api_rss: int
    redis_connections: dict[str, int]


@dataclass(frozen=True)
class StreamsFigures:
    """What the summary of `benchmarks.suite` reads of a run: its size and the figures the targets name."""

    streams: int
    delay_ms: float
    failed: int
    # How long all the streams were live at once; None: they never were.
    all_live_seconds: float | None
    peak_live: int
    # Gap minus pace (ms) of the gaps that ended while all were live, or of the whole run when they never
    # were (`delay_while_all_live` says which); None: no gap at all.
    added_delay: Percentiles | None
    delay_while_all_live: bool
    api_kib_per_stream: float | None
    # The api's Redis connections before the first stream, with FIRST_MARK live and with all live.
    api_redis_before: int
    api_redis_at_mark: int | None
    api_redis_all_live: int | None
    # The most connections the api opens however many streams it relays: its pool's bound plus the
    # connections of its multiplexed stream readers.
    api_redis_bound: int


def redis_connections(pid: int, redis_port: int) -> int:
    """The process's established TCP connections to Redis."""
    return sum(
        1
        for connection in psutil.Process(pid).net_connections("tcp")
        if connection.raddr
        and connection.raddr.port == redis_port
        and connection.status == psutil.CONN_ESTABLISHED
    )


def take_snapshot(pids: dict[str, int], redis_port: int) -> Snapshot:
    return Snapshot(
        api_rss=psutil.Process(pids["api"]).memory_info().rss,
        redis_connections={
            name: redis_connections(pids[name], redis_port) for name in ("api", "worker")
        },
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.many_streams",
        description="Many concurrent live streams through one api and one worker: delay, memory, "
        "Redis connections and CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--streams", type=int, default=1000, help="live streams to hold at once")
    parser.add_argument("--ramp", type=float, default=50.0, help="streams opened per second")
    parser.add_argument(
        "--delay-ms", type=float, default=100.0, help="the provider's pause between deltas"
    )
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=20.0,
        help="how long all streams should stay live together, at the nominal pace",
    )
    parser.add_argument(
        "--words",
        type=int,
        default=None,
        help="text deltas per answer; default: enough for twice the ramp plus the hold",
    )
    parser.add_argument(
        "--turn-timeout",
        type=float,
        default=None,
        help="seconds before a turn counts as failed; default: 3x its nominal length + 60",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data and log directory"
    )
    options = parser.parse_args(argv)
    if options.streams < 1 or options.ramp <= 0 or options.delay_ms <= 0:
        parser.error("--streams must be >= 1, --ramp and --delay-ms > 0")
    if options.hold_seconds < 0:
        parser.error("--hold-seconds must be >= 0")
    if options.words is None:
        # Twice the ramp's length: turns start slower than the ramp on a loaded machine.
        seconds = 2 * options.streams / options.ramp + options.hold_seconds
        options.words = max(10, math.ceil(seconds * MS_PER_S / options.delay_ms))
    if options.words < 2:
        parser.error("--words must be at least 2")
    if options.turn_timeout is None:
        options.turn_timeout = 3 * options.words * options.delay_ms / MS_PER_S + 60
    return options


async def measure(
    rig: BenchRig,
    options: argparse.Namespace,
    sections: list[str],
    figures: list[StreamsFigures],
) -> int:
    """Open the streams, read them all to their end, then render the report into `sections` and
    append the figures to `figures`; 1 when a turn failed or the streams were never all live."""
    pace = Pace(options.words, options.delay_ms)
    pids = rig.process_ids()
    meter = CpuMeter(pids)
    client = TurnClient(
        rig.api_url,
        rig.api_key,
        max_connections=options.streams + 8,
        turn_timeout=options.turn_timeout,
    )
    tally = LiveTally(options.streams)
    tasks: list[asyncio.Task[StreamedTurn]] = []
    watchers: list[asyncio.Task[Snapshot]] = []
    try:
        # Uncounted quick turns first, so the api's and worker's pools are open before the baseline.
        for _ in range(3):
            warmup = await client.run_turn(Pace(5, 0))
            if not warmup.completed:
                raise RigError(f"a warm-up turn failed: {warmup.failure}: {warmup.detail}")
        before = await asyncio.to_thread(take_snapshot, pids, rig.ports.redis)

        async def stream(due: float) -> StreamedTurn:
            turn = await client.run_turn(pace, scheduled_at=due, on_delta=tally.on_delta)
            tally.on_end(turn)
            return turn

        progress(
            f"opening {options.streams} streams of {options.words} words @ "
            f"{options.delay_ms:g} ms at {options.ramp:g}/s"
        )

        async def snapshot_at_mark() -> Snapshot:
            await tally.first_mark.wait()
            return await asyncio.to_thread(take_snapshot, pids, rig.ports.redis)

        # Watches from the start: the mark is usually reached while the ramp is still opening streams.
        mark_snapshot = asyncio.create_task(snapshot_at_mark())
        watchers.append(mark_snapshot)
        cpu_start = meter.sample()
        started = time.perf_counter()
        for index in range(options.streams):
            due = started + index / options.ramp
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream(due)))
        everything = asyncio.gather(*tasks)

        at_mark = await mark_snapshot if await _before(tally.first_mark, everything) else None
        at_all: Snapshot | None = None
        window_cpu: WindowCpu | None = None
        if await _before(tally.all_live, everything):
            progress(f"all {options.streams} streams live; holding until the first ends")
            window_start, window_started = meter.sample(), time.perf_counter()
            at_all = await asyncio.to_thread(take_snapshot, pids, rig.ports.redis)
            if await _before(tally.window_closed, everything):
                window_cpu = WindowCpu(
                    meter.sample() - window_start, time.perf_counter() - window_started
                )
        turns = await everything
        cpu_run = meter.sample() - cpu_start
    finally:
        for task in [*tasks, *watchers]:
            task.cancel()
        await client.aclose()
    sections[:] = render(options, turns, tally, before, at_mark, at_all, cpu_run, window_cpu)
    figures.append(summarize(options, turns, tally, before, at_mark, at_all, api_redis_bound(rig)))
    failed = [turn for turn in turns if not turn.completed]
    return 1 if failed or at_all is None else 0


def api_redis_bound(rig: BenchRig) -> int:
    settings = rig.settings
    return settings.redis_max_connections + settings.stream_reader_connections


def live_window(tally: LiveTally) -> tuple[float, float] | None:
    """From the moment all streams were live to the first end after it (open-ended if none came)."""
    if tally.all_live_at is None:
        return None
    closed = tally.window_closed_at
    return tally.all_live_at, closed if closed is not None else math.inf


def added_delays(
    completed: Sequence[StreamedTurn], pace_ms: float, window: tuple[float, float] | None = None
) -> list[float]:
    """Gap minus pace (ms) of every delta of a completed turn, or of those that arrived in `window`."""
    start, end = window if window is not None else (-math.inf, math.inf)
    return [
        (later - earlier) * MS_PER_S - pace_ms
        for turn in completed
        for earlier, later in pairwise(turn.delta_at)
        if start <= later <= end
    ]


def summarize(
    options: argparse.Namespace,
    turns: list[StreamedTurn],
    tally: LiveTally,
    before: Snapshot,
    at_mark: Snapshot | None,
    at_all: Snapshot | None,
    bound: int,
) -> StreamsFigures:
    completed = [turn for turn in turns if turn.completed]
    window = live_window(tally)
    # Over the whole run when the streams were never all live.
    delays = added_delays(completed, options.delay_ms, window)
    all_live_seconds = (
        tally.window_closed_at - tally.all_live_at
        if tally.all_live_at is not None and tally.window_closed_at is not None
        else None
    )
    return StreamsFigures(
        streams=options.streams,
        delay_ms=options.delay_ms,
        failed=len(turns) - len(completed),
        all_live_seconds=all_live_seconds,
        peak_live=tally.peak,
        added_delay=percentiles(delays) if delays else None,
        delay_while_all_live=window is not None,
        api_kib_per_stream=(
            (at_all.api_rss - before.api_rss) / options.streams / KIB if at_all else None
        ),
        api_redis_before=before.redis_connections["api"],
        api_redis_at_mark=at_mark.redis_connections["api"] if at_mark else None,
        api_redis_all_live=at_all.redis_connections["api"] if at_all else None,
        api_redis_bound=bound,
    )


async def _before(event: asyncio.Event, everything: asyncio.Future[list[StreamedTurn]]) -> bool:
    """Wait until `event` is set or every stream has ended; whether the event came first."""
    waiter = asyncio.create_task(event.wait())
    pending: list[asyncio.Future[Any]] = [waiter, everything]
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return event.is_set()


def render(
    options: argparse.Namespace,
    turns: list[StreamedTurn],
    tally: LiveTally,
    before: Snapshot,
    at_mark: Snapshot | None,
    at_all: Snapshot | None,
    cpu_run: CpuSample,
    window_cpu: WindowCpu | None,
) -> list[str]:
    n = options.streams
    completed = [turn for turn in turns if turn.completed]
    failed = [turn for turn in turns if not turn.completed]
    pace_ms = options.delay_ms
    lines = [
        f"streams: {len(completed)} of {n} completed, {len(failed)} failed (must be 0); "
        f"{sum(1 for turn in completed if turn.reset_at)} completed after a retried attempt"
    ]
    if failed:
        kinds = Counter(turn.failure for turn in failed)
        lines.append(
            "  failures: "
            + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            + f"; the first: {failed[0].failure}: {failed[0].detail}"
        )
    window = live_window(tally)
    if tally.all_live_at is not None:
        first_asked = min(turn.asked_at for turn in turns)
        closed = tally.window_closed_at
        held = f"for {closed - tally.all_live_at:.1f} s" if closed is not None else ""
        lines.append(
            f"  all {n} live at once {tally.all_live_at - first_asked:.1f} s after the first was "
            f"opened, {held} (until the first ended)"
        )
    else:
        lines.append(
            f"  never all {n} live at once: at most {tally.peak}; {tally.ended_before_all_live} "
            "ended first (raise --words)"
        )
    ttft = [turn.time_to_first_token * MS_PER_S for turn in turns if turn.delta_at]
    if ttft:
        cut = percentiles(ttft)
        lines.append(
            f"  time to first token (ms): p50 {cut.p50:.0f}, p95 {cut.p95:.0f}, p99 {cut.p99:.0f}"
        )
    delay_rows = []
    for label, values in (
        (f"while all {n} were live", added_delays(completed, pace_ms, window) if window else []),
        ("whole run", added_delays(completed, pace_ms)),
    ):
        if values:
            cut = percentiles(values)
            delay_rows.append(
                [
                    label,
                    str(len(values)),
                    *(f"{v:.1f}" for v in (cut.p50, cut.p95, cut.p99)),
                    f"{max(values):.1f}",
                ]
            )
    delays = render_table(
        f"added per-token delay (ms): gap between deltas minus the {pace_ms:g} ms pace",
        ["", "gaps", "p50", "p95", "p99", "max"],
        delay_rows,
    )

    memory_lines = [f"api memory: RSS {before.api_rss / MIB:.1f} MiB before the first stream"]
    if at_all is not None:
        per_stream = (at_all.api_rss - before.api_rss) / n / KIB
        memory_lines[0] += (
            f", {at_all.api_rss / MIB:.1f} MiB with all {n} live: {per_stream:.1f} KiB per live stream"
        )
    mark = min(FIRST_MARK, n)
    connection_rows = [
        [
            name,
            str(before.redis_connections[name]),
            str(at_mark.redis_connections[name]) if at_mark else "-",
            str(at_all.redis_connections[name]) if at_all else "-",
        ]
        for name in ("api", "worker")
    ]
    connections = render_table(
        "Redis connections (established TCP)",
        ["process", "before", f"{mark} live", f"{n} live"],
        connection_rows,
    )

    names = list(cpu_run.seconds)
    cpu_rows = []
    for name in names:
        per_turn = cpu_run.seconds[name] * MS_PER_S / max(1, len(completed))
        share = f"{window_cpu.core_share(name):.0%}" if window_cpu is not None else "-"
        cpu_rows.append([name, f"{per_turn:.1f}", share])
    cpu = render_table(
        "cpu",
        ["process", "ms per completed turn (whole run)", f"share of one core, {n} live"],
        cpu_rows,
    )
    sections = ["\n".join(lines), delays, "\n".join(memory_lines) + "\n" + connections, cpu]
    if window_cpu is not None:
        busy = window_cpu.core_share("client")
        if busy > CLIENT_BUSY_WARNING:
            sections.append(
                f"warning: the client was busy {busy:.0%} of a core while all streams were live; "
                "its own lag is in the delays above (one client process is then the bottleneck)"
            )
    return sections


def raise_open_file_limit(needed: int) -> None:
    """Lift this process's soft limit on open files (the api and worker inherit it) to what N streams
    need: a socket each in the client and in the api, besides everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        progress(f"warning: open files are limited to {target} (hard limit); {needed} are needed")


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv).exit_code


def run(argv: Sequence[str] | None = None) -> Outcome[StreamsFigures]:
    """Parse `argv`, hold the streams on a private stack and print the report; the exit code and figures."""
    options = parse_args(argv)
    raise_open_file_limit(2 * options.streams + 1024)
    rig = BenchRig(
        keep_work_dir=options.keep,
        # Every live turn holds an activity slot while it generates, and its claim and store
        # activities need slots too; the rig already lifts the per-key and per-organization limits.
        environment={"DURACHAT_WORKER_MAX_CONCURRENT_ACTIVITIES": str(2 * options.streams + 100)},
    )

    def header() -> ReportHeader:
        return ReportHeader(
            f"durachat many live streams: {options.streams} streams of {options.words} words @ "
            f"{options.delay_ms:g} ms ({MS_PER_S / options.delay_ms:g} tokens/s), "
            f"opened at {options.ramp:g}/s",
            stack_description(rig),
        )

    figures: list[StreamsFigures] = []
    exit_code = run_benchmark(
        rig, lambda sections: measure(rig, options, sections, figures), header
    )
    return Outcome(exit_code, figures[0] if figures else None)


if __name__ == "__main__":
    raise SystemExit(main())
