"""What every tool durachat runs itself (web search and fetch, MCP toolkit tools) gives back. Never imports temporalio/fastapi/sqlalchemy/redis.

A tool's output is stored whole in the assistant message's tool part (and shown to clients as
`output`); only a bounded text copy of it enters the model's context (`context_text`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# Tells the client (and only the client: it is never stored as content) what a running tool is
# doing: "searching the web for ...", "reading example.com".
StatusReporter = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class SourceLink:
    """A page an answer may cite: becomes a `source-url` part of the message."""

    url: str
    title: str | None = None


@dataclass(frozen=True)
class ToolOutcome:
    """A tool call that ran: `output` is JSON-serialisable and stored in full."""

    output: Any
    sources: list[SourceLink] = field(default_factory=list)


class ToolFailed(Exception):
    """A tool call that did not produce an output; `message` is safe to show users and models.

    `retryable`: trouble that may pass (a timeout, a 5xx, a connection error), so the call is tried
    again; otherwise the failure is final and the model reads it as the call's error.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def context_text(output: Any, limit: int) -> str:
    """A tool output as the model reads it: text as it is, anything else as JSON, cut to `limit`
    characters with a note saying how much was left out."""
    text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[… {len(text) - limit} more characters not shown]"
