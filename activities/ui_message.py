"""Turns provider events into AI SDK UI message stream chunks, and builds the stored parts the same way a client does.

The parts kept here follow the `ai` client's own assembly (`step-start`, then `reasoning` and `text`
parts in arrival order, each ending in state `done`), so what a client assembled from the stream
equals what Postgres holds for the message.
"""

from __future__ import annotations

from typing import Any

from providers.base import Finish, ProviderEvent, ReasoningDelta, TextDelta, Usage

Chunk = dict[str, Any]


class UiMessageBuilder:
    def __init__(self, attempt: int) -> None:
        # Part ids carry the attempt so a retried attempt never reuses ids of the parts it replaced.
        self._attempt = attempt
        # The step was opened with the stream (see ChatSessionActivities.store_user_message).
        self._parts: list[dict[str, Any]] = [{"type": "step-start"}]
        self._open: tuple[str, str] | None = (
            None  # (kind, id) of the text/reasoning part being streamed
        )
        self._counter = 0
        self.finish_reason = "stop"
        # Providers report usage once, at the end of a stream; a stopped stream may end without it.
        self.reported_usage: Usage | None = None
        self.produced_output = False

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self._parts

    def on_event(self, event: ProviderEvent) -> list[Chunk]:
        if isinstance(event, TextDelta):
            return self._delta("text", event.text)
        if isinstance(event, ReasoningDelta):
            return self._delta("reasoning", event.text)
        if isinstance(event, Usage):
            self.reported_usage = event
            return []
        if isinstance(event, Finish):
            self.finish_reason = event.reason
            return []
        raise TypeError(f"unknown provider event {event!r}")

    def streamed_chars(self) -> int:
        """How much text and reasoning the answer holds so far, in characters."""
        return sum(len(part.get("text", "")) for part in self._parts)

    def finish_step(self) -> list[Chunk]:
        return [*self._close_open_part(), {"type": "finish-step"}]

    def _delta(self, kind: str, text: str) -> list[Chunk]:
        if not text:
            return []
        self.produced_output = True
        chunks: list[Chunk] = []
        if self._open is None or self._open[0] != kind:
            chunks.extend(self._close_open_part())
            part_id = f"{kind[0]}{self._attempt}-{self._counter}"
            self._counter += 1
            self._open = (kind, part_id)
            self._parts.append({"type": kind, "text": "", "state": "streaming"})
            chunks.append({"type": f"{kind}-start", "id": part_id})
        self._parts[-1]["text"] += text
        chunks.append({"type": f"{kind}-delta", "id": self._open[1], "delta": text})
        return chunks

    def _close_open_part(self) -> list[Chunk]:
        if self._open is None:
            return []
        kind, part_id = self._open
        self._open = None
        self._parts[-1]["state"] = "done"
        return [{"type": f"{kind}-end", "id": part_id}]
