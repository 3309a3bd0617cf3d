"""`python -m benchmarks.turn_latency` (`make bench-latency`, first part of `make bench`): what a turn through durachat adds to a direct provider stream.

On a private stack (free ports, temporary data dir; see `benchmarks.rig`) it runs the same turns four ways
at the same pace and concurrency:

- direct: the built-in `local` provider's stream, consumed in this process;
- stateless: the same stream sent as the same UI message stream by a FastAPI + sse-starlette server
  with nothing durable behind it (see `benchmarks.peer_arms`);
- resumable (Node): the AI SDK's resumable-chat recipe (`ai` + `resumable-stream` on the rig's Redis,
  messages in its Postgres), when Node and the peer's node_modules are installed;
- through api: POST /v1/chats with `local/lorem` over real HTTP, i.e. auth, update-with-start of the turn
  workflow, the claim and store activities, the generation activity writing to a Redis Stream, and the
  api relaying that stream as SSE.

For each it reports p50/p95/p99 of the time to the first text delta and of the gaps between successive
deltas, what the api adds over each other arm, the turns per second achieved and the CPU time each
process on an arm's path spent per turn. The arms run in alternating rounds, so a noisy moment of the
machine lands on all of them rather than on one.

A last case stops paced turns mid-answer (POST /v1/chats/{id}/stop from a second connection once a few
deltas have arrived) and reports the time from the stop request to the `abort` chunk on the open stream.

`run` also hands the figures back (`TurnLatencyFigures`), for the summary of `benchmarks.suite`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from benchmarks.arms import (
    ApiArm,
    DirectArm,
    Pace,
    StopArm,
    StopTiming,
    TurnFailedError,
    TurnTiming,
)
from benchmarks.cpu import CpuMeter
from benchmarks.peer_arms import (
    RESUMABLE_ARM,
    STATELESS_ARM,
    PeerServers,
    node_versions,
    resumable_unavailable,
)
from benchmarks.report import (
    ArmFigures,
    ArmReport,
    Percentiles,
    percentiles,
    render_case,
    render_stop,
)
from benchmarks.rig import BenchRig
from benchmarks.running import Outcome, ReportHeader, progress, run_benchmark

MS_PER_S = 1000.0


class Arm(Protocol):
    name: str

    async def run_turn(self, pace: Pace) -> TurnTiming: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Case:
    pace: Pace
    concurrency: int
    turns: int

    @property
    def title(self) -> str:
        clients = "1 client" if self.concurrency == 1 else f"{self.concurrency} concurrent clients"
        return (
            f"{self.pace.words} words @ {self.pace.delay_ms:g} ms, {clients}, "
            f"{self.turns} turns per arm"
        )


@dataclass
class ArmRun:
    """Every measured turn of one arm in one case, and the wall time its blocks took."""

    timings: list[TurnTiming]
    elapsed: float = 0.0
    # CPU seconds each measured process spent while this arm's blocks ran.
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def figures(self) -> ArmFigures:
        return ArmFigures(
            time_to_first_token=percentiles(
                [timing.time_to_first_token * MS_PER_S for timing in self.timings]
            ),
            token_delay=percentiles(
                [gap * MS_PER_S for timing in self.timings for gap in timing.token_gaps]
            ),
            turns_per_second=len(self.timings) / self.elapsed,
        )

    def cpu_ms_per_turn(self, processes: Sequence[str]) -> dict[str, float]:
        """CPU milliseconds per turn of the named processes (those on this arm's path)."""
        return {
            name: self.cpu_seconds.get(name, 0.0) * MS_PER_S / len(self.timings)
            for name in processes
        }

    def accept_percentiles(self) -> Percentiles | None:
        """Time to the response headers, for an arm that has them (HTTP)."""
        accepts = [
            accept * MS_PER_S
            for timing in self.timings
            if (accept := timing.time_to_accept) is not None
        ]
        return percentiles(accepts) if accepts else None

    def report(self, name: str, processes: Sequence[str]) -> ArmReport:
        return ArmReport(
            name, self.figures(), self.accept_percentiles(), self.cpu_ms_per_turn(processes)
        )


@dataclass(frozen=True)
class StopCase:
    """Paced turns through the api, each stopped once `stop_after` text deltas have arrived."""

    pace: Pace
    concurrency: int
    turns: int
    stop_after: int
    verify_every: int

    @property
    def title(self) -> str:
        clients = "1 client" if self.concurrency == 1 else f"{self.concurrency} concurrent clients"
        return (
            f"stop: {self.pace.words} words @ {self.pace.delay_ms:g} ms, stopped after "
            f"{self.stop_after} deltas, {clients}, {self.turns} turns"
        )


@dataclass(frozen=True)
class CaseFigures:
    """One case's arms as its table shows them, durachat's api among them."""

    case: Case
    arms: list[ArmReport]

    def arm(self, name: str) -> ArmReport | None:
        return next((arm for arm in self.arms if arm.name == name), None)


@dataclass(frozen=True)
class StopFigures:
    """The stop case in milliseconds after the stop request was sent."""

    case: StopCase
    answered: Percentiles
    to_abort: Percentiles


@dataclass(frozen=True)
class TurnLatencyFigures:
    """Every case that ran, in order, and the stop case if it ran."""

    cases: list[CaseFigures]
    stop: StopFigures | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.turn_latency",
        description="Time to first token and per-token delay through durachat's api, "
        "against the same provider stream consumed directly and served by two peer servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--words", type=int, default=40, help="text deltas per answer")
    parser.add_argument(
        "--delay-ms", type=float, default=10.0, help="the provider's pause between deltas"
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_ints,
        default=[1, 8],
        help="comma-separated numbers of concurrent clients; one case each",
    )
    parser.add_argument("--turns", type=int, default=100, help="measured turns per arm and case")
    parser.add_argument(
        "--burst-concurrency",
        type=_positive_ints,
        default=[8],
        help="comma-separated numbers of concurrent clients for the delayMs=0 cases, where the "
        "provider emits every delta at once",
    )
    parser.add_argument(
        "--no-burst", dest="burst", action="store_false", help="skip the delayMs=0 cases"
    )
    parser.add_argument(
        "--warmup", type=int, default=8, help="uncounted turns per arm before each case"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds per case; each runs one block per arm"
    )
    parser.add_argument(
        "--turn-timeout", type=float, default=30.0, help="seconds before a turn counts as failed"
    )
    parser.add_argument(
        "--stop-turns",
        type=int,
        default=50,
        help="measured stopped turns of the stop case; 0 skips the case",
    )
    parser.add_argument(
        "--stop-words", type=int, default=400, help="text deltas a stop-case answer would have"
    )
    parser.add_argument(
        "--stop-delay-ms",
        type=float,
        default=20.0,
        help="provider pause between deltas (stop case)",
    )
    parser.add_argument(
        "--stop-after", type=int, default=3, help="text deltas received before the stop is sent"
    )
    parser.add_argument(
        "--stop-concurrency", type=int, default=1, help="concurrent clients of the stop case"
    )
    parser.add_argument(
        "--stop-verify-every",
        type=int,
        default=1,
        help="read every Nth stopped chat back and check its last message is `aborted` with the "
        "streamed text; 0 never",
    )
    parser.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="skip the stateless and resumable (Node) peer arms",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data and log directory"
    )
    options = parser.parse_args(argv)
    for name in ("words", "turns", "rounds"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if options.warmup < 0 or options.delay_ms < 0 or options.turn_timeout <= 0:
        parser.error("--warmup and --delay-ms must be >= 0, --turn-timeout > 0")
    if options.rounds > options.turns:
        parser.error("--rounds cannot exceed --turns")
    if options.stop_turns < 0 or options.stop_verify_every < 0:
        parser.error("--stop-turns and --stop-verify-every must be >= 0")
    if options.stop_after < 1 or options.stop_concurrency < 1 or options.stop_delay_ms <= 0:
        parser.error("--stop-after and --stop-concurrency must be >= 1, --stop-delay-ms > 0")
    if options.stop_words <= options.stop_after:
        parser.error("--stop-words must exceed --stop-after")
    return options


def plan_cases(options: argparse.Namespace) -> list[Case]:
    paced = Pace(options.words, options.delay_ms)
    cases = [Case(paced, concurrency, options.turns) for concurrency in options.concurrency]
    if options.burst and options.delay_ms > 0:
        burst = Pace(options.words, 0.0)
        cases += [
            Case(burst, concurrency, options.turns) for concurrency in options.burst_concurrency
        ]
    return cases


async def run_block(
    arm: Arm, pace: Pace, turns: int, concurrency: int, turn_timeout: float
) -> ArmRun:
    """`turns` turns by `concurrency` clients, each starting its next turn as soon as one ends."""
    timings: list[TurnTiming] = []

    async def turn(_: int) -> None:
        timings.append(await arm.run_turn(pace))

    elapsed = await _run_clients(arm.name, turn, turns, concurrency, turn_timeout)
    return ArmRun(timings, elapsed)


async def _run_clients(
    name: str,
    turn: Callable[[int], Awaitable[None]],
    turns: int,
    concurrency: int,
    turn_timeout: float,
) -> float:
    """Call `turn(index)` `turns` times from `concurrency` clients; return the wall time it took."""
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < turns:
            index = next_index
            next_index += 1
            try:
                async with asyncio.timeout(turn_timeout):
                    await turn(index)
            except TimeoutError as error:
                raise TurnFailedError(
                    f"{name}: no complete answer within {turn_timeout:g}s"
                ) from error
            except httpx.HTTPError as error:
                raise TurnFailedError(f"{name}: {type(error).__name__}: {error}") from error

    started = time.perf_counter()
    clients = [asyncio.create_task(client()) for _ in range(min(concurrency, turns))]
    try:
        await asyncio.gather(*clients)
    finally:
        # gather leaves the other clients running when one fails; a failed block stops at once.
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return time.perf_counter() - started


async def run_case(
    case: Case,
    arms: Sequence[Arm],
    meter: CpuMeter,
    *,
    warmup: int,
    rounds: int,
    turn_timeout: float,
) -> dict[str, ArmRun]:
    """Every arm's measured turns of `case`, by arm name."""
    # Warm-up fills the servers' caches and connection pools and lets the kept-alive client
    # connections open at this case's concurrency; none of it is counted.
    for arm in arms:
        if warmup:
            await run_block(arm, case.pace, warmup, case.concurrency, turn_timeout)
    runs = {arm.name: ArmRun([]) for arm in arms}
    for round_index, turns in enumerate(_split(case.turns, rounds)):
        # Alternate the order every round, so no arm always runs right after the same other's load.
        order = arms if round_index % 2 == 0 else list(reversed(arms))
        for arm in order:
            before = meter.sample()
            block = await run_block(arm, case.pace, turns, case.concurrency, turn_timeout)
            spent = meter.sample() - before
            run = runs[arm.name]
            run.timings.extend(block.timings)
            run.elapsed += block.elapsed
            for name, seconds in spent.seconds.items():
                run.cpu_seconds[name] = run.cpu_seconds.get(name, 0.0) + seconds
    return runs


def plan_stop_case(options: argparse.Namespace) -> StopCase | None:
    if options.stop_turns == 0:
        return None
    return StopCase(
        Pace(options.stop_words, options.stop_delay_ms),
        options.stop_concurrency,
        options.stop_turns,
        options.stop_after,
        options.stop_verify_every,
    )


async def run_stop_case(
    case: StopCase, arm: StopArm, meter: CpuMeter, *, warmup: int, turn_timeout: float
) -> tuple[str, StopFigures]:
    """Warm up, then time `case.turns` stopped turns; the case's table and its figures."""

    async def block(turns: int, timings: list[StopTiming], verify_every: int) -> float:
        async def turn(index: int) -> None:
            verify = verify_every > 0 and index % verify_every == 0
            timings.append(await arm.run_turn(case.pace, stop_after=case.stop_after, verify=verify))

        return await _run_clients(arm.name, turn, turns, case.concurrency, turn_timeout)

    if warmup:
        await block(warmup, [], 1)
    timings: list[StopTiming] = []
    before = meter.sample()
    elapsed = await block(case.turns, timings, case.verify_every)
    cpu = {
        name: seconds * MS_PER_S / len(timings)
        for name, seconds in (meter.sample() - before).seconds.items()
    }
    late = sorted(timing.deltas_after_stop for timing in timings)
    verified = sum(timing.verified for timing in timings)
    answered = [t.stop_response * MS_PER_S for t in timings]
    to_abort = [t.to_abort * MS_PER_S for t in timings]
    table = render_stop(
        case.title,
        [
            ("stop request answered (200)", answered),
            ("abort chunk on the open stream", to_abort),
            ("finish chunk on the open stream", [t.to_finish * MS_PER_S for t in timings]),
        ],
        [
            "text deltas after the stop was sent: "
            f"median {late[len(late) // 2]}, max {late[-1]} "
            f"(one per {case.pace.delay_ms:g} ms while the stop is unseen)",
            f"read back as `aborted` with the streamed text: {verified} of {len(timings)} chats"
            + ("" if verified == len(timings) else " checked (--stop-verify-every)"),
            f"stopped turns/s: {len(timings) / elapsed:.1f}; cpu per stopped turn (ms): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in cpu.items())
            + f"; total {sum(cpu.values()):.1f}",
        ],
    )
    return table, StopFigures(case, percentiles(answered), percentiles(to_abort))


async def measure(
    rig: BenchRig,
    peers: PeerServers | None,
    cases: list[Case],
    stop_case: StopCase | None,
    options: argparse.Namespace,
) -> tuple[list[str], TurnLatencyFigures]:
    """Run every case, then the stop case; their tables and figures."""
    max_connections = max(case.concurrency for case in cases)
    direct = DirectArm()
    api = ApiArm(
        rig.api_url, rig.api_key, max_connections=max_connections, timeout=options.turn_timeout
    )
    peer_arms = (
        peers.arms(max_connections=max_connections, timeout=options.turn_timeout)
        if peers is not None
        else []
    )
    stop = StopArm(
        rig.api_url,
        rig.api_key,
        max_connections=stop_case.concurrency if stop_case else 1,
        timeout=options.turn_timeout,
    )
    # Every arm goes through the client; each peer through its own server, Redis and Postgres (the
    # stateless peer touches neither, and its figures show it); the api through the whole stack.
    rig_processes = rig.process_ids()
    peer_processes = peers.process_names() if peers is not None else {}
    processes: dict[str, tuple[str, ...]] = {
        direct.name: ("client",),
        **{
            arm: ("client", process, "postgres", "redis") for arm, process in peer_processes.items()
        },
        api.name: ("client", *rig_processes),
    }
    meter = CpuMeter({**rig_processes, **(peers.process_ids() if peers is not None else {})})
    arms: list[Arm] = [direct, *peer_arms, api]
    tables = []
    case_figures: list[CaseFigures] = []
    stop_figures: StopFigures | None = None
    total = len(cases) + (stop_case is not None)
    try:
        for index, case in enumerate(cases, start=1):
            progress(f"[{index}/{total}] {case.title}")
            runs = await run_case(
                case,
                arms,
                meter,
                warmup=options.warmup,
                rounds=options.rounds,
                turn_timeout=options.turn_timeout,
            )
            reports = [runs[arm.name].report(arm.name, processes[arm.name]) for arm in arms]
            tables.append(
                render_case(
                    case.title, reports, api.name, cpu_ratio_to=[arm.name for arm in peer_arms]
                )
            )
            case_figures.append(CaseFigures(case, reports))
        if stop_case is not None:
            progress(f"[{total}/{total}] {stop_case.title}")
            table, stop_figures = await run_stop_case(
                stop_case,
                stop,
                CpuMeter(rig_processes),
                warmup=options.warmup,
                turn_timeout=options.turn_timeout,
            )
            tables.append(table)
    finally:
        await stop.aclose()
        for arm in arms:
            await arm.aclose()
    return tables, TurnLatencyFigures(case_figures, stop_figures)


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv).exit_code


