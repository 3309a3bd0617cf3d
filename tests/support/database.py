"""Helpers for tests that race two transactions against each other in the real Postgres."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


async def until_a_backend_waits_for_a_lock(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Return once some transaction is blocked on a row or index lock: the racing one has reached
    the point where it must wait for the transaction the test holds open."""
    async with asyncio.timeout(10):
        while True:
            async with sessions() as session:
                waiting = await session.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                )
            if waiting:
                return
            await asyncio.sleep(0.02)
