"""Signed links to a chat's files, and the file parts of chat reads that carry them. Must never import
routers.

A browser's `<img src>` sends no Authorization header, so the `file` parts of chat reads carry links
that authorize themselves for a short while: an HMAC-SHA256, under a secret only api replicas share,
of the organization, chat, file and expiry. A link reaches nothing its chat's owner could not reach:
the download route still checks that the chat is live and holds the file.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from core.errors import NotFoundError
from media.types import IMAGE_TYPES
from storage.models import Attachment


@dataclass(frozen=True)
class FileLinks:
    """Makes and checks signed links; `base_url` is where clients reach the api (no trailing slash)."""

    secret: bytes
    expiry_seconds: int
    base_url: str

    def path(self, chat_id: str, attachment: Attachment) -> str:
        if attachment.media_type in IMAGE_TYPES:
            return f"/v1/chats/{quote(chat_id)}/images/{quote(attachment.id)}"
        return (
            f"/v1/chats/{quote(chat_id)}/files/{quote(attachment.id)}/"
            f"{quote(attachment.filename, safe='')}"
        )

    def url(self, organization_id: str, chat_id: str, attachment: Attachment) -> str:
        expires = int(time.time()) + self.expiry_seconds
        signature = self._sign(organization_id, chat_id, attachment.id, expires)
        query = urlencode({"expires": expires, "signature": signature})
        return f"{self.base_url}{self.path(chat_id, attachment)}?{query}"

    def verify(
        self, organization_id: str, chat_id: str, attachment_id: str, expires: int, signature: str
    ) -> bool:
        if expires < time.time():
            return False
        expected = self._sign(organization_id, chat_id, attachment_id, expires)
        return hmac.compare_digest(expected, signature)

    def _sign(self, organization_id: str, chat_id: str, attachment_id: str, expires: int) -> str:
        # Chat ids are only unique within an organization; attachment ids are unique everywhere, so
        # the route finds the organization from the file and the signature binds all four.
        message = f"{organization_id}\n{chat_id}\n{attachment_id}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def file_part(
        self,
        organization_id: str,
        chat_id: str,
        part: dict[str, Any],
        attachment: Attachment | None,
    ) -> dict[str, Any]:
        """A stored file part as a UIMessage `file` part: a signed `url`, and the attachment id in
        `providerMetadata.durachat` so a client can send it again by id."""
        if attachment is None:
            # Its file is gone (a truncation deleted it, or it never was stored): say so, link nothing.
            return {
                "type": "file",
                "mediaType": part.get("mediaType", "application/octet-stream"),
                "filename": part.get("filename"),
                "url": "",
                "providerMetadata": {
                    "durachat": {"attachmentId": part.get("attachmentId"), "missing": True}
                },
            }
        return {
            "type": "file",
            "mediaType": attachment.media_type,
            "filename": attachment.filename,
            "url": self.url(organization_id, chat_id, attachment),
            "providerMetadata": {"durachat": {"attachmentId": attachment.id}},
        }


def refuse_link() -> NotFoundError:
    """The answer to a tampered or expired link: the same as for a file that is not there."""
    return NotFoundError("no such file, or the link has expired")
