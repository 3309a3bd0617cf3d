"""The periodic sweep that releases lost turns nothing else would notice: a chat nobody touches keeps a
terminated turn's streams open until it runs. Runs in every worker; never imports api, workflows or activities.

Each sweep finds the running turns that hold a chat and are older than half the release bound, and
asks `LostTurns` to release each one whose workflow has no open run. Several workers may sweep at
once: each chat is taken with `FOR UPDATE SKIP LOCKED` (the order every claim locks in: chat, then
turn), so a chat another sweep or a claim is at is skipped, and a release happens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.contracts import TurnStatus
from storage.lost_turns import LostTurns
from storage.models import Chat, Turn

log = structlog.get_logger(__name__)

# Turns examined per sweep, oldest first; more wait for the next sweep.
SWEEP_BATCH = 100


class LostTurnSweep:
    """Releases lost turns within about `release_within_seconds` of their workflow's end.

    A sweep every half of it, over turns older than half of it: a turn ended at any age is released
    by the first sweep after it is both ended and old enough, so within the bound, while the turns
    that finish within seconds (nearly all of them) are never asked about.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        lost_turns: LostTurns,
        *,
        release_within_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._lost_turns = lost_turns
        self._interval_seconds = release_within_seconds / 2
        self._min_age = timedelta(seconds=release_within_seconds / 2)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Sweep in the background while the block runs."""
        task = asyncio.create_task(self._run(), name="lost-turn-sweep")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sweep_once(self) -> int:
        """Release the lost turns among the candidates; returns how many were released."""
        async with self._sessions() as session:
            candidates = await self._candidates(session)
        released = 0
        for organization_id, chat_id, turn_id in candidates:
            async with self._sessions.begin() as session:
                if not await self._lock_chat_held_by(session, organization_id, chat_id, turn_id):
                    continue
                if await self._lost_turns.release_if_lost(session, organization_id, turn_id):
                    released += 1
        if released:
            log.info("turn.sweep_released", released=released, examined=len(candidates))
        return released

    async def _run(self) -> None:
        # Workers started together would otherwise sweep in step.
        await asyncio.sleep(random.uniform(0, self._interval_seconds))
        while True:
            try:
                await self.sweep_once()
            except Exception as error:
                # Postgres or Temporal unreachable: the next sweep tries again. One line, no
                # traceback: an outage would log one every sweep.
                log.warning("turn.sweep_failed", error=f"{type(error).__name__}: {error}"[:300])
            await asyncio.sleep(self._interval_seconds)

    async def _candidates(self, session: AsyncSession) -> list[tuple[str, str, str]]:
        """(organization, chat, turn) of the running turns holding a chat, older than the minimum age.

        Driven from the chat's lease: a running turn always holds its chat (the claim takes both in
        one transaction), and chats are far fewer than turns.
        """
        rows = await session.execute(
            select(Chat.organization_id, Chat.id, Turn.id)
            .join(
                Turn,
                (Turn.organization_id == Chat.organization_id) & (Turn.id == Chat.active_turn_id),
            )
            .where(
                Chat.active_turn_id.is_not(None),
                Turn.status == TurnStatus.RUNNING,
                Turn.created_at < func.now() - self._min_age,
            )
            .order_by(Turn.created_at)
            .limit(SWEEP_BATCH)
        )
        return [(organization_id, chat_id, turn_id) for organization_id, chat_id, turn_id in rows]

    async def _lock_chat_held_by(
        self, session: AsyncSession, organization_id: str, chat_id: str, turn_id: str
    ) -> bool:
        """Lock the chat if `turn_id` still holds it and nobody else has it locked."""
        locked = await session.scalar(
            select(Chat.id)
            .where(
                Chat.organization_id == organization_id,
                Chat.id == chat_id,
                Chat.active_turn_id == turn_id,
            )
            .with_for_update(skip_locked=True)
        )
        return locked is not None
