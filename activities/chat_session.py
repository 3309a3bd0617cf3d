"""Chat session activities: claim the chat, store the user message, persist the answer and end the stream."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import (
    ClaimSessionResult,
    DropQueuedTurnInput,
    MessageStatus,
    PersistAssistantMessageInput,
    StoreUserMessageInput,
    TurnInput,
    TurnStatus,
)
from core.errors import ErrorType
from core.ui_chunks import opening_chunks, unrun_turn_chunks, usage_metadata
from storage import budgets, chats, turn_usage
from storage.lost_turns import LostTurns
from storage.streams import TurnStreams
from storage.turn_usage import TurnTotals, usd_text


class ChatSessionActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        streams: TurnStreams,
        lost_turns: LostTurns,
    ) -> None:
        self._sessions = session_factory
        self._streams = streams
        self._lost_turns = lost_turns

    @activity.defn
    async def claim_session(self, turn: TurnInput) -> ClaimSessionResult:
        try:
            info = activity.info()
            # Turn activities only ever run inside their turn's workflow.
            assert info.workflow_id is not None
            assert info.workflow_run_id is not None
            run = chats.TurnRun(info.workflow_id, info.workflow_run_id)
            claim: ClaimSessionResult | chats.ChatBusy
            try:
                claim = await self._claim(turn, run)
                holder = claim.holder_turn_id
            except chats.ChatBusy as busy:
                claim, holder = busy, busy.active_turn_id
            # A holder whose workflow ended without finishing it would keep the chat forever.
            if holder is not None and await self._release_if_lost(turn.organization_id, holder):
                return await self._claim(turn, run)
            if isinstance(claim, chats.ChatBusy):
                raise claim
            return claim
        except chats.ChatNotFound as exc:
            raise ApplicationError(
                "chat not found", type=ErrorType.CHAT_NOT_FOUND, non_retryable=True
            ) from exc
        except chats.MessageNotFound as exc:
            raise ApplicationError(
                "message not found", type=ErrorType.MESSAGE_NOT_FOUND, non_retryable=True
            ) from exc
        except chats.ChatBusy as exc:
            raise ApplicationError(
                "the chat has an active turn",
                exc.active_turn_id,
                exc.chat_id,
                type=ErrorType.CHAT_BUSY,
                non_retryable=True,
            ) from exc

    async def _claim(self, turn: TurnInput, run: chats.TurnRun) -> ClaimSessionResult:
        async with self._sessions.begin() as session:
            return await chats.claim_session(session, turn, run)

    async def _release_if_lost(self, organization_id: str, turn_id: str) -> bool:
        async with self._sessions.begin() as session:
            return await self._lost_turns.release_if_lost(session, organization_id, turn_id)

    @activity.defn
    async def store_user_message(self, request: StoreUserMessageInput) -> None:
        turn = request.turn
        async with self._sessions.begin() as session:
            await chats.store_turn_start(session, request)
        # The stream opens as soon as the turn is accepted, so a client sees it before the provider
        # answers. The one step every generation attempt writes into opens here too: a retried
        # attempt's `reset-step` then clears only that step's parts, never the step itself.
        await self._streams.publish_opening(
            turn.organization_id,
            turn.turn_id,
            opening_chunks(
                turn.assistant_message_id,
                request.chat_id,
                turn.turn_id,
                turn.model,
                turn.model_choice,
            ),
        )

    @activity.defn
    async def persist_assistant_message(self, outcome: PersistAssistantMessageInput) -> str | None:
        """Store the final state first, then publish the terminal chunk: a client that sees the end can read it back.

        Returns the chat's queued turn that may run now, for the workflow to wake.
        """
        async with self._sessions.begin() as session:
            message = await chats.get_message(
                session, outcome.organization_id, outcome.assistant_message_id
            )
            totals = await turn_usage.turn_totals(session, outcome.organization_id, outcome.turn_id)
            # What generation stored with the message (the usage of a cancelled attempt) stays
            # unless the outcome says otherwise; the attempt log, when there is one, says it all.
            metadata = {
                **(message.message_metadata if message else {}),
                **finish_metadata(outcome, totals),
            }
            next_turn_id = await chats.finish_turn(session, outcome, metadata, totals)
            await budgets.settle(
                session,
                organization_id=outcome.organization_id,
                turn_id=outcome.turn_id,
                user_id=outcome.user_id,
                chat_id=outcome.chat_id,
                model=outcome.model,
                tokens=totals.tokens,
                cost_usd=totals.cost_usd,
            )
        abort_streamed = (
            outcome.status is MessageStatus.ABORTED
            and await self._streams.abort_streamed(outcome.organization_id, outcome.turn_id)
        )
        await self._streams.append_terminal(
            outcome.organization_id,
            outcome.turn_id,
            terminal_chunks(outcome, metadata, abort_streamed=abort_streamed),
        )
        return next_turn_id

    @activity.defn
    async def drop_queued_turn(self, request: DropQueuedTurnInput) -> str | None:
        """End a queued turn that will never run and end its stream; returns the queued turn that may
        run now, if the chat is free (this one may have been first in line)."""
        async with self._sessions.begin() as session:
            await chats.drop_queued_turn(
                session, request.organization_id, request.turn_id, request.status, request.reason
            )
            next_turn_id = await chats.next_queued_turn(
                session, request.organization_id, request.chat_id
            )
        await self._streams.append_terminal(
            request.organization_id,
            request.turn_id,
            unrun_turn_chunks(request.status is TurnStatus.ABORTED, request.reason),
        )
        return next_turn_id


def finish_metadata(
    outcome: PersistAssistantMessageInput, totals: TurnTotals | None = None
) -> dict[str, Any]:
    """The assistant message's final metadata: why it ended, what it used and cost (summed over
    every attempt the provider billed, `cost` in exact decimal USD), how long it took."""
    metadata: dict[str, Any] = {"finishReason": outcome.finish_reason or "other"}
    if outcome.model:
        metadata["model"] = outcome.model
    if totals is not None and totals.attempts:
        metadata["usage"] = totals.tokens.as_metadata(estimated=totals.estimated)
    elif outcome.input_tokens is not None and outcome.output_tokens is not None:
        metadata["usage"] = usage_metadata(
            outcome.input_tokens, outcome.output_tokens, estimated=outcome.usage_estimated
        )
    if totals is not None:
        metadata["cost"] = usd_text(totals.cost_usd)
    if outcome.messages_left_out:
        metadata["messagesLeftOut"] = outcome.messages_left_out
    if outcome.steps is not None and outcome.steps > 1:
        metadata["steps"] = outcome.steps
    if outcome.step_limit_reached:
        metadata["stepLimitReached"] = True
    if outcome.ttft_ms is not None:
        metadata["ttftMs"] = outcome.ttft_ms
    if outcome.duration_ms is not None:
        metadata["durationMs"] = outcome.duration_ms
    if outcome.error is not None:
        metadata["error"] = outcome.error
    return metadata


def terminal_chunks(
    outcome: PersistAssistantMessageInput, metadata: dict[str, Any], *, abort_streamed: bool = False
) -> list[dict[str, Any]]:
    if outcome.status is MessageStatus.FAILED:
        return [{"type": "error", "errorText": outcome.error or "generation failed"}]
    finish = {
        "type": "finish",
        "finishReason": metadata["finishReason"],
        "messageMetadata": metadata,
    }
    if outcome.status is MessageStatus.ABORTED and not abort_streamed:
        return [{"type": "abort"}, finish]
    return [finish]
