"""structlog configuration shared by the api, the worker and the CLI. Imports nothing of the project but settings."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TextIO

import structlog
from structlog.typing import ExcInfo

from core.settings import Settings

# A traceback keeps this many frames at each end: the outermost say which request or task it was,
# the innermost where it failed. A RecursionError has about a thousand frames in between.
OUTER_FRAMES_KEPT = 10
INNER_FRAMES_KEPT = 25


def configure_logging(settings: Settings) -> None:
    """Route stdlib and structlog records through one renderer, JSON in production and console in dev.

    Log records are rendered on the thread that logs them, which in the api is the event loop, so
    tracebacks are rendered plainly and trimmed: never Rich's pretty tracebacks, whose cost grows with
    the depth of the stack and of every local variable in it (a request that overflowed the stack
    once kept the api from answering anything for minutes).
    """
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderers: list[structlog.types.Processor] = (
        [
            structlog.processors.ExceptionRenderer(format_bounded_traceback),
            structlog.processors.JSONRenderer(),
        ]
        if settings.log_json
        else [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=write_bounded_traceback
            )
        ]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log duplicates the api's own request log line, which carries the request id.
    logging.getLogger("uvicorn.access").disabled = True


def format_bounded_traceback(exc_info: ExcInfo) -> str:
    """The standard library's traceback of `exc_info`, without locals, each stack in its chain cut to
    its outermost and innermost frames, so its cost and size stay bounded however deep it is."""
    exception = traceback.TracebackException(*exc_info, lookup_lines=False)
    seen: set[int] = set()
    pending = [exception]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack = _TrimmedStack.around(current.stack)
        pending.extend(
            chained
            for chained in (current.__cause__, current.__context__, *(current.exceptions or ()))
            if chained is not None
        )
    return "".join(exception.format()).rstrip("\n")


def write_bounded_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """`format_bounded_traceback` as structlog's ConsoleRenderer takes an exception formatter."""
    sio.write("\n" + format_bounded_traceback(exc_info))


class _ElidedFrames(traceback.FrameSummary):
    def __init__(self, count: int) -> None:
        super().__init__("", 0, "", lookup_line=False, line="")
        self.count = count


class _TrimmedStack(traceback.StackSummary):
    @classmethod
    def around(cls, stack: traceback.StackSummary) -> traceback.StackSummary:
        elided = len(stack) - OUTER_FRAMES_KEPT - INNER_FRAMES_KEPT
        if elided <= 0:
            return stack
        return cls([*stack[:OUTER_FRAMES_KEPT], _ElidedFrames(elided), *stack[-INNER_FRAMES_KEPT:]])

    def format_frame_summary(self, frame_summary: traceback.FrameSummary) -> str:
        if isinstance(frame_summary, _ElidedFrames):
            return f"  [... {frame_summary.count} frames elided ...]\n"
        return super().format_frame_summary(frame_summary)
