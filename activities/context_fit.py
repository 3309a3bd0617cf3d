"""Fitting a prompt into a model's context window: the oldest history goes first. Never imports temporalio.

Token counts are estimated (about four characters a token, plus a fixed cost per message and per
input), so nothing is downloaded at run time; the estimate errs high, so a trimmed prompt fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from providers.base import InputKind, PromptMessage, estimated_tokens

# Role markers and separators every message costs, whatever its text.
TOKENS_PER_MESSAGE: Final = 8
# What an image or a PDF page costs most providers, roughly; documents count as a few pages.
TOKENS_PER_INPUT: Final = {InputKind.IMAGE: 1_600, InputKind.DOCUMENT: 8_000}


def estimate_tokens(message: PromptMessage) -> int:
    tool_chars = sum(len(result.output) for result in message.tool_results) + sum(
        len(str(call.input)) + len(call.name) for call in message.tool_calls
    )
    return (
        estimated_tokens(len(message.content) + tool_chars)
        + TOKENS_PER_MESSAGE * (1 + len(message.tool_calls) + len(message.tool_results))
        + sum(TOKENS_PER_INPUT[item.kind] for item in message.inputs)
    )


@dataclass(frozen=True)
class FittedPrompt:
    messages: list[PromptMessage]
    left_out: int  # history messages dropped
    estimated_tokens: int


def fit_prompt(
    messages: list[PromptMessage], budget_tokens: int, *, keep_last: int = 1
) -> FittedPrompt:
    """`messages` without their oldest history until the estimate is within `budget_tokens`.

    System messages (instructions, mood, the request's system text) and the newest `keep_last`
    messages (the one being answered, and the steps of this turn so far) always stay. History is
    dropped from the oldest, and an assistant or tool message left at the front goes too, since
    providers expect the conversation to open with the user.
    """
    system = [message for message in messages if message.role == "system"]
    history = [message for message in messages if message.role != "system"]
    total = sum(estimate_tokens(message) for message in messages)
    dropped = 0
    while len(history) > keep_last and (
        total > budget_tokens or history[0].role in ("assistant", "tool")
    ):
        if total <= budget_tokens and dropped == 0:
            break  # an untrimmed history may open with the assistant; leave it as it was
        total -= estimate_tokens(history.pop(0))
        dropped += 1
    return FittedPrompt([*system, *history], dropped, total)
