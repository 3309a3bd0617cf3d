"""`python -m benchmarks.suite` (`make bench`): every benchmark of point 1 in one command, then one table of its targets.

It runs the four parts one after the other, each through its own `run` with its own default sizes and
on a private stack of its own (`benchmarks.rig.BenchRig`), and each prints its report as it does alone:

- latency  `benchmarks.turn_latency` (`make bench-latency`): time to first token and per-token delay
  of durachat against a direct provider stream and the two peers, and stop-to-abort;
- load     `benchmarks.load` (`make bench-load`): open-loop stepped load until the stack saturates;
- streams  `benchmarks.many_streams` (`make bench-streams`): 1,000 live streams at 10 tokens/s;
- recovery `benchmarks.recovery` (`make bench-recovery`): worker SIGKILL to the next token.

Then it prints the summary (`benchmarks.targets`): each target of point 1, durachat's figure, the
peers' where they ran the same turns, and whether the target is met. A part that fails does not stop
the others (its rows say "not measured" and the exit code is 1); Ctrl-C stops the run after the part
it interrupts, and the summary still covers the parts that ran (exit code 130).

Flags:

- `--quick`: every part shrunk to a smoke run of a few minutes in all (each `Part.quick`); its
  verdicts on the load and streams targets are starred, as measured on a smaller run than the target.
- `--only latency,load` / `--skip streams`: run some parts only.
- `--latency-args`, `--load-args`, `--streams-args`, `--recovery-args` "FLAGS": more flags for one
  part, after those of `--quick` (so they win), e.g. `--streams-args "--streams 300 --ramp 10"`.
  Every part's flags are checked before the first stack starts.
- `--keep`: keep every part's data and log directory.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from benchmarks import load, many_streams, recovery, turn_latency
from benchmarks.running import EXIT_INTERRUPTED, Outcome, progress
from benchmarks.targets import SuiteFigures, render_summary, target_rows

FiguresT = TypeVar("FiguresT")
FiguresT_co = TypeVar("FiguresT_co", covariant=True)


@dataclass(frozen=True)
class Part(Generic[FiguresT_co]):
    """One benchmark of the suite: how to check its flags, how to run it, and its `--quick` flags."""

    name: str
    module: str
    run: Callable[[Sequence[str]], Outcome[FiguresT_co]]
    check: Callable[[Sequence[str]], object]
    quick: tuple[str, ...]

    @property
    def command(self) -> str:
        return f"python -m {self.module}"


LATENCY = Part(
    "latency",
    "benchmarks.turn_latency",
    turn_latency.run,
    turn_latency.parse_args,
    # Both client counts of the targets, fewer turns, no delayMs=0 case.
    ("--turns", "24", "--warmup", "2", "--rounds", "2", "--no-burst", "--stop-turns", "10"),
)
LOAD = Part(
    "load",
    "benchmarks.load",
    load.run,
    lambda argv: load.parse_args(argv, "python -m benchmarks.load"),
    ("--rates", "2,5,10", "--step-seconds", "10", "--warmup", "4"),
)
STREAMS = Part(
    "streams",
    "benchmarks.many_streams",
    many_streams.run,
    many_streams.parse_args,
    ("--streams", "100", "--ramp", "10", "--hold-seconds", "5"),
)
RECOVERY = Part(
    "recovery", "benchmarks.recovery", recovery.run, recovery.parse_args, ("--repeats", "1")
)
PARTS: tuple[Part[object], ...] = (LATENCY, LOAD, STREAMS, RECOVERY)
PART_NAMES = tuple(part.name for part in PARTS)


class Suite:
    """Runs the selected parts in order and keeps each one's exit code; nothing after an interrupt."""

    def __init__(self, options: argparse.Namespace) -> None:
        self._options = options
        self._selected = [name for name in PART_NAMES if name in options.parts]
        self.exit_codes: dict[str, int] = {}

    @property
    def interrupted(self) -> bool:
        return EXIT_INTERRUPTED in self.exit_codes.values()

    def argv(self, part: Part[object]) -> list[str]:
        argv = list(part.quick) if self._options.quick else []
        argv += shlex.split(getattr(self._options, f"{part.name}_args"))
        if self._options.keep:
            argv.append("--keep")
        return argv

    def check(self, part: Part[object]) -> None:
        if part.name in self._selected:
            part.check(self.argv(part))

    def run(self, part: Part[FiguresT]) -> FiguresT | None:
        if part.name not in self._selected or self.interrupted:
            return None
        argv = self.argv(part)
        index = self._selected.index(part.name) + 1
        progress(
            f"=== [{index}/{len(self._selected)}] {part.name}: {part.command} {shlex.join(argv)}"
        )
        if index > 1:
            # A blank line between one part's report and the next.
            sys.stdout.write("\n")
        try:
            outcome = part.run(argv)
        except KeyboardInterrupt:
            # Ctrl-C outside the part's measurement (its stack not yet started): the part stopped
            # nothing of its own, and the summary still comes.
            progress("interrupted")
            self.exit_codes[part.name] = EXIT_INTERRUPTED
            return None
        except Exception:
            # A part that breaks must not take the others' figures with it; its traceback says why.
            progress(f"{part.name} broke:\n{traceback.format_exc()}")
            self.exit_codes[part.name] = 1
            return None
        self.exit_codes[part.name] = outcome.exit_code
        return outcome.figures

    def status(self) -> str:
        """Each part's command line and how it ended."""
        lines = []
        for name in PART_NAMES:
            if name not in self._selected:
                state = "not run (--only/--skip)"
            elif name not in self.exit_codes:
                state = "not run (interrupted before it)"
            elif self.exit_codes[name] == EXIT_INTERRUPTED:
                state = f"interrupted (exit {EXIT_INTERRUPTED})"
            else:
                state = f"exit {self.exit_codes[name]}"
            lines.append(f"  {name:<9} {state}")
        return "\n".join(lines)

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 1 if any(self.exit_codes.values()) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="Every benchmark of point 1 (turn latency, load, many streams, recovery), "
        "each on its own private stack, then one table of the targets.",
        epilog="Each part's own flags: python -m <its module> --help ("
        + ", ".join(f"{part.name}: {part.module}" for part in PARTS)
        + ").",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shrink every part to a smoke run, a few minutes in all: "
        + "; ".join(f"{part.name} {' '.join(part.quick)}" for part in PARTS),
    )
    parts = ",".join(PART_NAMES)
    parser.add_argument(
        "--only",
        type=_part_names,
        default=None,
        metavar="PARTS",
        help=f"comma-separated parts to run, among {parts} (default: all)",
    )
    parser.add_argument(
        "--skip",
        type=_part_names,
        default=[],
        metavar="PARTS",
        help="comma-separated parts not to run",
    )
    for name in PART_NAMES:
        parser.add_argument(
            f"--{name}-args",
            default="",
            metavar="FLAGS",
            help=f"more flags for the {name} part (see its --help), after those of --quick",
        )
    parser.add_argument(
        "--keep", action="store_true", help="keep every part's data and log directory"
    )
    options = parser.parse_args(argv)
    chosen = options.only if options.only is not None else list(PART_NAMES)
    options.parts = [name for name in chosen if name not in options.skip]
    if not options.parts:
        parser.error("--only and --skip leave no part to run")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    suite = Suite(options)
    for part in PARTS:
        # A wrong flag fails here, not after the parts before it have run for minutes.
        suite.check(part)
    started = time.monotonic()
    # Keyword arguments are evaluated in order: the parts run latency, load, streams, recovery.
    figures = SuiteFigures(
        latency=suite.run(LATENCY),
        load=suite.run(LOAD),
        streams=suite.run(STREAMS),
        recovery=suite.run(RECOVERY),
    )
    elapsed = time.monotonic() - started
    lines = [
        "",
        f"durachat benchmark suite: {elapsed / 60:.1f} min in total"
        + (" (--quick)" if options.quick else ""),
        suite.status(),
        "",
        render_summary(target_rows(figures)),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return suite.exit_code()


def _part_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in PART_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected parts among {', '.join(PART_NAMES)}; got {text!r}"
        )
    return names


if __name__ == "__main__":
    raise SystemExit(main())
