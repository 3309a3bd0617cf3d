"""Turns whose workflow ended without finishing them: found when they stand in the way of a claim,
a stop or a chat change, or by the periodic sweep (`storage.lost_turn_sweep`), and released. Must
never import api, workflows or activities.

A turn's workflow always stores its outcome before it ends, so a turn row still `running` whose
workflow has no open run was ended from outside: an operator terminated it, or it timed out.
Nothing will ever release its chat. Releasing it fails the turn (its saved answer stays), ends its
stream so readers stop waiting, and wakes the chat's next queued turn.
"""

from __future__ import annotations

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from core.contracts import CHAT_RELEASED_SIGNAL, ChatReleased, TurnStatus, turn_workflow_id
from core.ui_chunks import streamed_parts, unrun_turn_chunks
from storage import chats
from storage.models import Turn
from storage.streams import TurnStreams

log = structlog.get_logger(__name__)


class LostTurns:
    def __init__(self, temporal: Client, streams: TurnStreams) -> None:
        self._temporal = temporal
        self._streams = streams

    async def release_if_lost(
        self, session: AsyncSession, organization_id: str, turn_id: str
    ) -> bool:
        """Release `turn_id` if it is marked running but its workflow has no open run.

        The database changes are made in `session`, for the caller to commit; the stream's end and
        the wake-up are sent at once (both are harmless if the caller then rolls back: the turn is
        found again next time, and its stream is only ever ended once). True if it was released.
        """
        turn = (
            await session.execute(
                select(Turn).where(
                    Turn.id == turn_id,
                    Turn.organization_id == organization_id,
                    Turn.status == TurnStatus.RUNNING,
                )
            )
        ).scalar_one_or_none()
        if turn is None:
            return False
        ending = await self._how_workflow_ended(turn.workflow_id)
        if ending is None:
            return False
        reason = f"the turn's workflow was {ending} before the turn finished"
        streamed = streamed_parts(await self._streams.all_chunks(organization_id, turn_id))
        next_turn_id = await chats.end_lost_turn(
            session, organization_id, turn_id, reason, streamed
        )
        log.warning(
            "turn.lost_released",
            organization_id=organization_id,
            turn_id=turn_id,
            workflow_id=turn.workflow_id,
            run_id=turn.run_id,
            ending=ending,
        )
        await self._streams.append_terminal(
            organization_id, turn_id, unrun_turn_chunks(aborted=False, reason=reason)
        )
        if next_turn_id is not None:
            await self._wake(next_turn_id, turn_id)
        return True

    async def _how_workflow_ended(self, workflow_id: str) -> str | None:
        """None while the workflow's latest run is open (or its state is unknown); otherwise how it
        ended. The latest run, not the turn's recorded one: an operator's reset closes that run as
        terminated and carries the turn on in a new run, which must not lose its chat."""
        handle = self._temporal.get_workflow_handle(workflow_id)
        try:
            description = await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return "removed"  # closed so long ago that Temporal no longer keeps it
            # No traceback: while Temporal is down, every claim and every sweep logs this.
            log.warning(
                "turn.liveness_unknown",
                workflow_id=workflow_id,
                status=err.status.name,
                error=err.message[:300],
            )
            return None
        status = description.status
        if status is None or status == WorkflowExecutionStatus.RUNNING:
            return None
        return status.name.lower().replace("_", " ")

    async def _wake(self, turn_id: str, released_by_turn_id: str) -> None:
        handle = self._temporal.get_workflow_handle(turn_workflow_id(turn_id))
        try:
            await handle.signal(CHAT_RELEASED_SIGNAL, ChatReleased(released_by_turn_id))
        except RPCError as err:
            # It ended meanwhile, or it finds the chat free at its next periodic look.
            log.info("turn.wake_not_delivered", turn_id=turn_id, status=err.status)
