"""AI SDK UI message stream chunks that more than one layer builds: the opening of a turn's stream,
and a stored message replayed as chunks when its Redis stream is gone. Pure data, no I/O."""

from __future__ import annotations

from typing import Any

Chunk = dict[str, Any]


def start_metadata(
    chat_id: str, turn_id: str, model: str, model_choice: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The assistant message metadata announced by the stream's `start` chunk: with how the model
    was chosen when the turn's input says (`requested` and `reason`)."""
    metadata: dict[str, Any] = {"chatId": chat_id, "turnId": turn_id, "model": model}
    if model_choice:
        metadata["modelChoice"] = {
            "requested": model_choice.get("requested"),
            "reason": model_choice.get("reason"),
        }
    return metadata


def usage_metadata(input_tokens: int, output_tokens: int, *, estimated: bool) -> dict[str, Any]:
    """A turn's `usage` in message metadata; `estimated` only when the provider reported none."""
    usage: dict[str, Any] = {
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + output_tokens,
    }
    if estimated:
        usage["estimated"] = True
    return usage


def opening_chunks(
    assistant_message_id: str,
    chat_id: str,
    turn_id: str,
    model: str,
    model_choice: dict[str, Any] | None = None,
) -> tuple[Chunk, Chunk]:
    """`start` and the `start-step` every generation attempt of the turn streams into."""
    return (
        {
            "type": "start",
            "messageId": assistant_message_id,
            "messageMetadata": start_metadata(chat_id, turn_id, model, model_choice),
        },
        {"type": "start-step"},
    )


def stored_message_chunks(
    message_id: str,
    parts: list[dict[str, Any]],
    metadata: dict[str, Any],
    status: str,
    *,
    resuming: bool,
) -> list[Chunk]:
    """A finished message as a stream. `resuming`: the client already has the start and part of the
    message, so a `reset-step` replaces what it has of the step instead of a second `start`."""
    chunks: list[Chunk] = (
        [{"type": "reset-step"}]
        if resuming
        else [
            {"type": "start", "messageId": message_id, "messageMetadata": metadata},
            {"type": "start-step"},
        ]
    )
    for index, part in enumerate(parts):
        kind = part.get("type")
        if kind == "step-start" and index > 0:
            chunks += [{"type": "finish-step"}, {"type": "start-step"}]
        elif kind == "source-url":
            chunks.append(dict(part))
        elif kind == "dynamic-tool" or str(kind).startswith("tool-"):
            chunks += tool_part_chunks(part)
        elif kind in ("text", "reasoning"):
            part_id = f"stored-{index}"
            chunks += [
                {"type": f"{kind}-start", "id": part_id},
                {"type": f"{kind}-delta", "id": part_id, "delta": part.get("text", "")},
                {"type": f"{kind}-end", "id": part_id},
            ]
    chunks.append({"type": "finish-step"})
    if status == "failed":
        chunks.append(
            {"type": "error", "errorText": str(metadata.get("error", "generation failed"))}
        )
        return chunks
    finish = {
        "type": "finish",
        "finishReason": metadata.get("finishReason", "other"),
        "messageMetadata": metadata,
    }
    return [*chunks, {"type": "abort"}, finish] if status == "aborted" else [*chunks, finish]


def tool_part_chunks(part: dict[str, Any]) -> list[Chunk]:
    """A stored tool part as the chunks that build it: its input, approval and outcome."""
    dynamic = part["type"] == "dynamic-tool"
    name = part.get("toolName") if dynamic else str(part["type"]).removeprefix("tool-")
    base: Chunk = {"toolCallId": part["toolCallId"], "toolName": name}
    if dynamic:
        base["dynamic"] = True
    state = part.get("state")
    chunks: list[Chunk] = [{"type": "tool-input-start", **base}]
    if state == "output-error" and not isinstance(part.get("input"), dict):
        return [
            *chunks,
            {
                "type": "tool-input-error",
                **base,
                "input": part.get("input"),
                "errorText": part.get("errorText", ""),
            },
        ]
    chunks.append({"type": "tool-input-available", **base, "input": part.get("input")})
    approval = part.get("approval")
    if isinstance(approval, dict):
        chunks.append(
            {
                "type": "tool-approval-request",
                "approvalId": approval["id"],
                "toolCallId": part["toolCallId"],
            }
        )
        if "approved" in approval:
            response: Chunk = {
                "type": "tool-approval-response",
                "approvalId": approval["id"],
                "approved": approval["approved"],
            }
            if approval.get("reason"):
                response["reason"] = approval["reason"]
            chunks.append(response)
    if state == "output-available":
        chunks.append(
            {
                "type": "tool-output-available",
                "toolCallId": part["toolCallId"],
                "output": part.get("output"),
            }
        )
    elif state == "output-error":
        chunks.append(
            {
                "type": "tool-output-error",
                "toolCallId": part["toolCallId"],
                "errorText": part.get("errorText", ""),
            }
        )
    elif state == "output-denied":
        chunks.append({"type": "tool-output-denied", "toolCallId": part["toolCallId"]})
    return chunks


def streamed_parts(chunks: list[Chunk]) -> list[dict[str, Any]]:
    """The parts a client holds after reading these chunks of a turn's stream, as it assembles them:
    what the last generation attempt (after the last `reset-step`) streamed, each part done."""
    parts: list[dict[str, Any]] = [{"type": "step-start"}]
    by_id: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        kind = chunk.get("type")
        if kind == "reset-step":
            parts, by_id = [{"type": "step-start"}], {}
        elif kind in ("text-start", "reasoning-start"):
            part = {"type": kind.removesuffix("-start"), "text": "", "state": "done"}
            parts.append(part)
            by_id[chunk["id"]] = part
        elif kind in ("text-delta", "reasoning-delta") and chunk.get("id") in by_id:
            by_id[chunk["id"]]["text"] += chunk.get("delta", "")
    return parts


def unrun_turn_chunks(aborted: bool, reason: str) -> list[dict[str, Any]]:
    """How the stream of a queued turn that never ran ends: it has no message, only its ending."""
    if aborted:
        return [{"type": "abort"}, {"type": "finish", "finishReason": "other"}]
    return [{"type": "error", "errorText": reason}]
