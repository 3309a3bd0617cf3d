"""`python -m benchmarks.recovery` (`make bench-recovery`): how long a turn's open stream stalls when its worker dies.

On a private stack (`benchmarks.rig.BenchRig`) each repetition streams one turn at 10 tokens/s,
SIGKILLs the worker once a few deltas have arrived, starts a new worker at once, and measures on the
turn's open stream the time from the kill to the `reset-step` chunk (the retried attempt telling the
client to drop the partial answer) and to the next text delta. The generation activity's heartbeat
timeout bounds how long Temporal takes to see the attempt as lost; its retry policy adds the pause
before the next attempt. Both are printed next to the figures. The turn must then complete: `finish`
and the whole answer after the reset.

`run` also hands the repetitions back (`RecoveryFigures`), for the summary of `benchmarks.suite`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.arms import Pace
from benchmarks.load import StreamedTurn, TurnClient
from benchmarks.report import render_table
from benchmarks.rig import BenchRig, RigError
from benchmarks.running import (
    Outcome,
    ReportHeader,
    progress,
    run_benchmark,
    stack_description,
)
from workflows.chat_turn import GENERATION_HEARTBEAT_TIMEOUT, GENERATION_RETRY

# The Temporal SDK sends at most one heartbeat per this share of the heartbeat timeout (its throttle).
HEARTBEAT_THROTTLE_SHARE = 0.8


@dataclass(frozen=True)
class Recovery:
    """One killed worker, seen from the turn's open stream (seconds on `time.perf_counter`)."""

    killed_at: float
    turn: StreamedTurn

    def _first_after_kill(self, moments: list[float]) -> float | None:
        return next((at - self.killed_at for at in moments if at > self.killed_at), None)

    @property
    def to_reset(self) -> float | None:
        return self._first_after_kill(self.turn.reset_at)

    @property
    def to_next_delta(self) -> float | None:
        return self._first_after_kill(self.turn.delta_at)

    @property
    def to_end(self) -> float | None:
        return None if self.turn.ended_at is None else self.turn.ended_at - self.killed_at

    @property
    def deltas_before_kill(self) -> int:
        return sum(1 for at in self.turn.delta_at if at <= self.killed_at)


@dataclass
class RecoveryFigures:
    """The repetitions so far, and the generation activity's heartbeat timeout they are held to."""

    heartbeat_timeout: float
    recoveries: list[Recovery] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recovery",
        description="Time from SIGKILL of the worker to the next text delta on a turn's open stream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=5, help="killed workers, one turn each")
    parser.add_argument("--words", type=int, default=100, help="text deltas per answer")
    parser.add_argument(
        "--delay-ms", type=float, default=100.0, help="the provider's pause between deltas"
    )
    parser.add_argument(
        "--kill-after", type=int, default=10, help="text deltas received before the kill"
    )
    parser.add_argument(
        "--turn-timeout", type=float, default=120.0, help="seconds before a turn counts as failed"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data and log directory"
    )
    options = parser.parse_args(argv)
    if options.repeats < 1 or options.kill_after < 1 or options.delay_ms <= 0:
        parser.error("--repeats and --kill-after must be >= 1, --delay-ms > 0")
    if options.words <= options.kill_after:
        parser.error("--words must exceed --kill-after")
    return options


