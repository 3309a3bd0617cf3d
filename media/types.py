"""Identify an upload's media type from its bytes, never from the client. Pure: must never import fastapi, temporalio, sqlalchemy, redis or aiobotocore."""

from __future__ import annotations

import codecs
import re
from collections.abc import Collection
from pathlib import PurePosixPath

import filetype

IMAGE_TYPES: frozenset[str] = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# The types identify() returns for text that decodes as UTF-8.
TEXT_TYPES: frozenset[str] = frozenset(
    {"text/plain", "text/markdown", "text/csv", "application/json"}
)
SNIFF_BYTES: int = 8192

# Binary formats recognised by their signature before anything looks at the bytes as text: a
# hand-written PDF is plain ASCII and must still be a PDF.
_SIGNATURE_TYPES = frozenset({*IMAGE_TYPES, "application/pdf"})

# What clients call the formats identify() returns.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "application/x-pdf": "application/pdf",
    "text/x-markdown": "text/markdown",
    "application/csv": "text/csv",
    "text/json": "application/json",
}
# Declared application/* types that name text, so declaring one for a text file is no contradiction
# (browsers derive the declared type from the extension: .yaml, .xml, .js, .sql, ...).
_TEXTUAL_APPLICATION_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/x-ndjson",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/sql",
        "application/x-sh",
        "application/x-httpd-php",
        "application/x-tex",
        "application/rtf",
    }
)
_EXTENSION_TYPES = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
}

_WHITESPACE = b" \t\r\n\f"
_BOM = codecs.BOM_UTF8
# How far into the file the markup markers below are looked for.
_MARKUP_WINDOW = 512
# WHATWG MIME sniffing's HTML patterns: a document starting with one of these, followed by a space
# or `>`, is HTML to a sniffing browser.
_HTML_START = re.compile(
    rb"<(?:!doctype html|html|head|script|iframe|h1|div|font|table|a|style|title|b|body|br|p|!--)"
    rb"[ \t\r\n\f>]"
)
# Markers that make a file HTML wherever they occur near the start (polyglots: "hello<script>...").
_HTML_ANYWHERE = re.compile(rb"<(?:!doctype\s+html|html[\s>]|script[\s>/]|iframe[\s>/])")
_SVG = re.compile(rb"<svg[\s>/]")
_TOKEN = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*(?:/[a-z0-9*][a-z0-9!#$&^_.+*-]*)?")


class UnsupportedMediaType(ValueError):
    """The upload's type is refused; the message is safe to show the caller (a 415)."""


def identify(
    head: bytes, *, declared_type: str | None, filename: str | None, allowed: Collection[str]
) -> str:
    """The media type of a file from its first SNIFF_BYTES bytes; raises UnsupportedMediaType when it
    is not recognised, not in `allowed`, or contradicts `declared_type`."""
    head = head[:SNIFF_BYTES]
    declared = _normalize_declared(declared_type)
    sniffed = _sniff(head, declared=declared, filename=filename)
    if sniffed is None:
        raise UnsupportedMediaType("the file's type could not be recognised")
    accepted = [_canonical(item) for item in allowed]
    if sniffed not in accepted:
        raise UnsupportedMediaType(
            f"files of type {sniffed} are not accepted; accepted: {', '.join(accepted) or 'none'}"
        )
    if not _declared_fits(declared, sniffed):
        shown = declared if _TOKEN.fullmatch(declared) and len(declared) <= 100 else "another type"
        raise UnsupportedMediaType(f"the file was declared as {shown} but its content is {sniffed}")
    return sniffed


class TextCheck:
    """Checks a stream identified as text, chunk by chunk: no NUL bytes, valid UTF-8 throughout."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def feed(self, chunk: bytes) -> None:
        if b"\x00" in chunk:
            raise UnsupportedMediaType("the file is not text: it contains NUL bytes")
        try:
            self._decoder.decode(chunk, final=False)
        except UnicodeDecodeError:
            raise UnsupportedMediaType("the file is not valid UTF-8 text") from None

    def finish(self) -> None:
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UnsupportedMediaType(
                "the file is not valid UTF-8 text: it ends mid-character"
            ) from None


def _sniff(head: bytes, *, declared: str, filename: str | None) -> str | None:
    guessed = filetype.guess_mime(head) if head else None
    if guessed in _SIGNATURE_TYPES:
        return str(guessed)
    if not _is_utf8_text(head):
        return str(guessed) if guessed else None
    start = head.removeprefix(_BOM).lstrip(_WHITESPACE)[:_MARKUP_WINDOW].lower()
    if _is_svg(start):
        return "image/svg+xml"
    if _HTML_START.match(start) or _HTML_ANYWHERE.search(start):
        return "text/html"
    if guessed:
        # A signature filetype knows that happens to be valid UTF-8; name it rather than call it text.
        return str(guessed)
    return _refine_text(start, declared=declared, filename=filename)


def _is_utf8_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        # Not final: head may end inside a multi-byte character that the rest of the file completes.
        codecs.getincrementaldecoder("utf-8")(errors="strict").decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _is_svg(start: bytes) -> bool:
    if start.startswith(b"<svg"):
        return True
    if start.startswith((b"<?xml", b"<!doctype svg", b"<!--")):
        return _SVG.search(start) is not None
    return False


def _refine_text(start: bytes, *, declared: str, filename: str | None) -> str:
    suffix = PurePosixPath((filename or "").replace("\\", "/")).suffix.lower()
    refined = _EXTENSION_TYPES.get(suffix) or (declared if declared in TEXT_TYPES else "text/plain")
    if refined == "application/json" and not start.startswith((b"{", b"[")):
        return "text/plain"
    return refined


def _normalize_declared(declared_type: str | None) -> str:
    return _canonical((declared_type or "").split(";", 1)[0])


def _canonical(media_type: str) -> str:
    media_type = media_type.strip().lower()
    return _ALIASES.get(media_type, media_type)


def _declared_fits(declared: str, sniffed: str) -> bool:
    if declared in ("", "application/octet-stream") or declared == sniffed:
        return True
    families = {sniffed.split("/", 1)[0]}
    if sniffed in TEXT_TYPES:
        families.add("text")
    top, _, sub = declared.partition("/")
    if sub in ("", "*"):
        return top in families
    if sniffed in TEXT_TYPES:
        return top == "text" or declared in _TEXTUAL_APPLICATION_TYPES
    return False
