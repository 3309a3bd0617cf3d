"""Maintenance activities: purging the chats users deleted, once their retention has passed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.contracts import PurgeDeletedChatsInput
from storage import chats


class MaintenanceActivities:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = session_factory

    @activity.defn
    async def purge_deleted_chats(self, request: PurgeDeletedChatsInput) -> int:
        """Delete chats soft-deleted longer ago than the retention, with their messages and turns."""
        cutoff = datetime.now(UTC) - timedelta(seconds=request.retention_seconds)
        async with self._sessions.begin() as session:
            purged = await chats.purge_deleted_chats(
                session, cutoff, organization_id=request.organization_id
            )
        activity.logger.info("purged %d deleted chats", purged)
        return purged
