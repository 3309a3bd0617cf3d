"""Point 1 of issue 13, target by target, against the figures the four benchmark parts measured: the table `make bench` ends with.

It reads the figures each part's `run` hands back and renders one table; it measures nothing and
starts nothing. A row's durachat figure is what the part's own report prints (rounded), the peers'
figure is there only for the turn-latency targets, where the peers ran as arms of the same cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from benchmarks.arms import API_ARM
from benchmarks.load import MS_PER_S, LoadFigures, StepResult
from benchmarks.many_streams import FIRST_MARK, StreamsFigures
from benchmarks.peer_arms import RESUMABLE_ARM, STATELESS_ARM
from benchmarks.recovery import RecoveryFigures
from benchmarks.report import Percentiles, percentiles, render_table
from benchmarks.turn_latency import CaseFigures, TurnLatencyFigures

__all__ = ["PEERS", "SuiteFigures", "TargetRow", "render_summary", "target_rows"]

PEERS = (STATELESS_ARM, RESUMABLE_ARM)

# Point 1's bounds.
ADDED_TTFT_P50_MS = 25.0
ADDED_TTFT_P99_MS = 75.0
CONCURRENT_CLIENTS = 8
ADDED_TTFT_CONCURRENT_P50_MS = 100.0
SUSTAINED_TURNS_PER_S = 40.0
SUSTAINED_WORDS = 40
SUSTAINED_TTFT_P99_MS = 500.0
LIVE_STREAMS = 1000
LIVE_STREAM_DELAY_MS = 100.0  # 10 tokens/s
ADDED_TOKEN_DELAY_P99_MS = 50.0
API_KIB_PER_STREAM = 50.0
STOP_TO_ABORT_P50_MS = 40.0
RECOVERY_MARGIN_S = 2.0

NOT_MEASURED = "not measured"
NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class SuiteFigures:
    """What each part handed back; None for a part that did not run or measured nothing."""

    latency: TurnLatencyFigures | None
    load: LoadFigures | None
    streams: StreamsFigures | None
    recovery: RecoveryFigures | None


@dataclass(frozen=True)
class TargetRow:
    target: str
    durachat: str
    # True or False once measured; None: not measured.
    met: bool | None
    # Each peer's figure by arm name; a peer missing here has no such figure ("n/a").
    peers: Mapping[str, str] = field(default_factory=dict)
    # Measured on a smaller or other run than the target names (fewer streams, other answers): the
    # verdict holds for that run only.
    smaller_run: bool = False

    @property
    def verdict(self) -> str:
        text = NOT_MEASURED if self.met is None else ("yes" if self.met else "no")
        return f"{text}*" if self.smaller_run and self.met is not None else text


def target_rows(figures: SuiteFigures) -> list[TargetRow]:
    return [
        *_latency_rows(figures.latency),
        _sustained_row(figures.load),
        *_streams_rows(figures.streams),
        _stop_row(figures.latency),
        _recovery_row(figures.recovery),
    ]


def render_summary(rows: Sequence[TargetRow]) -> str:
    """The table, then what a reader needs to read it: how the added figures are taken, and the
    meaning of a starred verdict if any row has one."""
    table = render_table(
        "targets of point 1 (issue 13): durachat's figure, the peers' where they ran the same "
        "turns, and whether durachat meets the target",
        ["target", "durachat", *PEERS, "met"],
        [
            [
                row.target,
                row.durachat,
                *(row.peers.get(peer, NOT_APPLICABLE) for peer in PEERS),
                row.verdict,
            ]
            for row in rows
        ],
        text=True,
    )
    notes = [
        f"  added TTFT: p(arm) - p({STATELESS_ARM}) percentile by percentile, in the paced case "
        "with that many clients;\n  a peer's figure is that difference for its own arm",
    ]
    if any(row.smaller_run and row.met is not None for row in rows):
        notes.append(
            "  * measured on a smaller or other run than the target names (--quick or a part's "
            "flags):\n    the verdict holds for that run, not for the target"
        )
    return "\n".join([table, *notes])


def _latency_rows(latency: TurnLatencyFigures | None) -> list[TargetRow]:
    one = _paced_case(latency, 1)
    many = _paced_case(latency, CONCURRENT_CLIENTS)
    return [
        _added_ttft_row(
            f"added TTFT over {STATELESS_ARM}, 1 client: p50 <= {ADDED_TTFT_P50_MS:g} ms",
            one,
            _p50,
            ADDED_TTFT_P50_MS,
        ),
        _added_ttft_row(
            f"added TTFT over {STATELESS_ARM}, 1 client: p99 <= {ADDED_TTFT_P99_MS:g} ms",
            one,
            _p99,
            ADDED_TTFT_P99_MS,
        ),
        _added_ttft_row(
            f"added TTFT over {STATELESS_ARM}, {CONCURRENT_CLIENTS} clients: "
            f"p50 <= {ADDED_TTFT_CONCURRENT_P50_MS:g} ms",
            many,
            _p50,
            ADDED_TTFT_CONCURRENT_P50_MS,
        ),
    ]


def _paced_case(latency: TurnLatencyFigures | None, concurrency: int) -> CaseFigures | None:
    """The case with `concurrency` clients, a paced one (the provider pausing between deltas) first."""
    if latency is None:
        return None
    cases = [figures for figures in latency.cases if figures.case.concurrency == concurrency]
    cases.sort(key=lambda figures: figures.case.pace.delay_ms == 0)
    return cases[0] if cases else None


def _added_ttft_row(
    target: str, case: CaseFigures | None, cut: Callable[[Percentiles], float], bound: float
) -> TargetRow:
    stateless = case.arm(STATELESS_ARM) if case is not None else None
    if case is None or stateless is None:
        reason = NOT_MEASURED if case is None else f"{NOT_MEASURED} (no {STATELESS_ARM} arm)"
        return TargetRow(target, reason, None, {peer: "-" for peer in PEERS})
    baseline = stateless.figures.time_to_first_token

    def added(arm: str) -> float | None:
        report = case.arm(arm)
        return None if report is None else cut(report.figures.time_to_first_token - baseline)

    durachat = added(API_ARM)
    peers = {STATELESS_ARM: "baseline"}
    resumable = added(RESUMABLE_ARM)
    peers[RESUMABLE_ARM] = "not run" if resumable is None else f"{resumable:.1f} ms"
    if durachat is None:
        return TargetRow(target, NOT_MEASURED, None, peers)
    return TargetRow(target, f"{durachat:.1f} ms", durachat <= bound, peers)


def _sustained_row(load: LoadFigures | None) -> TargetRow:
    target = (
        f"sustained >= {SUSTAINED_TURNS_PER_S:g} turns/s ({SUSTAINED_WORDS} words, new chats), "
        f"TTFT p99 <= {SUSTAINED_TTFT_P99_MS:g} ms"
    )
    if load is None or not load.steps:
        return TargetRow(target, NOT_MEASURED, None)
    kept = _sustained_step(load)
    if kept is None:
        figure = f"no step within the bounds ({load.min_achieved:.0%} achieved, no failed turn)"
    else:
        ttft_p99 = percentiles(kept.ttft_ms()).p99
        figure = f"{kept.rate:g}/s at TTFT p99 {ttft_p99:.0f} ms"
    peak = max(step.achieved_rate for step in load.steps)
    if load.saturated_at is not None:
        last = load.steps[-1]
        figure += (
            f"; saturated at {load.saturated_at:g}/s offered ({last.achieved_rate:.1f}/s "
            f"achieved, peak {peak:.1f}/s)"
        )
    else:
        figure += f"; not saturated up to {load.steps[-1].rate:g}/s (peak {peak:.1f}/s achieved)"
    met = kept is not None and kept.rate >= SUSTAINED_TURNS_PER_S
    # A run that neither reached the target's rate nor saturated says nothing about the target.
    smaller = load.saturated_at is None and load.steps[-1].rate < SUSTAINED_TURNS_PER_S
    if load.words != SUSTAINED_WORDS:
        figure += f" ({load.words} words)"
    return TargetRow(target, figure, met, smaller_run=smaller or load.words != SUSTAINED_WORDS)


def _sustained_step(load: LoadFigures) -> StepResult | None:
    """The step of the highest offered rate that kept up within the TTFT bound with no failed turn."""
    kept = [
        step
        for step in load.steps
        if not step.failed
        and step.saturation(
            min_achieved=load.min_achieved, max_ttft_p99=SUSTAINED_TTFT_P99_MS / MS_PER_S
        )
        is None
    ]
    return max(kept, key=lambda step: step.rate, default=None)


def _streams_rows(streams: StreamsFigures | None) -> list[TargetRow]:
    prefix = f"{LIVE_STREAMS:,} live streams at {MS_PER_S / LIVE_STREAM_DELAY_MS:g} tokens/s"
    targets = [
        f"{prefix}: no failed turn",
        f"  ... added per-token delay p99 <= {ADDED_TOKEN_DELAY_P99_MS:g} ms",
        f"  ... api memory per open stream <= {API_KIB_PER_STREAM:g} KiB",
        "  ... Redis connections per api process do not grow with streams",
    ]
    if streams is None:
        return [TargetRow(target, NOT_MEASURED, None) for target in targets]
    smaller = streams.streams < LIVE_STREAMS or streams.delay_ms != LIVE_STREAM_DELAY_MS
    size = "" if not smaller else f" ({streams.streams} @ {streams.delay_ms:g} ms)"
    n = streams.streams
    if streams.all_live_seconds is not None:
        live = f"all live for {streams.all_live_seconds:.1f} s"
    else:
        live = f"never all live (at most {streams.peak_live})"
    failed = TargetRow(
        targets[0],
        f"{streams.failed} of {n} failed; {live}{size}",
        streams.failed == 0 and streams.all_live_seconds is not None,
        smaller_run=smaller,
    )
    if streams.added_delay is None:
        delay = TargetRow(targets[1], NOT_MEASURED, None)
    else:
        scope = f"while all {n} live" if streams.delay_while_all_live else "whole run"
        p99 = streams.added_delay.p99
        delay = TargetRow(
            targets[1],
            f"{p99:.1f} ms ({scope})",
            p99 <= ADDED_TOKEN_DELAY_P99_MS,
            smaller_run=smaller,
        )
    kib = streams.api_kib_per_stream
    memory = TargetRow(
        targets[2],
        f"{NOT_MEASURED} (never all live)" if kib is None else f"{kib:.1f} KiB ({n} live)",
        None if kib is None else kib <= API_KIB_PER_STREAM,
        smaller_run=smaller,
    )
    moments: list[tuple[str, int | None]] = [("before", streams.api_redis_before)]
    if n > FIRST_MARK:
        moments.append((f"at {FIRST_MARK} live", streams.api_redis_at_mark))
    moments.append((f"at {n} live", streams.api_redis_all_live))
    all_live = streams.api_redis_all_live
    connections = TargetRow(
        targets[3],
        ", ".join(f"{'-' if count is None else count} {moment}" for moment, count in moments)
        + f" (bound {streams.api_redis_bound})",
        None if all_live is None else all_live <= streams.api_redis_bound,
        smaller_run=smaller,
    )
    return [failed, delay, memory, connections]


def _stop_row(latency: TurnLatencyFigures | None) -> TargetRow:
    target = f"stop request to `abort` on the open stream: p50 <= {STOP_TO_ABORT_P50_MS:g} ms"
    # The peers have no stop route: nothing there is stopped from elsewhere.
    if latency is None or latency.stop is None:
        return TargetRow(target, NOT_MEASURED, None)
    to_abort = latency.stop.to_abort.p50
    return TargetRow(
        target,
        f"{to_abort:.1f} ms (stop answered in {latency.stop.answered.p50:.1f} ms)",
        to_abort <= STOP_TO_ABORT_P50_MS,
    )


def _recovery_row(recovery: RecoveryFigures | None) -> TargetRow:
    target = f"worker SIGKILLed mid-turn: stream moves within heartbeat timeout + {RECOVERY_MARGIN_S:g} s"
    if recovery is None or not recovery.recoveries:
        return TargetRow(target, NOT_MEASURED, None)
    bound = recovery.heartbeat_timeout + RECOVERY_MARGIN_S
    moved = [r.to_next_delta for r in recovery.recoveries if r.to_next_delta is not None]
    kills = len(recovery.recoveries)
    stalled = kills - len(moved)
    figure = f"max {max(moved):.2f} s over {kills} kill{'s' if kills > 1 else ''}"
    if not moved:
        figure = "never moved"
    if moved and stalled:
        figure += f", {stalled} never moved"
    return TargetRow(
        target, f"{figure} (bound {bound:g} s)", not stalled and max(moved, default=0) <= bound
    )


def _p50(values: Percentiles) -> float:
    return values.p50


def _p99(values: Percentiles) -> float:
    return values.p99
