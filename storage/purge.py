"""Deleting for good: soft-deleted chats past their retention (rows and files), and files uploaded
but never sent. One place for it, used by the scheduled job and by `durachat chats purge`. Must never
import api, workflows or activities."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import attachments, chats
from storage.models import Attachment
from storage.objects import ObjectStore

# Attachments handled per step: one DeleteObjects call takes at most 1,000 keys.
ATTACHMENT_BATCH = 500


class Purger:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._objects = objects
        # Told how many attachments each step deleted (the activity heartbeats with it).
        self._progress = progress

    async def purge_deleted_chats(
        self, deleted_before: datetime | None, *, organization_id: str | None = None
    ) -> int:
        """Delete chats soft-deleted before `deleted_before` (None: all), their messages, turns and
        files included; returns how many chats.

        Objects go before their rows, batch by batch: a purge cut short leaves rows whose objects
        may be gone, and the next run deletes those again (a missing object counts as deleted).
        """
        while True:
            async with self._sessions() as session:
                batch = await attachments.of_purgeable_chats(
                    session, deleted_before, organization_id=organization_id, limit=ATTACHMENT_BATCH
                )
            if not batch:
                break
            await self.delete_attachments(batch)
        async with self._sessions.begin() as session:
            return await chats.purge_deleted_chats(
                session, deleted_before, organization_id=organization_id
            )

    async def sweep_unattached(self, created_before: datetime) -> int:
        """Delete files given before `created_before` that no message carries; returns how many."""
        swept = 0
        while True:
            async with self._sessions() as session:
                batch = await attachments.unattached_before(
                    session, created_before, limit=ATTACHMENT_BATCH
                )
            if not batch:
                return swept
            await self.delete_attachments(batch)
            swept += len(batch)

    async def delete_attachments(self, batch: list[Attachment]) -> None:
        """Delete these attachments' objects, then their rows."""
        by_organization: dict[str, list[Attachment]] = {}
        for attachment in batch:
            by_organization.setdefault(attachment.organization_id, []).append(attachment)
        for organization_id, owned in by_organization.items():
            await self._objects.delete_many(organization_id, attachments.object_names(owned))
        async with self._sessions.begin() as session:
            await attachments.delete_rows(session, batch)
        if self._progress is not None:
            self._progress(len(batch))
