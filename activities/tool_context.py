"""How an assistant message's steps read back to a model: text, tool calls, and their results cut to a budget.

A stored assistant message is a run of steps (`step-start` parts). Each step becomes an assistant
prompt message with its text and tool calls, then a `tool` message with the calls' results, so the
next step (or the next turn) sees what the tools gave. Outputs are stored whole; only
`context_text` of them enters the prompt.
"""

from __future__ import annotations

from typing import Any

from agent_tools.base import context_text
from providers.base import PromptMessage, PromptToolCall, PromptToolResult
from storage.tool_calls import is_tool_part, tool_name_of

DENIED_TEXT = "The user denied this tool call. Do not call it again; answer without it."
NOT_RUN_TEXT = "This tool call was not run."


def steps_of(parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The message's parts split into steps (each without its `step-start`)."""
    steps: list[list[dict[str, Any]]] = []
    for part in parts:
        if part.get("type") == "step-start" or not steps:
            steps.append([])
        if part.get("type") != "step-start":
            steps[-1].append(part)
    return steps


def parts_before_step(parts: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The parts the steps before `step` (1-based) left: what a retried step starts again from."""
    seen = 0
    for index, part in enumerate(parts):
        if part.get("type") == "step-start":
            seen += 1
            if seen == step:
                return parts[:index]
    return list(parts)


def assistant_messages(parts: list[dict[str, Any]], output_chars: int) -> list[PromptMessage]:
    """An assistant message as the prompt messages a model reads back."""
    messages: list[PromptMessage] = []
    for step in steps_of(parts):
        text = "".join(str(part.get("text", "")) for part in step if part.get("type") == "text")
        calls: list[PromptToolCall] = []
        results: list[PromptToolResult] = []
        for part in step:
            if not is_tool_part(part) or not isinstance(part.get("input"), dict):
                continue
            call_id, name = str(part["toolCallId"]), tool_name_of(part)
            calls.append(PromptToolCall(call_id, name, part["input"]))
            results.append(_result_of(part, call_id, name, output_chars))
        if text or calls:
            messages.append(PromptMessage(role="assistant", content=text, tool_calls=tuple(calls)))
        if results:
            messages.append(PromptMessage(role="tool", content="", tool_results=tuple(results)))
    return messages


def _result_of(
    part: dict[str, Any], call_id: str, name: str, output_chars: int
) -> PromptToolResult:
    state = part.get("state")
    if state == "output-available":
        return PromptToolResult(call_id, name, context_text(part.get("output"), output_chars))
    if state == "output-error":
        return PromptToolResult(call_id, name, str(part.get("errorText", "")), is_error=True)
    if state == "output-denied":
        reason = (part.get("approval") or {}).get("reason")
        text = f"{DENIED_TEXT} Reason given: {reason}" if reason else DENIED_TEXT
        return PromptToolResult(call_id, name, text, is_error=True)
    return PromptToolResult(call_id, name, NOT_RUN_TEXT, is_error=True)
