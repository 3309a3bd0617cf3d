"""File endpoints: uploads (to a chat, or before one exists) and reading a chat's files back."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Header, Path, Query, Response, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from api.chat_views import FileLinksDep
from api.deps import (
    BearerCredentials,
    CurrentPrincipal,
    StateDep,
    get_principal,
    visibility_of,
)
from api.file_intake import FileIntake
from api.file_links import FileLinks, refuse_link
from api.schemas import ChatId, UploadedFileOut
from api.state import AppState
from core.errors import (
    BadRequestError,
    NotFoundError,
    RangeNotSatisfiableError,
    UnauthorizedError,
)
from media.types import IMAGE_TYPES
from storage import attachments, chats
from storage.api_keys import Principal
from storage.chats import Visibility
from storage.models import Attachment

router = APIRouter(tags=["files"])

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "No file in the form", **PROBLEM},
    401: {"description": "Missing or invalid API key", **PROBLEM},
    413: {"description": "The file (or the request) is too large", **PROBLEM},
    415: {"description": "A type that is not accepted, or not what the bytes are", **PROBLEM},
}
READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file's bytes, with its stored type", "content": {"*/*": {}}},
    206: {"description": "The requested byte range"},
    304: {"description": "Not modified (`If-None-Match`)"},
    401: {"description": "Neither an API key nor a signed link", **PROBLEM},
    404: {"description": "No such file in a chat of the caller, or an expired link", **PROBLEM},
    416: {"description": "The range lies outside the file", **PROBLEM},
}
FileId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="A file id")]
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@router.post(
    "/v1/files",
    status_code=201,
    summary="Upload a file before its chat exists; send it with a message by `fileIds`",
    responses=UPLOAD_RESPONSES,
)
async def upload_file(
    principal: CurrentPrincipal,
    state: StateDep,
    file: Annotated[UploadFile, File(description="The file (multipart field `file`).")],
) -> UploadedFileOut:
    attachment = await _store_upload(state, principal, file, chat_id=None)
    return _uploaded(attachment, f"/v1/files/{quote(attachment.id)}")


@router.get(
    "/v1/files/{file_id}",
    summary="Read back an upload made through `POST /v1/files`, with the API key that made it",
    responses=READ_RESPONSES,
    response_class=Response,
)
async def read_upload(
    file_id: FileId,
    principal: CurrentPrincipal,
    state: StateDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    async with state.sessions() as session:
        attachment = await attachments.get(session, principal.organization_id, file_id)
        readable = (
            attachment is not None
            and attachment.status == attachments.AttachmentStatus.STORED
            and (principal.user_id is None or attachment.user_id == principal.user_id)
            # Sent in (or uploaded to) a chat, it is read as the chat's: deleting the chat hides it.
            and (
                attachment.chat_id is None
                or await chats.get_live_chat(session, visibility_of(principal), attachment.chat_id)
                is not None
            )
        )
    if attachment is None or not readable:
        raise NotFoundError("no such file")
    return await _file_response(state, attachment, range_header, if_none_match, inline=False)


@router.post(
    "/v1/chats/{chat_id}/attachments",
    status_code=201,
    summary="Upload a file to a chat; send it with a message by `fileIds`",
    responses={**UPLOAD_RESPONSES, 404: {"description": "No such chat", **PROBLEM}},
)
async def upload_chat_attachment(
    chat_id: ChatId,
    principal: CurrentPrincipal,
    state: StateDep,
    links: FileLinksDep,
    file: Annotated[UploadFile, File(description="The file (multipart field `file`).")],
) -> UploadedFileOut:
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility_of(principal), chat_id)
    if chat is None:
        raise NotFoundError("chat not found")
    attachment = await _store_upload(state, principal, file, chat_id=chat.id)
    return _uploaded(attachment, links.url(principal.organization_id, chat.id, attachment))


@router.get(
    "/v1/chats/{chat_id}/files/{file_id}/{filename}",
    summary="A chat's file, as a download (with the API key, or a signed link from a chat read)",
    responses=READ_RESPONSES,
    response_class=Response,
)
async def read_chat_file(
    chat_id: ChatId,
    file_id: FileId,
    filename: str,
    state: StateDep,
    links: FileLinksDep,
    credentials: BearerCredentials,
    expires: Annotated[int | None, Query()] = None,
    signature: Annotated[str | None, Query(max_length=128)] = None,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    attachment = await _readable(state, links, chat_id, file_id, credentials, expires, signature)
    return await _file_response(state, attachment, range_header, if_none_match, inline=False)


@router.get(
    "/v1/chats/{chat_id}/images/{file_id}",
    summary="A chat's image, shown inline (with the API key, or a signed link from a chat read)",
    responses=READ_RESPONSES,
    response_class=Response,
)
async def read_chat_image(
    chat_id: ChatId,
    file_id: FileId,
    state: StateDep,
    links: FileLinksDep,
    credentials: BearerCredentials,
    expires: Annotated[int | None, Query()] = None,
    signature: Annotated[str | None, Query(max_length=128)] = None,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    attachment = await _readable(state, links, chat_id, file_id, credentials, expires, signature)
    if attachment.media_type not in IMAGE_TYPES:
        raise NotFoundError("no such image")
    return await _file_response(state, attachment, range_header, if_none_match, inline=True)


async def _store_upload(
    state: AppState, principal: Principal, file: UploadFile, *, chat_id: str | None
) -> Attachment:
    if file.size is None:
        raise BadRequestError("the form's `file` field holds no file")
    try:
        return await FileIntake(state, principal).store_upload(
            file.file,
            size=file.size,
            declared_type=file.content_type,
            filename=file.filename,
            chat_id=chat_id,
        )
    finally:
        await file.close()


def _uploaded(attachment: Attachment, url: str) -> UploadedFileOut:
    return UploadedFileOut(
        id=attachment.id,
        filename=attachment.filename,
        mediaType=attachment.media_type,
        size=attachment.size or 0,
        url=url,
        createdAt=chats.iso(attachment.created_at),
    )


async def _readable(
    state: AppState,
    links: FileLinks,
    chat_id: str,
    file_id: FileId,
    credentials: HTTPAuthorizationCredentials | None,
    expires: int | None,
    signature: str | None,
) -> Attachment:
    """The file, if the caller may read it: with an API key that sees the chat, or with a link
    signed for this chat and file that has not expired. Anything else is a 404 (401 with neither)."""
    if credentials is not None:
        visibility = visibility_of(await get_principal(state, credentials))
    elif expires is not None and signature is not None:
        async with state.sessions() as session:
            owner = await attachments.get_owner(session, file_id)
        if owner is None or not links.verify(owner, chat_id, file_id, expires, signature):
            raise refuse_link()
        visibility = Visibility(owner)
    else:
        raise UnauthorizedError(
            "send `Authorization: Bearer <key>`, or use the signed link a chat read gives"
        )
    async with state.sessions() as session:
        chat = await chats.get_live_chat(session, visibility, chat_id)
        attachment = await attachments.get_in_chat(session, chat, file_id) if chat else None
    if attachment is None:
        raise NotFoundError("no such file")
    return attachment


async def _file_response(
    state: AppState,
    attachment: Attachment,
    range_header: str | None,
    if_none_match: str | None,
    *,
    inline: bool,
) -> Response:
    etag = f'"{attachment.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
        # A stored file is never a page: scripts in it (a PDF's, say) run nowhere with our origin.
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, max-age=300",
        "Content-Disposition": _disposition(
            "inline" if inline else "attachment", attachment.filename
        ),
    }
    if if_none_match is not None and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    size = attachment.size or 0
    byte_range = _parse_range(range_header, size)
    body = await state.objects.open(
        attachment.organization_id, attachment.object_name, byte_range=byte_range
    )
    headers["Content-Length"] = str(body.size)
    status = 200
    if byte_range is not None:
        start, end = body.content_range or (byte_range[0], byte_range[0] + body.size - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        status = 206

    async def stream() -> AsyncIterator[bytes]:
        async with body:
            async for chunk in body:
                yield chunk

    return StreamingResponse(
        stream(), status_code=status, media_type=attachment.media_type, headers=headers
    )


def _parse_range(value: str | None, size: int) -> tuple[int, int | None] | None:
    """One `bytes=` range as (first, last) inclusive; None for none, or one this server ignores
    (several ranges: the whole file is sent, as RFC 9110 allows)."""
    if value is None:
        return None
    match = _RANGE.match(value.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # the last n bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size - 1
    start = int(first)
    if start >= size:
        raise _unsatisfiable(size)
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> RangeNotSatisfiableError:
    return RangeNotSatisfiableError(
        "the range lies outside the file", headers={"Content-Range": f"bytes */{size}"}
    )


def _disposition(kind: str, filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_").replace('"', "")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
