"""The attachment activity of a turn, and the model inputs generation builds from stored files.

`prepare_attachments` runs before generation whenever the turn's messages carry files: it fetches
files named by https URLs (through the one guarded outbound client), checks and stores them, and
makes a model-ready copy of each image. Activities pass attachment ids; bytes never enter workflow
inputs, results or history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import PrepareAttachmentsInput, attachment_ids_in
from core.errors import ErrorType
from media.documents import DocumentRefused, pdf_text
from media.images import ImageRefused, normalize_image
from media.types import (
    IMAGE_TYPES,
    SNIFF_BYTES,
    TEXT_TYPES,
    TextCheck,
    UnsupportedMediaType,
    identify,
)
from outbound.guard import GuardedHttpClient, OutboundRefused
from providers.base import DocumentInput, ImageInput, InputKind, PromptInput
from providers.registry import ProviderRegistry
from storage import attachments
from storage.attachments import AttachmentStatus
from storage.models import Attachment, Message
from storage.objects import ObjectStore, StoredObject

# How much text one PDF may add to a prompt when the model takes no documents.
PDF_TEXT_MAX_CHARS = 200_000


@dataclass(frozen=True)
class AttachmentLimits:
    max_bytes: int
    allowed_types: tuple[str, ...]
    fetch_timeout_seconds: float


class RemoteFileRefused(Exception):
    """A remote file that cannot be used, whatever the retries: the message says why."""


class AttachmentActivities:
    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        objects: ObjectStore,
        outbound: GuardedHttpClient,
        providers: ProviderRegistry,
        limits: AttachmentLimits,
    ) -> None:
        self._sessions = session_factory
        self._objects = objects
        self._outbound = outbound
        self._providers = providers
        self._limits = limits

    @activity.defn
    async def prepare_attachments(self, request: PrepareAttachmentsInput) -> None:
        """Fetch the turn's remote files and make its images model-ready. A file that cannot be
        used fails the turn (non-retryable, with its reason); network trouble and an unreachable
        store are retried. Safe to retry: objects and rows are named by the attachment id."""
        async with self._sessions() as session:
            found = await attachments.get_many(
                session, request.organization_id, request.attachment_ids
            )
        for attachment_id in request.attachment_ids:
            attachment = found.get(attachment_id)
            if attachment is None:
                raise _refused(f"file {attachment_id} is gone")
            if attachment.status == AttachmentStatus.PENDING and attachment.source_url:
                await self._fetch(attachment)
            if attachment.status == AttachmentStatus.FAILED:
                raise _refused(
                    attachment.error or f"file {attachment.filename!r} could not be used"
                )
            if attachment.media_type in IMAGE_TYPES:
                if InputKind.IMAGE not in self._providers.input_kinds(request.model):
                    raise _refused(
                        f"model {request.model} does not take images ({attachment.filename!r})"
                    )
                if attachment.variant_name is None:
                    await self._make_model_copy(attachment)

    async def _fetch(self, attachment: Attachment) -> None:
        assert attachment.source_url is not None
        try:
            async with asyncio.timeout(self._limits.fetch_timeout_seconds):
                stored, media_type = await self._download(attachment)
        except RemoteFileRefused as exc:
            await self._fail(attachment, str(exc))
            return
        except (httpx.TransportError, TimeoutError) as exc:
            # Retried by Temporal: the network, or the remote server, may be back on a later try.
            raise ApplicationError(
                f"fetching {attachment.source_url} failed: {type(exc).__name__}",
                type=ErrorType.REMOTE_FILE_UNAVAILABLE,
            ) from None
        async with self._sessions.begin() as session:
            await attachments.mark_stored(
                session,
                attachment.organization_id,
                attachment.id,
                media_type=media_type,
                size=stored.size,
                sha256=stored.sha256,
            )
        attachment.status = AttachmentStatus.STORED
        attachment.media_type = media_type

    async def _download(self, attachment: Attachment) -> tuple[StoredObject, str]:
        url = attachment.source_url
        assert url is not None
        limit = self._limits.max_bytes
        try:
            async with self._outbound.stream("GET", url) as response:
                if 400 <= response.status_code < 500:
                    raise RemoteFileRefused(f"{url} answered HTTP {response.status_code}")
                if response.status_code >= 300:
                    raise ApplicationError(
                        f"{url} answered HTTP {response.status_code}",
                        type=ErrorType.REMOTE_FILE_UNAVAILABLE,
                    )
                declared_length = response.headers.get("content-length", "")
                if declared_length.isdigit() and int(declared_length) > limit:
                    raise RemoteFileRefused(f"{url} is larger than {limit} bytes")
                body = response.aiter_bytes()
                head = b""
                async for chunk in body:
                    head += chunk
                    if len(head) >= SNIFF_BYTES:
                        break
                try:
                    media_type = identify(
                        head[:SNIFF_BYTES],
                        declared_type=response.headers.get("content-type") or None,
                        filename=attachment.filename,
                        allowed=self._limits.allowed_types,
                    )
                except UnsupportedMediaType as exc:
                    raise RemoteFileRefused(f"{url}: {exc}") from None
                text_check = TextCheck() if media_type in TEXT_TYPES else None

                async def checked() -> AsyncIterator[bytes]:
                    size = 0
                    last_beat = time.monotonic()
                    async for chunk in _prepended(head, body):
                        size += len(chunk)
                        if size > limit:
                            raise RemoteFileRefused(f"{url} is larger than {limit} bytes")
                        if text_check is not None:
                            try:
                                text_check.feed(chunk)
                            except UnsupportedMediaType as exc:
                                raise RemoteFileRefused(f"{url}: {exc}") from None
                        if time.monotonic() - last_beat > 1:
                            activity.heartbeat(size)
                            last_beat = time.monotonic()
                        yield chunk
                    if text_check is not None:
                        try:
                            text_check.finish()
                        except UnsupportedMediaType as exc:
                            raise RemoteFileRefused(f"{url}: {exc}") from None

                stored = await self._objects.put_stream(
                    attachment.organization_id,
                    attachment.object_name,
                    checked(),
                    content_type=media_type,
                )
        except OutboundRefused as exc:
            raise RemoteFileRefused(str(exc)) from None
        return stored, media_type

    async def _make_model_copy(self, attachment: Attachment) -> None:
        original = await self._objects.read_bytes(
            attachment.organization_id, attachment.object_name
        )
        try:
            normalized = await asyncio.to_thread(normalize_image, original)
        except ImageRefused as exc:
            await self._fail(attachment, f"{attachment.filename!r}: {exc}")
            raise _refused(f"{attachment.filename!r}: {exc}") from None
        await self._objects.put_bytes(
            attachment.organization_id,
            attachments.variant_name_for(attachment.id),
            normalized.data,
            content_type=normalized.media_type,
        )
        async with self._sessions.begin() as session:
            await attachments.set_variant(
                session, attachment.organization_id, attachment.id, normalized.media_type
            )
        attachment.variant_name = attachments.variant_name_for(attachment.id)
        attachment.variant_media_type = normalized.media_type

    async def _fail(self, attachment: Attachment, reason: str) -> None:
        async with self._sessions.begin() as session:
            await attachments.mark_failed(
                session, attachment.organization_id, attachment.id, reason
            )
        attachment.status = AttachmentStatus.FAILED
        attachment.error = reason


def _refused(message: str) -> ApplicationError:
    return ApplicationError(message, type=ErrorType.ATTACHMENT_REFUSED, non_retryable=True)


async def _prepended(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`rest` with `first` (the bytes already read to sniff the type) in front."""
    if first:
        yield first
    async for chunk in rest:
        yield chunk


