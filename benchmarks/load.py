"""`python -m benchmarks.load` (`make bench-load`, `durachat bench`): open-loop load, stepped up until durachat saturates.

Turns arrive on the clock, a new chat every 1/rate seconds whatever the earlier turns are doing (an
open loop, as users arrive, not N clients each waiting for its last answer). Each arrival is POST
/v1/chats with `local/lorem`, its UI message stream read to the end. The rate goes up step by step
until a step's turns complete clearly slower than they arrive, or their time to first token passes a
bound. Every step reports its turns (started, completed, failed, refused by the in-flight cap), time
to first token, time to response headers, the per-token gap and, on its own stack, the CPU each
process spent per completed turn.

By default it runs on a private stack (`benchmarks.rig.BenchRig`, as `make bench` does); with `--url`
and `--api-key` it loads any deployment, and then only the client's own CPU is measured. `run` also
hands the steps back (`LoadFigures`), for the summary of `benchmarks.suite`.

This module also holds what `benchmarks.many_streams` and `benchmarks.recovery` share with it: the
turn client that counts failures instead of raising them (`TurnClient`); the plain tables are
`benchmarks.report.render_table`, and how each runs on a rig is `benchmarks.running`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Any

import httpx

from benchmarks.arms import Pace, send_body, sse_data
from benchmarks.cpu import CpuMeter, CpuSample
from benchmarks.report import percentiles, render_table
from benchmarks.rig import BenchRig, RigError
from benchmarks.running import (
    Outcome,
    ReportHeader,
    progress,
    run_benchmark,
    stack_description,
)

__all__ = [
    "Failure",
    "LoadFigures",
    "StepResult",
    "StreamedTurn",
    "TurnClient",
    "main",
    "run",
]

MS_PER_S = 1000.0
# A step falls "clearly short" when its turns complete at less than this share of the offered rate.
DEFAULT_MIN_ACHIEVED = 0.9
# The client process is reported as a possible bottleneck past this share of one core.
CLIENT_BUSY_WARNING = 0.8


class Failure(StrEnum):
    """Why a turn did not complete; every failed turn is counted under one of these."""

    STATUS = "non-200"
    ERROR_CHUNK = "error chunk"
    ABORT_CHUNK = "abort chunk"
    NO_FINISH = "no finish"
    WRONG_LENGTH = "wrong number of deltas"
    TIMEOUT = "timeout"
    CONNECTION = "connection error"
    BAD_EVENT = "unparsable event"


@dataclass
class StreamedTurn:
    """One turn as its client saw it, in seconds on the `time.perf_counter` clock."""

    # When the open loop meant to send it; `asked_at` is later when the client fell behind.
    scheduled_at: float
    asked_at: float = 0.0
    headers_at: float | None = None
    status: int | None = None
    delta_at: list[float] = field(default_factory=list)
    # `reset-step` chunks: a generation attempt failed and its retry starts the answer again.
    reset_at: list[float] = field(default_factory=list)
    # Text deltas since the last reset, i.e. of the answer the client keeps.
    kept_deltas: int = 0
    finished: bool = False
    ended_at: float | None = None
    failure: Failure | None = None
    detail: str = ""

    @property
    def completed(self) -> bool:
        return self.failure is None

    @property
    def time_to_first_token(self) -> float:
        return self.delta_at[0] - self.asked_at

    @property
    def time_to_headers(self) -> float | None:
        return None if self.headers_at is None else self.headers_at - self.asked_at

    @property
    def send_lag(self) -> float:
        return self.asked_at - self.scheduled_at

    @property
    def token_gaps(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.delta_at)]


class TurnClient:
    """POST /v1/chats and read the UI message stream to its end; one httpx client, a pool as large as asked.

    A turn's outcome is data, never an exception: `run_turn` returns every turn, failed ones with
    their `failure` set, so a load benchmark can count them. Events are parsed as the api arm of
    `make bench` parses them. httpx costs this process about 10 ms of CPU per 40-delta turn on a
    2-core EPYC, most of it in its transport layers (a read per event), not in the parsing; the
    reports print the client's CPU so a reader can tell when it matters.
    """

    def __init__(
        self, api_url: str, api_key: str, *, max_connections: int, turn_timeout: float
    ) -> None:
        self.turn_timeout = turn_timeout
        self._client = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"Bearer {api_key}"},
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # The whole turn is bounded by `turn_timeout` (asyncio.timeout in run_turn).
            timeout=httpx.Timeout(turn_timeout, connect=10.0),
        )

    async def run_turn(
        self,
        pace: Pace,
        *,
        scheduled_at: float | None = None,
        on_delta: Callable[[StreamedTurn], object] | None = None,
    ) -> StreamedTurn:
        """One new chat at `pace`; `on_delta` is called after each text delta is recorded."""
        now = time.perf_counter()
        turn = StreamedTurn(scheduled_at=now if scheduled_at is None else scheduled_at)
        try:
            async with asyncio.timeout(self.turn_timeout):
                await self._stream(turn, pace, on_delta)
        except (TimeoutError, httpx.TimeoutException):
            turn.failure = Failure.TIMEOUT
            turn.detail = f"no complete answer within {self.turn_timeout:g}s"
        except httpx.HTTPError as error:
            turn.failure = Failure.CONNECTION
            turn.detail = f"{type(error).__name__}: {error}"
        except ValueError as error:  # an event whose data is not JSON
            turn.failure = Failure.BAD_EVENT
            turn.detail = str(error)[:300]
        if turn.ended_at is None:
            turn.ended_at = time.perf_counter()
        if turn.failure is None:
            if not turn.finished:
                turn.failure, turn.detail = Failure.NO_FINISH, "the stream ended without finish"
            elif turn.kept_deltas != pace.words:
                turn.failure = Failure.WRONG_LENGTH
                turn.detail = f"expected {pace.words} text deltas, got {turn.kept_deltas}"
        return turn

    async def _stream(
        self, turn: StreamedTurn, pace: Pace, on_delta: Callable[[StreamedTurn], object] | None
    ) -> None:
        body = send_body(pace)
        turn.asked_at = time.perf_counter()
        async with self._client.stream("POST", "/v1/chats", json=body) as response:
            turn.headers_at = time.perf_counter()
            turn.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                turn.failure = Failure.STATUS
                turn.detail = f"{response.status_code}: {response.text[:300]}"
                return
            # Read to the end of the body, past [DONE]: a connection closed early is not reused.
            async for data in sse_data(response):
                now = time.perf_counter()
                if data == "[DONE]":
                    turn.ended_at = now
                    continue
                chunk: dict[str, Any] = json.loads(data)
                kind = chunk.get("type")
                if kind == "text-delta":
                    turn.delta_at.append(now)
                    turn.kept_deltas += 1
                    if on_delta is not None:
                        on_delta(turn)
                elif kind == "reset-step":
                    turn.reset_at.append(now)
                    turn.kept_deltas = 0
                elif kind == "finish":
                    turn.finished = True
                elif kind in ("error", "abort") and turn.failure is None:
                    turn.failure = Failure.ERROR_CHUNK if kind == "error" else Failure.ABORT_CHUNK
                    turn.detail = data[:300]

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass
class StepResult:
    """One step of the open loop: every turn it started, and what the client and stack spent."""

    rate: float
    seconds: float
    turns: list[StreamedTurn]
    capped: int
    peak_in_flight: int
    wall: float
    cpu: CpuSample

    @property
    def completed(self) -> list[StreamedTurn]:
        return [turn for turn in self.turns if turn.completed]

    @property
    def failed(self) -> list[StreamedTurn]:
        return [turn for turn in self.turns if not turn.completed]

    @property
    def achieved_rate(self) -> float:
        """The rate at which the step's turns completed: (n - 1) over the span of their completions.

        A step that keeps up completes turns as they arrive; a saturated one at its capacity, also
        after the arrivals stop, while its backlog drains. Unlike completions over the step's
        length, this has no bias from the time a turn takes.
        """
        ends = sorted(turn.ended_at for turn in self.completed if turn.ended_at is not None)
        if len(ends) < 2 or ends[-1] == ends[0]:
            return 0.0
        return (len(ends) - 1) / (ends[-1] - ends[0])

    def ttft_ms(self) -> list[float]:
        return [turn.time_to_first_token * MS_PER_S for turn in self.completed]

    def saturation(self, *, min_achieved: float, max_ttft_p99: float) -> str | None:
        """Why this step counts as saturated, or None."""
        if not self.completed:
            return "no turn completed"
        reasons = []
        if self.achieved_rate < min_achieved * self.rate:
            reasons.append(
                f"turns completed at {self.achieved_rate:.1f}/s, under {min_achieved:.0%} of "
                f"the {self.rate:g}/s offered"
            )
        ttft_p99 = percentiles(self.ttft_ms()).p99 / MS_PER_S
        if ttft_p99 > max_ttft_p99:
            reasons.append(f"TTFT p99 {ttft_p99:.2f}s over the {max_ttft_p99:g}s bound")
        if self.capped:
            reasons.append(f"the in-flight cap refused {self.capped} arrivals")
        return "; ".join(reasons) or None


@dataclass
class LoadFigures:
    """The steps run so far, in order, and the step that saturated; filled in as the run goes."""

    # Text deltas per answer.
    words: int
    # A step keeping up completes its turns at no less than this share of the offered rate.
    min_achieved: float
    steps: list[StepResult] = field(default_factory=list)
    # The offered rate of the step after which stepping stopped, saturated; None: no step saturated.
    saturated_at: float | None = None


async def run_step(
    client: TurnClient,
    pace: Pace,
    rate: float,
    seconds: float,
    *,
    max_in_flight: int,
    meter: CpuMeter,
) -> StepResult:
    """Send round(rate * seconds) turns, one every 1/rate s on the clock, and wait until all have ended.

    An arrival that finds `max_in_flight` turns running is not sent and is counted as capped: the
    safety cap keeps a saturated stack from being buried, and the count shows it happened.
    """
    arrivals = max(1, round(rate * seconds))
    tasks: list[asyncio.Task[StreamedTurn]] = []
    in_flight = peak = capped = 0

    def ended(_: asyncio.Task[StreamedTurn]) -> None:
        nonlocal in_flight
        in_flight -= 1

    before = meter.sample()
    started = time.perf_counter()
    try:
        for index in range(arrivals):
            due = started + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                capped += 1
                continue
            task = asyncio.create_task(client.run_turn(pace, scheduled_at=due))
            task.add_done_callback(ended)
            tasks.append(task)
            in_flight += 1
            peak = max(peak, in_flight)
        turns = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    wall = time.perf_counter() - started
    return StepResult(rate, seconds, turns, capped, peak, wall, meter.sample() - before)


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Open-loop load on POST /v1/chats, stepped up until durachat saturates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rates",
        type=_positive_floats,
        default="2,5,10,20,30,40,50",
        help="comma-separated arrival rates (new turns per second), one step each, in order",
    )
    parser.add_argument(
        "--step-seconds", type=float, default=30.0, help="arrivals per step last this long"
    )
    parser.add_argument("--words", type=int, default=40, help="text deltas per answer")
    parser.add_argument(
        "--delay-ms", type=float, default=10.0, help="the provider's pause between deltas"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=500,
        help="safety cap: an arrival finding this many turns running is not sent (counted as capped)",
    )
    parser.add_argument(
        "--turn-timeout", type=float, default=60.0, help="seconds before a turn counts as failed"
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="uncounted turns at the first rate before the steps"
    )
    parser.add_argument(
        "--min-achieved",
        type=float,
        default=DEFAULT_MIN_ACHIEVED,
        help="stop after a step whose turns complete at less than this share of the offered rate",
    )
    parser.add_argument(
        "--max-ttft-p99",
        type=float,
        default=5.0,
        help="stop after a step whose time-to-first-token p99 exceeds this many seconds",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="load this deployment instead of a private stack (needs --api-key)",
    )
    parser.add_argument("--api-key", default=None, help="an API key of the --url deployment")
    parser.add_argument(
        "--keep", action="store_true", help="keep the private stack's data and log directory"
    )
    options = parser.parse_args(argv)
    if (options.url is None) != (options.api_key is None):
        parser.error("--url and --api-key go together")
    if options.words < 1 or options.max_in_flight < 1 or options.warmup < 0:
        parser.error("--words and --max-in-flight must be >= 1, --warmup >= 0")
    if options.delay_ms < 0 or options.step_seconds <= 0 or options.turn_timeout <= 0:
        parser.error("--delay-ms must be >= 0, --step-seconds and --turn-timeout > 0")
    if not 0 < options.min_achieved <= 1 or options.max_ttft_p99 <= 0:
        parser.error("--min-achieved must be in (0, 1], --max-ttft-p99 > 0")
    return options


async def measure(
    api_url: str,
    api_key: str,
    pids: dict[str, int],
    options: argparse.Namespace,
    sections: list[str],
    figures: LoadFigures,
) -> None:
    """Warm up, then run the steps until one saturates; each step's rows go into `sections` and the
    step into `figures` as it ends."""
    pace = Pace(options.words, options.delay_ms)
    client = TurnClient(
        api_url, api_key, max_connections=options.max_in_flight, turn_timeout=options.turn_timeout
    )
    meter = CpuMeter(pids)
    results = figures.steps
    try:
        if options.warmup:
            progress(f"warm-up: {options.warmup} turns at {options.rates[0]:g}/s")
            warmup = await run_step(
                client,
                pace,
                options.rates[0],
                options.warmup / options.rates[0],
                max_in_flight=options.max_in_flight,
                meter=meter,
            )
            if not warmup.completed:
                failure = warmup.failed[0]
                raise RigError(
                    f"every warm-up turn failed; the first: {failure.failure}: {failure.detail}"
                )
        stop_reason = f"every step ran; not saturated up to {options.rates[-1]:g}/s"
        for index, rate in enumerate(options.rates, start=1):
            progress(
                f"[{index}/{len(options.rates)}] {rate:g} turns/s for {options.step_seconds:g}s"
            )
            result = await run_step(
                client,
                pace,
                rate,
                options.step_seconds,
                max_in_flight=options.max_in_flight,
                meter=meter,
            )
            results.append(result)
            progress(
                f"  completed {len(result.completed)} of {len(result.turns)} "
                f"({len(result.failed)} failed, {result.capped} capped), "
                f"{result.achieved_rate:.1f}/s achieved"
            )
            sections[:] = render_steps(results, has_stack=bool(pids))
            reason = result.saturation(
                min_achieved=options.min_achieved, max_ttft_p99=options.max_ttft_p99
            )
            if reason is not None:
                stop_reason = f"stopped after {rate:g}/s: {reason}"
                figures.saturated_at = rate
                break
        sections.append(stop_reason)
    finally:
        await client.aclose()


def render_steps(results: Sequence[StepResult], *, has_stack: bool) -> list[str]:
    """The turns, latency and CPU tables of the steps so far, and the failures of each."""
    turns = render_table(
        "turns per step",
        [
            "offered/s",
            "achieved/s",
            "started",
            "completed",
            "failed",
            "capped",
            "peak in flight",
            "retried",
            "send lag p99 ms",
        ],
        [
            [
                f"{r.rate:g}",
                f"{r.achieved_rate:.1f}",
                str(len(r.turns)),
                str(len(r.completed)),
                str(len(r.failed)),
                str(r.capped),
                str(r.peak_in_flight),
                str(sum(1 for turn in r.completed if turn.reset_at)),
                _p99([turn.send_lag * MS_PER_S for turn in r.turns]),
            ]
            for r in results
        ],
        labels=False,
    )
    latency_rows = []
    for r in results:
        if not r.completed:
            latency_rows.append([f"{r.rate:g}", *["-"] * 6])
            continue
        ttft = percentiles(r.ttft_ms())
        headers = percentiles(
            [t * MS_PER_S for turn in r.completed if (t := turn.time_to_headers) is not None]
        )
        gaps = [gap * MS_PER_S for turn in r.completed for gap in turn.token_gaps]
        latency_rows.append(
            [
                f"{r.rate:g}",
                f"{ttft.p50:.1f}",
                f"{ttft.p95:.1f}",
                f"{ttft.p99:.1f}",
                f"{headers.p50:.1f}",
                f"{headers.p99:.1f}",
                _p99(gaps),
            ]
        )
    latency = render_table(
        "latency of completed turns (ms)",
        ["offered/s", "TTFT p50", "p95", "p99", "headers p50", "p99", "token gap p99"],
        latency_rows,
        labels=False,
    )
    names = list(results[0].cpu.seconds) if results else []
    cpu_rows = []
    for r in results:
        done = len(r.completed)
        per_turn = [
            f"{r.cpu.seconds[name] * MS_PER_S / done:.1f}" if done else "-" for name in names
        ]
        total = sum(r.cpu.seconds.values()) * MS_PER_S / done if done else 0.0
        busy = r.cpu.seconds.get("client", 0.0) / r.wall
        cpu_rows.append([f"{r.rate:g}", *per_turn, f"{total:.1f}" if done else "-", f"{busy:.0%}"])
    cpu_title = "cpu per completed turn (ms), and the client's busy share of one core"
    if not has_stack:
        cpu_title += " (a remote deployment: only the client's own CPU is measured)"
    cpu = render_table(
        cpu_title, ["offered/s", *names, "total", "client busy"], cpu_rows, labels=False
    )
    sections = [turns, latency, cpu]
    notes = []
    for r in results:
        if r.failed:
            kinds = Counter(turn.failure for turn in r.failed)
            first = r.failed[0]
            notes.append(
                f"  {r.rate:g}/s: {len(r.failed)} failed ("
                + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
                + f"); the first: {first.failure}: {first.detail}"
            )
        busy = r.cpu.seconds.get("client", 0.0) / r.wall
        if busy > CLIENT_BUSY_WARNING:
            notes.append(
                f"  {r.rate:g}/s: the client was busy {busy:.0%} of a core: its own delays are "
                "in these figures"
            )
    if notes:
        sections.append("failures and warnings\n" + "\n".join(notes))
    return sections


def _p99(values: Sequence[float]) -> str:
    return f"{percentiles(values).p99:.1f}" if values else "-"


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from error
    if not values or any(not math.isfinite(value) or value <= 0 for value in values):
        raise argparse.ArgumentTypeError("expected positive numbers, e.g. 2,5,10")
    return values


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks.load") -> int:
    return run(argv, prog=prog).exit_code


def run(
    argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks.load"
) -> Outcome[LoadFigures]:
    """Parse `argv`, step the load up and print the report; the exit code and the steps that ran."""
    options = parse_args(argv, prog)
    rig = None if options.url else BenchRig(keep_work_dir=options.keep)
    figures = LoadFigures(options.words, options.min_achieved)

    async def measure_steps(sections: list[str]) -> int:
        if rig is None:
            await measure(options.url, options.api_key, {}, options, sections, figures)
        else:
            await measure(rig.api_url, rig.api_key, rig.process_ids(), options, sections, figures)
        # Failed turns are figures here, counted in the report, not a failed run.
        return 0

    def header() -> ReportHeader:
        return ReportHeader(
            f"durachat open-loop load: {options.words} words @ {options.delay_ms:g} ms per turn, "
            f"a new chat every 1/rate s, {options.step_seconds:g} s of arrivals per step",
            stack_description(rig, options.url),
            [
                f"limits    max {options.max_in_flight} turns in flight, {options.turn_timeout:g} s "
                f"per turn; saturated below {options.min_achieved:.0%} of the offered rate or past "
                f"a {options.max_ttft_p99:g} s TTFT p99"
            ],
        )

    exit_code = run_benchmark(rig, measure_steps, header)
    return Outcome(exit_code, figures if figures.steps else None)


if __name__ == "__main__":
    raise SystemExit(main())
