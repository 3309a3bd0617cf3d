"""Files given with a request, checked and stored before anything else happens. Must never import
routers.

Every way a file comes in ends here as the same stored attachment: an upload (multipart), a `data:`
URL in an AI SDK `file` part, the seed-style base64 `image`, a reference to an earlier upload (`fileIds`,
or a `file` part carrying the attachment id), and an https URL, which the turn fetches itself
(activities.attachments). Each is checked first: the type is sniffed from the bytes and must be
allowed, the size is bounded, an image must decode under Pillow's bomb guard; a refusal (400, 413,
415) leaves nothing behind. Bytes never enter the turn's workflow: parts carry attachment ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import structlog

from api.state import AppState
from core.errors import BadRequestError, ContentTooLargeError, UnsupportedMediaTypeError
from media.images import ImageRefused, inspect_image
from media.types import (
    IMAGE_TYPES,
    SNIFF_BYTES,
    TEXT_TYPES,
    TextCheck,
    UnsupportedMediaType,
    identify,
)
from providers.base import DOCUMENT_MEDIA_TYPES, InputKind
from storage import attachments
from storage.api_keys import Principal
from storage.attachments import NewAttachment, UnknownAttachments
from storage.models import Attachment

log = structlog.get_logger(__name__)

# Attachment ids of a turn's files derive from the turn id, so a repeated send (same turn) writes
# the same objects and rows again instead of new ones.
_ATTACHMENT_NAMESPACE = uuid.UUID("6f1d3c1e-2b0a-4c55-9a53-4a1f4e7d9c10")
# A durachat file link, as chat reads hand them out: a client that sends one back means that file.
_OWN_LINK = re.compile(r"/v1/chats/[^/]+/(?:images|files)/(?P<id>[A-Za-z0-9_-]{1,64})(?:[/?]|$)")
_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_UPLOAD_CHUNK = 1024 * 1024
_MAX_FILENAME_CHARS = 255
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "application/pdf": "pdf",
    "text/plain": "txt",
    "text/markdown": "md",
    "text/csv": "csv",
    "application/json": "json",
}


@dataclass
class GivenFile:
    """One file a request names, before intake: exactly one of `data_url`, `remote_url` or
    `attachment_id` is set."""

    declared_type: str | None = None
    filename: str | None = None
    data_url: str | None = None
    remote_url: str | None = None
    attachment_id: str | None = None


def given_file_of(part: dict[str, Any]) -> GivenFile:
    """The file an AI SDK `file` part names; ValueError for a part that names none."""
    url = part.get("url")
    media_type = part.get("mediaType")
    filename = part.get("filename")
    if not isinstance(url, str):
        raise ValueError("a file part needs a string `url`")
    if media_type is not None and not isinstance(media_type, str):
        raise ValueError("a file part's `mediaType` must be a string")
    if filename is not None and not isinstance(filename, str):
        raise ValueError("a file part's `filename` must be a string")
    given = GivenFile(declared_type=media_type or None, filename=filename)
    metadata = part.get("providerMetadata")
    own = metadata.get("durachat") if isinstance(metadata, dict) else None
    attachment_id = own.get("attachmentId") if isinstance(own, dict) else None
    link = _OWN_LINK.search(urlsplit(url).path) if not url.startswith("data:") else None
    if isinstance(attachment_id, str):
        given.attachment_id = attachment_id
    elif link is not None:
        given.attachment_id = link.group("id")
    elif url[:5].lower() == "data:":
        if _DATA_URL.match(url) is None:
            raise ValueError("a file part's `data:` URL is malformed")
        given.data_url = url
    elif urlsplit(url).scheme.lower() in ("https", "http"):
        given.remote_url = url
    else:
        raise ValueError(
            "a file part's `url` must be a `data:` URL, an https URL or a durachat file link"
        )
    return given


@dataclass
class CheckedFile:
    """Bytes that passed every check, ready to store."""

    data: bytes
    media_type: str
    filename: str


@dataclass
class GivenMessage:
    """The parts of one message, with the files it gives at the positions they were given."""

    parts: list[dict[str, Any]]
    # Position in `parts` -> the file given there.
    files: dict[int, GivenFile] = field(default_factory=dict)


def split_files(parts: Sequence[dict[str, Any]], extra: Sequence[GivenFile] = ()) -> GivenMessage:
    """A message's parts with its `file` parts taken out as given files; `extra` files (fileIds, a
    seed-style image) go first, where the AI SDK puts a message's files."""
    message = GivenMessage(parts=[])
    for given in extra:
        message.files[len(message.parts)] = given
        message.parts.append({})
    for part in parts:
        if part.get("type") == "file":
            message.files[len(message.parts)] = given_file_of(part)
        message.parts.append(part)
    return message