async def measure(
    rig: BenchRig, options: argparse.Namespace, sections: list[str], figures: RecoveryFigures
) -> int:
    """Kill the worker under `options.repeats` turns, one after the other; each repetition goes into
    `sections` and `figures` as it ends. 1 when a turn did not complete."""
    pace = Pace(options.words, options.delay_ms)
    client = TurnClient(
        rig.api_url, rig.api_key, max_connections=2, turn_timeout=options.turn_timeout
    )
    recoveries = figures.recoveries
    try:
        warmup = await client.run_turn(Pace(5, 0))
        if not warmup.completed:
            raise RigError(f"the warm-up turn failed: {warmup.failure}: {warmup.detail}")
        for index in range(1, options.repeats + 1):
            reached = asyncio.Event()

            def on_delta(turn: StreamedTurn, reached: asyncio.Event = reached) -> None:
                if len(turn.delta_at) == options.kill_after:
                    reached.set()

            turn_task = asyncio.create_task(client.run_turn(pace, on_delta=on_delta))
            waiter = asyncio.create_task(reached.wait())
            await asyncio.wait([turn_task, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not reached.is_set():
                turn = await turn_task
                raise RigError(
                    f"repeat {index}: the turn ended before {options.kill_after} deltas: "
                    f"{turn.failure}: {turn.detail}"
                )
            killed_at = time.perf_counter()
            # Blocks this loop for the few milliseconds a spawn takes: the new worker must be started
            # from the main thread, which its life is tied to (see BenchRig). The stream's next delta
            # is seconds away, so no timing of it is affected.
            rig.restart_worker(kill=True)
            recovery = Recovery(killed_at, await turn_task)
            recoveries.append(recovery)
            progress(
                f"[{index}/{options.repeats}] next text delta "
                + _seconds(recovery.to_next_delta)
                + f" s after the kill; {'completed' if recovery.turn.completed else 'FAILED'}"
            )
            sections[:] = [render(options, recoveries)]
    finally:
        await client.aclose()
    return 0 if all(recovery.turn.completed for recovery in recoveries) else 1


def render(options: argparse.Namespace, recoveries: Sequence[Recovery]) -> str:
    rows = [
        [
            str(index),
            str(recovery.deltas_before_kill),
            _seconds(recovery.to_reset),
            _seconds(recovery.to_next_delta),
            _seconds(recovery.to_end),
            "completed"
            if recovery.turn.completed
            else f"FAILED: {recovery.turn.failure}: {recovery.turn.detail}",
        ]
        for index, recovery in enumerate(recoveries, start=1)
    ]
    table = render_table(
        f"worker SIGKILLed mid-turn: {options.words} words @ {options.delay_ms:g} ms, "
        f"killed after {options.kill_after} deltas, a new worker started at once; "
        "seconds from the kill to the stream's reset-step, next text delta and end",
        [
            "#",
            "deltas before",
            "reset-step",
            "next delta",
            "end",
            "turn",
        ],
        rows,
    )
    timeout = GENERATION_HEARTBEAT_TIMEOUT.total_seconds()
    retry = GENERATION_RETRY.initial_interval.total_seconds()
    next_deltas = sorted(r.to_next_delta for r in recoveries if r.to_next_delta is not None)
    lines = [table]
    if next_deltas:
        lines.append(
            f"  kill to next delta: min {next_deltas[0]:.2f} s, median "
            f"{next_deltas[len(next_deltas) // 2]:.2f} s, max {next_deltas[-1]:.2f} s"
        )
    lines.append(
        f"  generation heartbeat timeout {timeout:g} s (GENERATION_HEARTBEAT_TIMEOUT), then the "
        f"retry after {retry:g} s (GENERATION_RETRY.initial_interval): expected at most "
        f"{timeout + retry:g} s plus the dispatch to the new worker. Temporal sees the attempt lost "
        f"{timeout:g} s after the last heartbeat it recorded, which can predate the kill: the SDK "
        f"forwards at most one heartbeat per {timeout * HEARTBEAT_THROTTLE_SHARE:g} s"
    )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv).exit_code


def run(argv: Sequence[str] | None = None) -> Outcome[RecoveryFigures]:
    """Parse `argv`, kill workers under open turns on a private stack and print the report; the exit
    code and the repetitions that ran."""
    options = parse_args(argv)
    rig = BenchRig(keep_work_dir=options.keep)

    def header() -> ReportHeader:
        return ReportHeader(
            "durachat worker crash recovery: time from SIGKILL to the next text delta on the open stream",
            stack_description(rig),
        )

    figures = RecoveryFigures(GENERATION_HEARTBEAT_TIMEOUT.total_seconds())
    exit_code = run_benchmark(
        rig, lambda sections: measure(rig, options, sections, figures), header
    )
    return Outcome(exit_code, figures if figures.recoveries else None)


if __name__ == "__main__":
    raise SystemExit(main())