# --- what generation gives the model ------------------------------------------------------------


@dataclass
class MessageFiles:
    """What a message's files add to its prompt message: text blocks and native inputs."""

    text_blocks: list[str] = field(default_factory=list)
    inputs: list[PromptInput] = field(default_factory=list)


class ModelInputs:
    """Loads the files of a branch's messages from the store, in the form the model takes them:
    images (the model-ready copy) and PDFs natively where the model takes them, extracted text
    otherwise, text files as text."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    async def for_branch(
        self,
        organization_id: str,
        branch: Sequence[Message],
        found: dict[str, Attachment],
        kinds: frozenset[InputKind],
    ) -> dict[str, MessageFiles]:
        files: dict[str, MessageFiles] = {}
        for message in branch:
            ids = attachment_ids_in(message.parts) if message.role == "user" else []
            if not ids:
                continue
            entry = files.setdefault(message.id, MessageFiles())
            for attachment_id in ids:
                attachment = found.get(attachment_id)
                if attachment is None or attachment.status != AttachmentStatus.STORED:
                    name = attachment.filename if attachment else attachment_id
                    entry.text_blocks.append(f"[The file {name!r} is no longer available.]")
                    continue
                await self._add(organization_id, attachment, kinds, entry)
        return files

    async def _add(
        self,
        organization_id: str,
        attachment: Attachment,
        kinds: frozenset[InputKind],
        entry: MessageFiles,
    ) -> None:
        name = attachment.filename
        if attachment.media_type in IMAGE_TYPES:
            if InputKind.IMAGE not in kinds:
                entry.text_blocks.append(
                    f"[An image, {name!r}, was attached; this model does not take images.]"
                )
                return
            object_name = attachment.variant_name or attachment.object_name
            data = await self._objects.read_bytes(organization_id, object_name)
            entry.inputs.append(
                ImageInput(
                    media_type=attachment.variant_media_type or attachment.media_type,
                    data=data,
                    filename=name,
                )
            )
            return
        data = await self._objects.read_bytes(organization_id, attachment.object_name)
        if attachment.media_type == "application/pdf":
            if InputKind.DOCUMENT in kinds:
                entry.inputs.append(
                    DocumentInput(media_type="application/pdf", data=data, filename=name)
                )
                return
            try:
                extracted = await asyncio.to_thread(pdf_text, data, max_chars=PDF_TEXT_MAX_CHARS)
            except DocumentRefused as exc:
                entry.text_blocks.append(f"[The PDF {name!r} could not be read: {exc}]")
                return
            if not extracted.text.strip():
                entry.text_blocks.append(
                    f"[The PDF {name!r} ({extracted.pages} pages) has no text layer: it holds "
                    "scanned images, which this model cannot read.]"
                )
                return
            entry.text_blocks.append(_file_block(name, "application/pdf", extracted.text))
            return
        entry.text_blocks.append(
            _file_block(name, attachment.media_type, data.decode("utf-8", errors="replace"))
        )


def _file_block(name: str, media_type: str, text: str) -> str:
    return f'<file name="{name}" type="{media_type}">\n{text}\n</file>'
