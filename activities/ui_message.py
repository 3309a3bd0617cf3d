"""Turns provider events into AI SDK UI message stream chunks, and builds the stored parts the same way a client does.

The parts kept here follow the `ai` client's own assembly (`step-start`, then `reasoning`, `text`
and tool parts in arrival order, text and reasoning ending in state `done`), so what a client
assembled from the stream equals what Postgres holds for the message. A step after the first
continues the parts the steps before it stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from core.contracts import ToolCallDescriptor, ToolRunner
from providers.base import (
    Finish,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolDefinition,
    Usage,
)

Chunk = dict[str, Any]


@dataclass(frozen=True)
class OfferedTool:
    """A tool the model may call this turn, and how its calls are handled."""

    definition: ToolDefinition
    runner: ToolRunner
    needs_approval: bool = False
    # Toolkit (MCP) tools appear as `dynamic-tool` parts: clients know them only by name.
    dynamic: bool = False


class UiMessageBuilder:
    def __init__(
        self,
        attempt: int,
        *,
        earlier_parts: list[dict[str, Any]] | None = None,
        tools: Mapping[str, OfferedTool] | None = None,
    ) -> None:
        # Part ids carry the attempt so a retried attempt never reuses ids of the parts it replaced.
        self._attempt = attempt
        # The first step was opened with the stream (see ChatSessionActivities.store_user_message);
        # a later one continues the parts of the steps before it, and opens with its own.
        self._parts: list[dict[str, Any]] = (
            [*earlier_parts, {"type": "step-start"}] if earlier_parts else [{"type": "step-start"}]
        )
        self._tools: Mapping[str, OfferedTool] = tools or {}
        self._tool_parts: dict[str, dict[str, Any]] = {}
        # The calls of this step that are to run, in the order the model made them.
        self.tool_calls: list[ToolCallDescriptor] = []
        # Whether the model called any tool this step, runnable or not (a call whose input was
        # refused holds its error, which the model reads in the next step).
        self.called_tools = False
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
        if isinstance(event, ToolCallStart):
            return self._tool_call_start(event)
        if isinstance(event, ToolCallDelta):
            if event.call_id not in self._tool_parts:
                return []  # a delta without its start: the provider broke its own order
            return [
                {
                    "type": "tool-input-delta",
                    "toolCallId": event.call_id,
                    "inputTextDelta": event.input_text,
                }
            ]
        if isinstance(event, ToolCall):
            return self._tool_call(event)
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

    def add_sources(self, sources: list[dict[str, str | None]]) -> list[Chunk]:
        """`source-url` parts for pages the step before cited (web search results, fetched pages)."""
        chunks: list[Chunk] = []
        for index, source in enumerate(sources):
            chunk: Chunk = {
                "type": "source-url",
                "sourceId": f"src{self._attempt}-{index}",
                "url": source["url"],
            }
            if source.get("title"):
                chunk["title"] = source["title"]
            self._parts.append(dict(chunk))
            chunks.append(chunk)
        return chunks

    def refuse_tool_calls(self, error_text: str) -> list[Chunk]:
        """End this step's runnable calls with an error instead of running them (the step bound)."""
        chunks: list[Chunk] = []
        for call in self.tool_calls:
            part = self._tool_parts[call.call_id]
            part["state"] = "output-error"
            part["errorText"] = error_text
            chunks.append(
                {"type": "tool-output-error", "toolCallId": call.call_id, "errorText": error_text}
            )
        self.tool_calls = []
        return chunks

    def _tool_call_start(self, event: ToolCallStart) -> list[Chunk]:
        chunks = self._close_open_part()
        offered = self._tools.get(event.name)
        dynamic = offered is None or offered.dynamic
        part: dict[str, Any] = (
            {"type": "dynamic-tool", "toolName": event.name}
            if dynamic
            else {"type": f"tool-{event.name}"}
        )
        part.update(toolCallId=event.call_id, state="input-streaming")
        self._parts.append(part)
        self._tool_parts[event.call_id] = part
        self.produced_output = True
        start: Chunk = {
            "type": "tool-input-start",
            "toolCallId": event.call_id,
            "toolName": event.name,
        }
        if dynamic:
            start["dynamic"] = True
        return [*chunks, start]

    def _tool_call(self, event: ToolCall) -> list[Chunk]:
        self.called_tools = True
        chunks: list[Chunk] = []
        if event.call_id not in self._tool_parts:
            chunks = self._tool_call_start(ToolCallStart(event.call_id, event.name))
        part = self._tool_parts[event.call_id]
        offered = self._tools.get(event.name)
        error = _input_error(event, offered)
        dynamic = part["type"] == "dynamic-tool"
        base: Chunk = {"toolCallId": event.call_id, "toolName": event.name}
        if dynamic:
            base["dynamic"] = True
        if error is not None:
            shown_input: Any = event.input if event.input is not None else event.input_text
            part.update(state="output-error", input=shown_input, errorText=error)
            return [
                *chunks,
                {"type": "tool-input-error", **base, "input": shown_input, "errorText": error},
            ]
        assert offered is not None  # _input_error refuses calls of tools not offered
        part.update(state="input-available", input=event.input)
        self.tool_calls.append(
            ToolCallDescriptor(
                call_id=event.call_id,
                name=event.name,
                runner=offered.runner,
                needs_approval=offered.needs_approval,
            )
        )
        return [*chunks, {"type": "tool-input-available", **base, "input": event.input}]

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


def _input_error(call: ToolCall, offered: OfferedTool | None) -> str | None:
    """Why a call cannot run as the model made it, or None: the model reads the reason next step."""
    if offered is None:
        return f"there is no tool named {call.name!r}"
    if call.input is None:
        return "the tool input is not a JSON object"
    try:
        jsonschema.validate(call.input, offered.definition.input_schema)
    except jsonschema.ValidationError as exc:
        return f"the tool input does not match its schema: {exc.message}"
    except jsonschema.SchemaError:
        return None  # the tool's own schema is broken: let the tool judge its input
    return None