class FileIntake:
    """Checks and stores the files of one request. `turn_id` names the turn the files come with
    (their ids derive from it); None for an upload, which gets fresh ids."""

    def __init__(self, state: AppState, principal: Principal) -> None:
        self._state = state
        self._settings = state.settings
        self._principal = principal

    # --- a send's files -----------------------------------------------------------------------

    async def store_message_files(
        self,
        messages: Sequence[GivenMessage],
        *,
        turn_id: str,
        chat_id: str | None,
        choose_model: Callable[[frozenset[InputKind]], str],
    ) -> tuple[list[list[dict[str, Any]]], list[str]]:
        """Every message's parts with each given file replaced by a part referring to its stored
        attachment, and the ids of the attachments stored here (to remove if the send fails).

        `choose_model` gets the kinds of input the files make (a model choice may depend on them)
        and names the turn's model, which must take them; nothing is stored before."""
        for message in messages:
            if len(message.files) > self._settings.max_attachments_per_message:
                raise BadRequestError(
                    f"a message carries at most {self._settings.max_attachments_per_message} files",
                    extra={"maxFiles": self._settings.max_attachments_per_message},
                )
        existing = await self._existing(messages, chat_id)
        checked: dict[tuple[int, int], CheckedFile] = {}
        remote: dict[tuple[int, int], GivenFile] = {}
        for index, message in enumerate(messages):
            for position, given in message.files.items():
                if given.data_url is not None:
                    checked[(index, position)] = await self._checked_data_url(given)
                elif given.remote_url is not None:
                    self._check_remote(given)
                    remote[(index, position)] = given
        media_types = [
            *(item.media_type for item in checked.values()),
            *(_declared(given.declared_type) for given in remote.values()),
            *(attachment.media_type for attachment in existing.values()),
        ]
        self._check_model_takes_images(choose_model(_input_kinds(media_types)), media_types)
        ids = {
            where: str(uuid.uuid5(_ATTACHMENT_NAMESPACE, f"{turn_id}:{where[0]}:{where[1]}"))
            for where in (*checked, *remote)
        }
        pending = [
            NewAttachment(
                id=ids[where],
                organization_id=self._principal.organization_id,
                user_id=self._principal.user_id,
                # The chat may not exist yet: storing the message gives the file its chat.
                chat_id=None,
                filename=item.filename,
                media_type=item.media_type,
            )
            for where, item in checked.items()
        ] + [
            NewAttachment(
                id=ids[where],
                organization_id=self._principal.organization_id,
                user_id=self._principal.user_id,
                chat_id=None,
                filename=_remote_filename(given),
                media_type=_declared(given.declared_type) or "application/octet-stream",
                source_url=given.remote_url,
            )
            for where, given in remote.items()
        ]
        await self._record_pending(pending)
        try:
            for where, item in checked.items():
                await self._put(ids[where], item)
        except BaseException:
            await self.discard(list(ids.values()))
            raise
        stored = await self._load(list(ids.values()))
        parts: list[list[dict[str, Any]]] = []
        for index, message in enumerate(messages):
            replaced = list(message.parts)
            for position, given in message.files.items():
                attachment = (
                    existing[given.attachment_id]
                    if given.attachment_id is not None
                    else stored[ids[(index, position)]]
                )
                replaced[position] = attachments.file_part(attachment)
            parts.append(replaced)
        return parts, list(ids.values())

    async def _existing(
        self, messages: Sequence[GivenMessage], chat_id: str | None
    ) -> dict[str, Attachment]:
        wanted = [
            given.attachment_id
            for message in messages
            for given in message.files.values()
            if given.attachment_id is not None
        ]
        if not wanted:
            return {}
        async with self._state.sessions() as session:
            try:
                found = await attachments.usable_by(
                    session,
                    self._principal.organization_id,
                    self._principal.user_id,
                    list(dict.fromkeys(wanted)),
                    chat_id,
                )
            except UnknownAttachments as exc:
                raise BadRequestError(str(exc), extra={"fileIds": exc.ids}) from exc
        return {attachment.id: attachment for attachment in found}

    async def _checked_data_url(self, given: GivenFile) -> CheckedFile:
        assert given.data_url is not None
        header = _DATA_URL.match(given.data_url)
        assert header is not None  # given_file_of checked it
        payload = given.data_url[header.end() :]
        is_base64 = any(p.strip().lower() == "base64" for p in header.group("params").split(";"))
        limit = self._settings.max_attachment_bytes
        # Refused by its length before decoding: base64 is 4 characters for every 3 bytes.
        if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > limit:
            raise _too_large(given.filename, limit)
        try:
            data = (
                base64.b64decode(payload, validate=True) if is_base64 else unquote_to_bytes(payload)
            )
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(
                f"the data URL of {_name(given.filename)} is not valid base64"
            ) from exc
        declared = given.declared_type or header.group("type") or None
        return await self.check_bytes(data, declared_type=declared, filename=given.filename)

    async def check_bytes(
        self, data: bytes, *, declared_type: str | None, filename: str | None
    ) -> CheckedFile:
        limit = self._settings.max_attachment_bytes
        if len(data) > limit:
            raise _too_large(filename, limit)
        media_type = self._identify(data[:SNIFF_BYTES], declared_type, filename)
        if media_type in IMAGE_TYPES:
            await _inspect(data, filename)
        elif media_type in TEXT_TYPES:
            check = TextCheck()
            try:
                check.feed(data)
                check.finish()
            except UnsupportedMediaType as exc:
                raise UnsupportedMediaTypeError(f"{_name(filename)}: {exc}") from exc
        return CheckedFile(data, media_type, clean_filename(filename, media_type))

    def _identify(self, head: bytes, declared_type: str | None, filename: str | None) -> str:
        try:
            return identify(
                head,
                declared_type=declared_type,
                filename=filename,
                allowed=self._settings.attachment_allowed_types,
            )
        except UnsupportedMediaType as exc:
            raise UnsupportedMediaTypeError(
                f"{_name(filename)}: {exc}",
                extra={"acceptedTypes": self._settings.attachment_allowed_types},
            ) from exc

    def _check_remote(self, given: GivenFile) -> None:
        declared = _declared(given.declared_type)
        if (
            declared
            and "/" in declared
            and not declared.endswith("/*")
            and declared not in self._settings.attachment_allowed_types
        ):
            raise UnsupportedMediaTypeError(
                f"{_name(given.filename)}: files of type {declared} are not accepted",
                extra={"acceptedTypes": self._settings.attachment_allowed_types},
            )

    def _check_model_takes_images(self, model: str, media_types: Sequence[str]) -> None:
        if not any(_declared(media_type).startswith("image") for media_type in media_types):
            return
        if InputKind.IMAGE in self._state.providers.input_kinds(model):
            return
        takers = self._state.providers.models_accepting(InputKind.IMAGE)
        raise BadRequestError(
            f"model {model} does not take images"
            + (f"; models that do: {', '.join(takers)}" if takers else ""),
            extra={"modelsTakingImages": takers},
        )

    # --- uploads --------------------------------------------------------------------------------

    async def store_upload(
        self,
        upload: BinaryIO,
        *,
        size: int,
        declared_type: str | None,
        filename: str | None,
        chat_id: str | None,
    ) -> Attachment:
        """Check an uploaded file (spooled by the multipart parser) and stream it to the store."""
        limit = self._settings.max_attachment_bytes
        if size > limit:
            raise _too_large(filename, limit)
        upload.seek(0)
        head = upload.read(SNIFF_BYTES)
        media_type = self._identify(head, declared_type, filename)
        if media_type in IMAGE_TYPES:
            upload.seek(0)
            await _inspect(upload.read(), filename)
        text_check = TextCheck() if media_type in TEXT_TYPES else None
        attachment_id = str(uuid.uuid4())
        await self._record_pending(
            [
                NewAttachment(
                    id=attachment_id,
                    organization_id=self._principal.organization_id,
                    user_id=self._principal.user_id,
                    chat_id=chat_id,
                    filename=clean_filename(filename, media_type),
                    media_type=media_type,
                )
            ]
        )

        async def chunks() -> AsyncIterator[bytes]:
            upload.seek(0)
            while chunk := await asyncio.to_thread(upload.read, _UPLOAD_CHUNK):
                if text_check is not None:
                    text_check.feed(chunk)
                yield chunk
            if text_check is not None:
                text_check.finish()

        try:
            stored = await self._state.objects.put_stream(
                self._principal.organization_id,
                attachments.object_name_for(attachment_id),
                chunks(),
                content_type=media_type,
            )
        except UnsupportedMediaType as exc:
            await self.discard([attachment_id])
            raise UnsupportedMediaTypeError(f"{_name(filename)}: {exc}") from exc
        except BaseException:
            await self.discard([attachment_id])
            raise
        async with self._state.sessions.begin() as session:
            await attachments.mark_stored(
                session,
                self._principal.organization_id,
                attachment_id,
                media_type=media_type,
                size=stored.size,
                sha256=stored.sha256,
            )
        return (await self._load([attachment_id]))[attachment_id]

    # --- storing and undoing ----------------------------------------------------------------------

    async def _record_pending(self, pending: list[NewAttachment]) -> None:
        # Rows first, then bytes: an object the api wrote and then lost track of (a crash between
        # the two) is always named by a row, which the sweep of unattached files removes.
        if not pending:
            return
        async with self._state.sessions.begin() as session:
            await attachments.add_pending(session, pending)

    async def _put(self, attachment_id: str, item: CheckedFile) -> None:
        stored = await self._state.objects.put_bytes(
            self._principal.organization_id,
            attachments.object_name_for(attachment_id),
            item.data,
            content_type=item.media_type,
        )
        async with self._state.sessions.begin() as session:
            await attachments.mark_stored(
                session,
                self._principal.organization_id,
                attachment_id,
                media_type=item.media_type,
                size=stored.size,
                sha256=stored.sha256,
            )

    async def _load(self, attachment_ids: list[str]) -> dict[str, Attachment]:
        async with self._state.sessions() as session:
            return await attachments.get_many(
                session, self._principal.organization_id, attachment_ids
            )

    async def discard(self, attachment_ids: list[str]) -> None:
        """Remove attachments stored for a request that did not go through (best effort: what is
        left is unattached, and swept later)."""
        if not attachment_ids:
            return
        try:
            async with self._state.sessions.begin() as session:
                found = await attachments.get_many(
                    session, self._principal.organization_id, attachment_ids
                )
                unattached = [a for a in found.values() if a.message_id is None]
                await self._state.objects.delete_many(
                    self._principal.organization_id, attachments.object_names(unattached)
                )
                await attachments.delete_rows(session, unattached)
        except Exception:
            log.warning("attachments.discard_failed", ids=attachment_ids, exc_info=True)


