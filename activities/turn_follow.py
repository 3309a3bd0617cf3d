"""Following a turn's stream as text, for activities that relay an answer somewhere else (Slack, Discord).

A reply activity polls the turn's Redis Stream from the start (it is cheap to read again after a
crash), keeps the answer's text as a client would assemble it (a `reset-step` drops what the
current step had shown), and learns when the turn ended or paused. Where the answer's final text
matters, read it from Postgres once the turn has ended: the stored message is the answer.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Literal

from storage.streams import FROM_STREAM_START, TurnStreams

Ending = Literal["finish", "abort", "error", "paused"]
POLL_SECONDS = 0.25
READ_BATCH = 500


@dataclass
class TurnText:
    """The answer's text so far, step by step, and how the stream ended (None while it runs)."""

    steps: list[str] = field(default_factory=lambda: [""])
    ended: Ending | None = None
    error: str | None = None
    # A tool the answer is using right now, for a status line ("searching the web for ...").
    status: str | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(step.strip() for step in self.steps if step.strip())

    def apply(self, chunk: dict[str, object]) -> None:
        kind = chunk.get("type")
        if kind == "text-delta":
            self.steps[-1] += str(chunk.get("delta", ""))
            self.status = None
        elif kind == "start-step":
            if self.steps[-1]:
                self.steps.append("")
        elif kind == "reset-step":
            self.steps[-1] = ""
        elif kind == "data-status":
            data = chunk.get("data")
            self.status = str(data.get("text")) if isinstance(data, dict) else None
        elif kind == "start" and self.ended == "paused":
            self.ended = None  # the client answered the pause: the turn goes on
        elif kind == "finish":
            metadata = chunk.get("messageMetadata")
            paused = isinstance(metadata, dict) and "awaiting" in metadata
            self.ended = "paused" if paused else (self.ended or "finish")
        elif kind == "abort":
            self.ended = "abort"
        elif kind == "error":
            self.ended = "error"
            self.error = str(chunk.get("errorText", ""))


class TurnFollower:
    """Reads one turn's stream as it grows."""

    def __init__(self, streams: TurnStreams, organization_id: str, turn_id: str) -> None:
        self._streams = streams
        self._organization_id = organization_id
        self._turn_id = turn_id
        self._cursor = FROM_STREAM_START
        self.progress = TurnText()

    async def advance(self, wait_seconds: float = POLL_SECONDS) -> bool:
        """Read what the stream gained; waits up to `wait_seconds` when it gained nothing.
        True when anything new arrived."""
        entries = await self._streams.read_range(
            self._organization_id, self._turn_id, self._cursor, count=READ_BATCH
        )
        if not entries:
            await asyncio.sleep(wait_seconds)
            return False
        for entry in entries:
            self._cursor = entry.entry_id
            self.progress.apply(json.loads(entry.chunk_json))
        return True

    @property
    def finished(self) -> bool:
        """The turn ended (not merely paused for an approval)."""
        return self.progress.ended in ("finish", "abort", "error")
