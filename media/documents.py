"""PDF text, for models that take no documents. CPU-bound and synchronous: callers run it with
`asyncio.to_thread`. Pure: must never import fastapi, temporalio, sqlalchemy, redis or aiobotocore."""

from __future__ import annotations

import io
from dataclasses import dataclass

from pypdf import PdfReader
from pypdf.errors import PdfReadError


class DocumentRefused(ValueError):
    """A PDF that cannot be read (encrypted, damaged); safe to show."""


@dataclass(frozen=True)
class PdfText:
    text: str  # empty for a PDF of scanned pages: callers say so rather than send nothing
    pages: int
    truncated: bool


def pdf_text(data: bytes, *, max_chars: int = 200_000) -> PdfText:
    """The text layer of a PDF, page by page, cut at `max_chars`."""
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentRefused("the PDF is encrypted")
        pieces: list[str] = []
        length = 0
        truncated = False
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            if not text:
                continue
            if length + len(text) > max_chars:
                pieces.append(text[: max(0, max_chars - length)])
                truncated = True
                break
            pieces.append(text)
            length += len(text) + 2
        return PdfText("\n\n".join(pieces), len(reader.pages), truncated)
    except DocumentRefused:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentRefused(f"the PDF cannot be read: {exc}") from None