def clean_filename(filename: str | None, media_type: str) -> str:
    """A file name safe to store and to put in a Content-Disposition: the last path segment, no
    control characters, bounded; a name from the type when none was given."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"').strip()
    if not name or name in (".", ".."):
        name = f"file.{_EXTENSIONS.get(media_type, 'bin')}"
    if len(name) > _MAX_FILENAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        keep = _MAX_FILENAME_CHARS - len(extension) - 1 if dot and len(extension) < 16 else None
        name = f"{stem[:keep]}.{extension}" if keep else name[:_MAX_FILENAME_CHARS]
    return name


def _remote_filename(given: GivenFile) -> str:
    assert given.remote_url is not None
    return clean_filename(
        given.filename or unquote(urlsplit(given.remote_url).path.rsplit("/", 1)[-1]),
        _declared(given.declared_type),
    )


def _declared(media_type: str | None) -> str:
    return (media_type or "").split(";", 1)[0].strip().lower()


def _name(filename: str | None) -> str:
    return repr(filename) if filename else "the file"


def _too_large(filename: str | None, limit: int) -> ContentTooLargeError:
    return ContentTooLargeError(
        f"{_name(filename)} is larger than {limit} bytes", extra={"maxFileBytes": limit}
    )


async def _inspect(data: bytes, filename: str | None) -> None:
    try:
        await asyncio.to_thread(inspect_image, data)
    except ImageRefused as exc:
        raise UnsupportedMediaTypeError(f"{_name(filename)}: {exc}") from exc


def _input_kinds(media_types: Sequence[str]) -> frozenset[InputKind]:
    """The kinds of model input files of these types make (images, PDFs as documents)."""
    kinds: set[InputKind] = set()
    for media_type in media_types:
        if media_type.startswith("image/"):
            kinds.add(InputKind.IMAGE)
        elif media_type in DOCUMENT_MEDIA_TYPES:
            kinds.add(InputKind.DOCUMENT)
    return frozenset(kinds)