def run(argv: Sequence[str] | None = None) -> Outcome[TurnLatencyFigures]:
    """Parse `argv`, measure on a private stack and print the report; the exit code and the figures."""
    options = parse_args(argv)
    cases = plan_cases(options)
    stop_case = plan_stop_case(options)
    rig = BenchRig(keep_work_dir=options.keep)
    resumable_skipped = resumable_unavailable() if options.peers else None
    peers: PeerServers | None = None

    def beside_rig() -> PeerServers | None:
        nonlocal peers
        if options.peers:
            if resumable_skipped is not None:
                progress(f"the resumable (Node) peer will not run: {resumable_skipped}")
            peers = PeerServers(
                redis_url=rig.settings.resolved_redis_url,
                database_url=rig.settings.resolved_database_url,
                log_path=rig.log_dir / "peers.log",
                resumable=resumable_skipped is None,
            )
        return peers

    figures: TurnLatencyFigures | None = None

    async def measure_all(sections: list[str]) -> int:
        nonlocal figures
        # The tables are printed only when every case ran: a run cut short prints none.
        tables, figures = await measure(rig, peers, cases, stop_case, options)
        sections[:] = tables
        return 0

    exit_code = run_benchmark(
        rig, measure_all, lambda: report_header(options, resumable_skipped), servers=beside_rig
    )
    return Outcome(exit_code, figures)


def report_header(options: argparse.Namespace, resumable_skipped: str | None) -> ReportHeader:
    if not options.peers:
        peer_line = "none (--no-peers)"
    else:
        resumable = (
            f"{RESUMABLE_ARM}: ai + resumable-stream on node:http ({node_versions()})"
            if resumable_skipped is None
            else f"{RESUMABLE_ARM} did not run: {resumable_skipped}"
        )
        peer_line = f"{STATELESS_ARM}: FastAPI + sse-starlette, nothing durable; {resumable}"
    compared = (
        "direct provider stream, peer servers," if options.peers else "direct provider stream"
    )
    return ReportHeader(
        f"durachat turn latency: {compared} and the same turn through the api",
        "stack     embedded Temporal dev server, Postgres, Valkey; 1 api, 1 worker; all on this machine",
        [f"peers     {peer_line}"],
        f"{options.warmup} warm-up turns per arm and case, {options.rounds} alternating rounds",
    )


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from error
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,8")
    return values


if __name__ == "__main__":
    raise SystemExit(main())
