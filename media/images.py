"""Images: checked under Pillow's decompression-bomb guard, and normalized for models (orientation
applied, downscaled, re-encoded without metadata). CPU-bound and synchronous: callers run these with
`asyncio.to_thread`. Pure: must never import fastapi, temporalio, sqlalchemy, redis or aiobotocore."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Long edge of the copy models get: fits Anthropic (which downscales past 1568 px itself, slower),
# OpenAI high detail and Gemini inline limits.
MODEL_MAX_EDGE = 1568
# Anthropic refuses base64 images over 5 MB, i.e. 3.75 MB of bytes; the strictest of the providers.
MODEL_MAX_BYTES = 3_750_000
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class ImageRefused(ValueError):
    """An image that cannot be used (a decompression bomb, undecodable); safe to show."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    media_type: str


@dataclass(frozen=True)
class NormalizedImage:
    data: bytes
    media_type: str
    width: int
    height: int


def inspect_image(data: bytes) -> ImageInfo:
    """The image's size and type, after decoding it fully under the bomb guard."""
    with _opened(data) as image:
        info = ImageInfo(image.width, image.height, _FORMATS.get(image.format or "", ""))
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRefused(f"the image cannot be decoded: {exc}") from None
    if not info.media_type:
        raise ImageRefused("the image is in a format that is not accepted")
    return info


def normalize_image(
    data: bytes, *, max_edge: int = MODEL_MAX_EDGE, max_bytes: int = MODEL_MAX_BYTES
) -> NormalizedImage:
    """A copy for models: EXIF orientation applied, long edge at most `max_edge`, re-encoded (PNG
    when it has transparency, else JPEG), at most `max_bytes`. A GIF gives its first frame."""
    with _opened(data) as image:
        try:
            image.seek(0)
            frame = ImageOps.exif_transpose(image)
            frame.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRefused(f"the image cannot be decoded: {exc}") from None
    transparent = frame.mode in ("RGBA", "LA", "PA") or (
        frame.mode == "P" and "transparency" in frame.info
    )
    frame = frame.convert("RGBA" if transparent else "RGB")
    frame.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
    quality = 85
    while True:
        encoded = _encode(frame, transparent, quality)
        if len(encoded) <= max_bytes or max(frame.size) <= 64:
            break
        if not transparent and quality > 55:
            quality -= 15
        else:
            frame = frame.resize(
                (max(1, frame.width * 3 // 4), max(1, frame.height * 3 // 4)),
                Image.Resampling.LANCZOS,
            )
    return NormalizedImage(
        data=encoded,
        media_type="image/png" if transparent else "image/jpeg",
        width=frame.width,
        height=frame.height,
    )


def _encode(frame: Image.Image, transparent: bool, quality: int) -> bytes:
    out = io.BytesIO()
    if transparent:
        frame.save(out, format="PNG", optimize=True)
    else:
        frame.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


@contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """`Image.open` with the bomb guard made strict: Pillow only warns between the limit and twice
    it, and a warning is a refusal here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRefused(
                f"the image has more pixels than the {Image.MAX_IMAGE_PIXELS} allowed"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageRefused(f"the image cannot be decoded: {exc}") from None
        with image:
            try:
                yield image
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageRefused(
                    f"the image has more pixels than the {Image.MAX_IMAGE_PIXELS} allowed"
                ) from None
