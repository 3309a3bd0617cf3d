"""Attachment media without services: types sniffed from bytes, the bomb guard, image normalization,
PDF text."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from core.settings import DEFAULT_ATTACHMENT_TYPES as DEFAULT_ALLOWED_TYPES
from media.documents import pdf_text
from media.images import ImageRefused, inspect_image, normalize_image
from media.types import TextCheck, UnsupportedMediaType, identify
from tests.test_attachments import pdf_with_text, png


def jpeg_rotated(width: int, height: int) -> bytes:
    """A JPEG stored sideways, with EXIF orientation 6 (display rotated 90° clockwise)."""
    image = Image.new("RGB", (width, height), (0, 128, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    return out.getvalue()


@pytest.mark.parametrize(
    ("head", "declared", "filename", "expected"),
    [
        (png(2, 2), "image/png", "a.png", "image/png"),
        (png(2, 2), "", None, "image/png"),
        (png(2, 2), "image", "a", "image/png"),
        (b"%PDF-1.4\n", "application/pdf", "r.pdf", "application/pdf"),
        (b"# Title\n", "text/plain", "notes.md", "text/markdown"),
        (b"a,b\n1,2\n", "text/csv", "t.csv", "text/csv"),
        (b'{"a": 1}', "application/json", "x.json", "application/json"),
        ("héllo".encode()[:2], "text/plain", "x.txt", "text/plain"),  # cut inside a character
    ],
)
def test_types_come_from_the_bytes(
    head: bytes, declared: str, filename: str | None, expected: str
) -> None:
    assert (
        identify(head, declared_type=declared, filename=filename, allowed=DEFAULT_ALLOWED_TYPES)
        == expected
    )


@pytest.mark.parametrize(
    ("head", "declared"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
        (b"<!DOCTYPE html><p>x", "text/plain"),
        (b"hello <script>alert(1)</script>", "text/plain"),
        (b"%PDF-1.4\n", "image/png"),  # declared as another format
        (png(2, 2), "text/plain"),
        (b"\x00\x01\x02binary", ""),
    ],
)
def test_refused_types(head: bytes, declared: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        identify(head, declared_type=declared, filename=None, allowed=DEFAULT_ALLOWED_TYPES)


def test_text_check_follows_a_character_split_across_chunks() -> None:
    encoded = "naïve".encode()
    check = TextCheck()
    check.feed(encoded[:3])
    check.feed(encoded[3:])
    check.finish()
    broken = TextCheck()
    broken.feed(encoded[:3])
    with pytest.raises(UnsupportedMediaType):
        broken.finish()


def test_a_decompression_bomb_is_refused() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        out = io.BytesIO()
        Image.new("1", (20_000, 20_000)).save(out, format="PNG")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with pytest.raises(ImageRefused, match="more pixels"):
        inspect_image(out.getvalue())
    with pytest.raises(ImageRefused, match="more pixels"):
        normalize_image(out.getvalue())


def test_normalizing_applies_orientation_downscales_and_fits_the_byte_limit() -> None:
    rotated = normalize_image(jpeg_rotated(4000, 3000))
    assert (rotated.width, rotated.height) == (1176, 1568)  # upright, long edge 1568
    assert rotated.media_type == "image/jpeg"
    assert Image.open(io.BytesIO(rotated.data)).getexif().get(0x0112) is None

    noisy = Image.effect_noise((2000, 2000), 128).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, format="PNG")
    small = normalize_image(out.getvalue(), max_bytes=200_000)
    assert len(small.data) <= 200_000

    transparent = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(transparent, format="PNG")
    assert normalize_image(transparent.getvalue()).media_type == "image/png"


def test_pdf_text_and_an_image_only_pdf() -> None:
    extracted = pdf_text(pdf_with_text("Hello from page one"))
    assert "Hello from page one" in extracted.text
    assert extracted.pages == 1
    from pypdf import PdfWriter

    blank = io.BytesIO()
    writer = PdfWriter()
    writer.add_blank_page(width=100, height=100)
    writer.write(blank)
    assert pdf_text(blank.getvalue()).text == ""
