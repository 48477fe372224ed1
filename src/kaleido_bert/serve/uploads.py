"""Validation of an image uploaded to the search service (``POST /api/search/image``, ``/api/caption``, ...).

An upload is refused, cheapest check first, when it is empty or over the byte limit, declares a content type
other than JPEG, PNG or WebP, does not start with the magic bytes of one of those formats (or starts with those
of another format than the one it declares), has a header promising more pixels than the decompression-bomb
guard allows, or is truncated or corrupt. The header and integrity checks are those of
:mod:`kaleido_bert.data.images` (:func:`~kaleido_bert.data.images.inspect_image_bytes`), so an upload and a catalogue
image are held to the same rules. A good upload comes back as an RGB image whatever its mode (CMYK, greyscale,
palette and alpha images are converted, alpha on white).
"""

from __future__ import annotations

from PIL import Image

from kaleido_bert.data.images import (
    MIN_SIDE,
    ImageProblem,
    ImageTooLarge,
    inspect_image_bytes,
    load_rgb_bytes,
)
from kaleido_bert.errors import KaleidoError

MAX_UPLOAD_BYTES = 8 * 2**20
"""Default byte limit of one upload (8 MiB)."""
MAX_UPLOAD_PIXELS = 40_000_000
"""Default pixel limit of one upload (the catalogue's decompression-bomb guard)."""

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP"}
"""Accepted content types and the format each names."""
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
_UNDECLARED = {"", "application/octet-stream"}
_PIL_FORMATS = {"JPEG": ("JPEG", "MPO"), "PNG": ("PNG",), "WebP": ("WEBP",)}


class UploadError(KaleidoError):
    """An upload the service refuses; ``status`` is the HTTP status code that answers it.

    Attributes:
        status: 400 (empty, corrupt, mismatched), 413 (too many bytes or pixels) or 415 (unsupported type).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """The format named by the magic bytes at the start of ``data``: ``"JPEG"``, ``"PNG"``, ``"WebP"`` or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _declared_format(content_type: str | None, filename: str) -> str | None:
    """The format a content type declares; None when it declares nothing (missing or octet-stream)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    media = _ALIASES.get(media, media)
    if media in _UNDECLARED:
        return None
    if media not in FORMATS:
        accepted = ", ".join(FORMATS)
        raise UploadError(f"{filename}: content type {media!r} is not supported (send {accepted})", status=415)
    return FORMATS[media]


def read_upload(
    data: bytes,
    *,
    content_type: str | None,
    filename: str = "upload",
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_UPLOAD_PIXELS,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Check an uploaded image and decode it as RGB.

    Args:
        data: the uploaded bytes.
        content_type: the declared media type (``Content-Type`` of the multipart part); None or
            ``application/octet-stream`` means undeclared, and the magic bytes decide.
        filename: the client's file name, used only in error messages.
        max_bytes: largest accepted upload in bytes.
        max_pixels: largest accepted width × height, checked from the header before decoding.
        min_side: smallest accepted side in pixels.

    Returns:
        The decoded image in RGB mode (EXIF orientation applied).

    Raises:
        UploadError: one line naming ``filename``; ``.status`` is the HTTP status to answer with.
    """
    filename = filename or "upload"
    if not data:
        raise UploadError(f"{filename}: the upload is empty (0 bytes)", status=400)
    if len(data) > max_bytes:
        raise UploadError(
            f"{filename}: the upload is {len(data):,} bytes; the limit is {max_bytes:,} bytes", status=413
        )
    declared = _declared_format(content_type, filename)
    actual = sniff_format(data)
    if actual is None:
        raise UploadError(f"{filename}: not a JPEG, PNG or WebP image (unrecognised file signature)", status=415)
    if declared is not None and declared != actual:
        raise UploadError(f"{filename}: declared as {declared} but the file is a {actual} image", status=400)
    try:
        info = inspect_image_bytes(data, name=filename, max_pixels=max_pixels, min_side=min_side)
        if info.format not in _PIL_FORMATS[actual]:
            raise UploadError(f"{filename}: the file starts like a {actual} image but decodes as {info.format}")
        return load_rgb_bytes(data, name=filename, max_pixels=max_pixels, min_side=min_side)
    except ImageTooLarge as err:
        raise UploadError(str(err), status=413) from None
    except ImageProblem as err:
        raise UploadError(str(err), status=400) from None
