"""Attachment rows: the files users give chats, one row per stored object. SQL lives here only; the
bytes live in the object store (storage.objects). Must never import api, workflows or activities.

A stored message refers to its files by id, in parts `{"type": "file", "attachmentId", "mediaType",
"filename"}`; reads render them with a signed URL. An edit may refer to the same attachment as the
message it replaces, so one attachment can belong to several messages of its chat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import cast, func, select, update
from sqlalchemy import delete as sa_delete
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

# Re-exported: the storage layer's callers find every attachment helper here.
from core.contracts import attachment_ids_in as attachment_ids_in
from storage.models import Attachment, Chat, Message

# Where a file's bytes are kept under its organization's prefix in the object store.
OBJECT_PREFIX = "attachments"


class AttachmentStatus(StrEnum):
    PENDING = "pending"  # a remote file not fetched yet, or an upload whose bytes are on the way
    STORED = "stored"
    FAILED = "failed"


def object_name_for(attachment_id: str) -> str:
    return f"{OBJECT_PREFIX}/{attachment_id}"


def variant_name_for(attachment_id: str) -> str:
    return f"{OBJECT_PREFIX}/{attachment_id}.model"


def file_part(attachment: Attachment) -> dict[str, Any]:
    """The stored message part that refers to `attachment`."""
    return {
        "type": "file",
        "attachmentId": attachment.id,
        "mediaType": attachment.media_type,
        "filename": attachment.filename,
    }


@dataclass(frozen=True)
class NewAttachment:
    id: str
    organization_id: str
    user_id: str | None
    chat_id: str | None
    filename: str
    media_type: str
    source_url: str | None = None


async def add_pending(session: AsyncSession, attachments: Sequence[NewAttachment]) -> None:
    """Record files about to be written (or fetched). A row that exists is left as it is: a repeated
    request, or a retried activity, names the same ids."""
    if not attachments:
        return
    await session.execute(
        insert(Attachment)
        .values(
            [
                {
                    "id": item.id,
                    "organization_id": item.organization_id,
                    "user_id": item.user_id,
                    "chat_id": item.chat_id,
                    "filename": item.filename,
                    "media_type": item.media_type,
                    "object_name": object_name_for(item.id),
                    "source_url": item.source_url,
                    "status": AttachmentStatus.PENDING,
                }
                for item in attachments
            ]
        )
        .on_conflict_do_nothing(index_elements=[Attachment.id])
    )


async def mark_stored(
    session: AsyncSession,
    organization_id: str,
    attachment_id: str,
    *,
    media_type: str,
    size: int,
    sha256: str,
) -> None:
    await session.execute(
        update(Attachment)
        .where(Attachment.id == attachment_id, Attachment.organization_id == organization_id)
        .values(
            status=AttachmentStatus.STORED,
            media_type=media_type,
            size=size,
            sha256=sha256,
            error=None,
            updated_at=func.now(),
        )
    )


async def set_variant(
    session: AsyncSession, organization_id: str, attachment_id: str, media_type: str
) -> None:
    """Record the model-ready copy of an image, stored under `variant_name_for(attachment_id)`."""
    await session.execute(
        update(Attachment)
        .where(Attachment.id == attachment_id, Attachment.organization_id == organization_id)
        .values(
            variant_name=variant_name_for(attachment_id),
            variant_media_type=media_type,
            updated_at=func.now(),
        )
    )


async def mark_failed(
    session: AsyncSession, organization_id: str, attachment_id: str, error: str
) -> None:
    await session.execute(
        update(Attachment)
        .where(Attachment.id == attachment_id, Attachment.organization_id == organization_id)
        .values(status=AttachmentStatus.FAILED, error=error, updated_at=func.now())
    )


async def get(session: AsyncSession, organization_id: str, attachment_id: str) -> Attachment | None:
    result = await session.execute(
        select(Attachment).where(
            Attachment.id == attachment_id, Attachment.organization_id == organization_id
        )
    )
    attachment: Attachment | None = result.scalar_one_or_none()
    return attachment


async def get_owner(session: AsyncSession, attachment_id: str) -> str | None:
    """The organization of a file, by its id alone (ids are unique across organizations): what a
    signed link is checked against."""
    result = await session.execute(
        select(Attachment.organization_id).where(Attachment.id == attachment_id)
    )
    organization_id: str | None = result.scalar_one_or_none()
    return organization_id


async def get_many(
    session: AsyncSession, organization_id: str, attachment_ids: Sequence[str]
) -> dict[str, Attachment]:
    if not attachment_ids:
        return {}
    result = await session.execute(
        select(Attachment).where(
            Attachment.organization_id == organization_id, Attachment.id.in_(attachment_ids)
        )
    )
    return {attachment.id: attachment for attachment in result.scalars()}


async def get_in_chat(session: AsyncSession, chat: Chat, attachment_id: str) -> Attachment | None:
    """A stored file of the chat (the caller's visibility of the chat was checked already)."""
    result = await session.execute(
        select(Attachment).where(
            Attachment.id == attachment_id,
            Attachment.organization_id == chat.organization_id,
            Attachment.chat_id == chat.id,
            Attachment.status == AttachmentStatus.STORED,
        )
    )
    attachment: Attachment | None = result.scalar_one_or_none()
    return attachment


class UnknownAttachments(Exception):
    """Ids that name no file the caller may use here: missing, another caller's, or another chat's."""

    def __init__(self, ids: list[str], reason: str) -> None:
        super().__init__(f"{reason}: {', '.join(ids)}")
        self.ids = ids
        self.reason = reason


async def usable_by(
    session: AsyncSession,
    organization_id: str,
    user_id: str | None,
    attachment_ids: Sequence[str],
    chat_id: str | None,
) -> list[Attachment]:
    """The stored files with these ids that the caller (`user_id` None: the whole organization) may
    send in a message of chat `chat_id` (None: a chat not known yet), in order. A file uploaded to
    one chat, or sent in one, stays that chat's."""
    found = await get_many(session, organization_id, attachment_ids)
    visible = {
        attachment_id: attachment
        for attachment_id, attachment in found.items()
        if user_id is None or attachment.user_id == user_id
    }
    missing = [attachment_id for attachment_id in attachment_ids if attachment_id not in visible]
    if missing:
        raise UnknownAttachments(missing, "no such file")
    elsewhere = [
        attachment_id
        for attachment_id in attachment_ids
        if visible[attachment_id].chat_id not in (None, chat_id)
    ]
    if elsewhere:
        raise UnknownAttachments(elsewhere, "these files belong to another chat")
    failed = [
        attachment_id
        for attachment_id in attachment_ids
        if visible[attachment_id].status != AttachmentStatus.STORED
    ]
    if failed:
        raise UnknownAttachments(failed, "these files are not stored")
    return [visible[attachment_id] for attachment_id in attachment_ids]


async def attach_to_message(
    session: AsyncSession,
    organization_id: str,
    chat_id: str,
    message_id: str,
    attachment_ids: Sequence[str],
) -> None:
    """The files of a stored message now belong to its chat; the first message keeps them."""
    if not attachment_ids:
        return
    await session.execute(
        update(Attachment)
        .where(
            Attachment.organization_id == organization_id,
            Attachment.id.in_(attachment_ids),
            (Attachment.chat_id.is_(None)) | (Attachment.chat_id == chat_id),
        )
        .values(
            chat_id=chat_id,
            message_id=func.coalesce(Attachment.message_id, message_id),
            updated_at=func.now(),
        )
    )


async def list_for_chat(session: AsyncSession, chat: Chat) -> list[Attachment]:
    """The chat's stored files, oldest first."""
    result = await session.execute(
        select(Attachment)
        .where(
            Attachment.organization_id == chat.organization_id,
            Attachment.chat_id == chat.id,
            Attachment.status == AttachmentStatus.STORED,
        )
        .order_by(Attachment.created_at, Attachment.id)
    )
    return list(result.scalars())


def object_names(attachments: Iterable[Attachment]) -> list[str]:
    """Every object an attachment row names: its original and its model variant."""
    names: list[str] = []
    for attachment in attachments:
        names.append(attachment.object_name)
        if attachment.variant_name:
            names.append(attachment.variant_name)
    return names


async def of_purgeable_chats(
    session: AsyncSession,
    deleted_before: datetime | None,
    *,
    organization_id: str | None = None,
    limit: int = 1000,
) -> list[Attachment]:
    """Attachments of chats a purge would delete (soft-deleted before `deleted_before`; None: all)."""
    query = (
        select(Attachment)
        .join(
            Chat,
            (Chat.organization_id == Attachment.organization_id) & (Chat.id == Attachment.chat_id),
        )
        .where(Chat.deleted_at.is_not(None))
    )
    if deleted_before is not None:
        query = query.where(Chat.deleted_at < deleted_before)
    if organization_id is not None:
        query = query.where(Chat.organization_id == organization_id)
    result = await session.execute(query.order_by(Attachment.id).limit(limit))
    return list(result.scalars())


async def unattached_before(
    session: AsyncSession, created_before: datetime, *, limit: int = 1000
) -> list[Attachment]:
    """Files no message carries that were given before `created_before`: uploads never sent."""
    result = await session.execute(
        select(Attachment)
        .where(Attachment.message_id.is_(None), Attachment.created_at < created_before)
        .order_by(Attachment.created_at)
        .limit(limit)
    )
    return list(result.scalars())


async def unreferenced_in_chat(session: AsyncSession, chat: Chat) -> list[Attachment]:
    """The chat's files that no remaining message refers to (after a truncation), except uploads
    that were never sent: those wait for a send or for the sweep."""
    referenced = (
        select(Message.id)
        .where(
            Message.organization_id == Attachment.organization_id,
            Message.chat_id == Attachment.chat_id,
            Message.parts.contains(
                cast(
                    func.jsonb_build_array(func.jsonb_build_object("attachmentId", Attachment.id)),
                    JSONB,
                )
            ),
        )
        .exists()
    )
    result = await session.execute(
        select(Attachment).where(
            Attachment.organization_id == chat.organization_id,
            Attachment.chat_id == chat.id,
            Attachment.message_id.is_not(None),
            ~referenced,
        )
    )
    return list(result.scalars())


async def delete_rows(session: AsyncSession, attachments: Iterable[Attachment]) -> None:
    ids = [attachment.id for attachment in attachments]
    if ids:
        await session.execute(sa_delete(Attachment).where(Attachment.id.in_(ids)))
