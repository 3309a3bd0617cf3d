"""Maintenance activities: purging the chats users deleted once their retention has passed, with
their files, and sweeping files uploaded but never sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from core.contracts import PurgeDeletedChatsInput
from storage.objects import ObjectStore
from storage.purge import Purger


class MaintenanceActivities:
    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], objects: ObjectStore
    ) -> None:
        self._sessions = session_factory
        self._objects = objects

    @activity.defn
    async def purge_deleted_chats(self, request: PurgeDeletedChatsInput) -> int:
        """Delete chats soft-deleted longer ago than the retention, with their messages, turns and
        files; then the files nobody sent within theirs. Returns the chats purged."""
        purger = Purger(self._sessions, self._objects, progress=activity.heartbeat)
        now = datetime.now(UTC)
        purged = await purger.purge_deleted_chats(
            now - timedelta(seconds=request.retention_seconds),
            organization_id=request.organization_id,
        )
        activity.logger.info("purged %d deleted chats", purged)
        if request.unattached_file_retention_seconds is not None:
            swept = await purger.sweep_unattached(
                now - timedelta(seconds=request.unattached_file_retention_seconds)
            )
            activity.logger.info("deleted %d files that were never sent", swept)
        return purged
