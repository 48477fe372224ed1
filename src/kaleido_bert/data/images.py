"""Image validation and loading for catalogue images (the input side of paper §3.2).

Validation reads the header only (size, mode, format) and bounds the pixel count before any decoding, so a
decompression bomb (a 20000×20000 PNG of a few kB) is refused without allocating it. Integrity (a truncated
file) is then checked cheaply: JPEGs are decoded in draft mode at 1/8 scale, PNGs are walked chunk by chunk
(CRCs) and their compressed pixel stream is inflated into a counter (no pixel buffer), GIFs are walked block by
block to their trailer byte (0x3B), WebP files must hold every chunk their RIFF header promises, and any other
format has its first frame decoded (its size is bounded by then).
Loading returns an RGB ``PIL.Image`` whatever the source mode: CMYK, 16-bit, greyscale, palette and alpha images
are converted (alpha is composited on white, the background of product photos).
The ``*_bytes`` variants apply the same checks to an image held in memory (an upload, see
:mod:`kaleido_bert.serve.uploads`). :func:`load_rgb` can also check the file against the content hash a
catalogue recorded for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kaleido_bert.errors import KaleidoError

MAX_PIXELS = 40_000_000
"""Largest accepted image (about 6300×6300); larger headers are refused before decoding."""
MIN_SIDE = 16
"""Smallest accepted side in pixels (the Myntra thumbnails are 60×80)."""


class ImageProblem(KaleidoError):
    """An image that cannot be used: missing, empty, unreadable, truncated, too small or too large."""


class ImageTooLarge(ImageProblem):
    """An image whose header promises more pixels than the decompression-bomb guard allows."""


@dataclass
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str | None
    notes: list[str] = field(default_factory=list)
    """Conversions that loading will apply (e.g. ``CMYK converted to RGB``)."""


def _open_header(source: Path | BinaryIO, label: str, max_pixels: int, min_side: int) -> Image.Image:
    """Open lazily (header only) and bound the size before anything is decoded; ``label`` names the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)  # lazy: reads the header only
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image too large to open safely: {label}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        short = _riff_truncation(source)  # Pillow's WebP decoder fails at open on a cut file
        if short:
            raise ImageProblem(f"image is truncated or corrupt ({short}): {label}") from None
        raise ImageProblem(f"not a readable image ({type(err).__name__}): {label}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"image too large: {w}x{h} exceeds {max_pixels:,} pixels (decompression-bomb guard): {label}"
        )
    if min(w, h) < min_side:
        img.close()
        raise ImageProblem(f"image too small: {w}x{h}, need at least {min_side} px per side: {label}")
    return img


def _open_checked(path: Path, max_pixels: int, min_side: int) -> Image.Image:
    if not path.is_file():
        raise ImageProblem(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageProblem(f"image file is empty (0 bytes): {path}")
    return _open_header(path, str(path), max_pixels, min_side)


def _open_bytes(data: bytes, name: str, max_pixels: int, min_side: int) -> Image.Image:
    if not data:
        raise ImageProblem(f"image is empty (0 bytes): {name}")
    return _open_header(io.BytesIO(data), name, max_pixels, min_side)


def _conversion_notes(mode: str) -> list[str]:
    if mode == "RGB":
        return []
    if mode in ("RGBA", "LA", "PA", "RGBa") or mode == "P":
        return [f"{mode} converted to RGB (transparency composited on white)"]
    if mode.startswith("I") or mode == "F":
        return [f"{mode} (high bit depth) scaled to 8-bit RGB"]
    return [f"{mode} converted to RGB"]


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(ihdr: bytes) -> int:
    """Bytes of filtered scanlines the IHDR promises (each row is one filter byte plus the packed samples)."""
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    channels = _PNG_CHANNELS.get(color, 4)

    def rows(pw: int, ph: int) -> int:
        return ph * (1 + (pw * channels * depth + 7) // 8) if pw and ph else 0

    if not interlace:
        return rows(w, h)
    return sum(rows((w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


def _check_png_pixel_stream(fh: BinaryIO) -> None:
    """Inflate the IDAT stream 1 MiB at a time into a byte count; compare it with what the IHDR promises."""
    expected, produced = 0, 0
    inflate = zlib.decompressobj()
    fh.seek(8)
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise OSError("PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        if kind == b"IHDR":
            expected = _png_raw_size(fh.read(length))
            fh.seek(4, 1)
            continue
        if kind != b"IDAT" or produced >= expected:
            fh.seek(length + 4, 1)
            continue
        data = fh.read(length)
        fh.seek(4, 1)
        while data and produced < expected:
            produced += len(inflate.decompress(data, 1 << 20))
            data = inflate.unconsumed_tail
    if produced < expected:
        raise OSError(f"pixel data ends early: {produced:,} of {expected:,} bytes")


def _read_exactly(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) < n:
        raise OSError(f"{what} ends early (truncated)")
    return data


def _check_gif_blocks(fh: BinaryIO) -> None:
    """Walk a GIF's extensions and image blocks (their data sub-blocks included) up to the trailer 0x3B."""
    screen = _read_exactly(fh, 13, "GIF header")
    if screen[10] & 0x80:  # global colour table
        _read_exactly(fh, 3 * (2 << (screen[10] & 7)), "GIF colour table")
    while True:
        kind = _read_exactly(fh, 1, "GIF before its trailer")[0]
        if kind == 0x3B:
            return
        if kind == 0x21:  # extension: label, then sub-blocks
            _read_exactly(fh, 1, "GIF extension")
        elif kind == 0x2C:  # image: descriptor, local colour table, LZW code size, then sub-blocks
            descriptor = _read_exactly(fh, 9, "GIF image descriptor")
            if descriptor[8] & 0x80:
                _read_exactly(fh, 3 * (2 << (descriptor[8] & 7)), "GIF colour table")
            _read_exactly(fh, 1, "GIF image data")
        else:
            raise OSError(f"unknown GIF block 0x{kind:02x} (corrupt or truncated)")
        while size := _read_exactly(fh, 1, "GIF data block")[0]:
            _read_exactly(fh, size, "GIF data block")


def _check_riff_chunks(fh: BinaryIO) -> None:
    """A WebP file must be as long as its RIFF header says and every chunk must fit inside it."""
    file_size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    head = _read_exactly(fh, 12, "WebP header")
    end = 8 + struct.unpack("<I", head[4:8])[0]
    if head[:4] != b"RIFF" or head[8:] != b"WEBP":
        raise OSError("not a RIFF WebP file")
    if end > file_size:
        raise OSError(f"RIFF header promises {end:,} bytes, the file has {file_size:,} (truncated)")
    pos = 12
    while pos + 8 <= end:
        fh.seek(pos)
        size = struct.unpack("<I", _read_exactly(fh, 8, "WebP chunk")[4:])[0]
        pos += 8 + size + (size & 1)
    if pos < end - 1 or pos > end + 1:  # the last chunk's pad byte may or may not be counted
        raise OSError(f"WebP chunks end at byte {pos:,}, the RIFF header says {end:,}")


def _riff_truncation(source: Path | BinaryIO) -> str | None:
    """Why a RIFF WebP file is cut short, or None (not WebP, or whole)."""
    with open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source) as fh:
        fh.seek(0)
        head = fh.read(12)
        if head[:4] != b"RIFF" or head[8:] != b"WEBP":
            return None
        try:
            _check_riff_chunks(fh)
        except (OSError, struct.error) as err:
            return str(err)
    return None


_STREAM_CHECKS = {"PNG": _check_png_pixel_stream, "GIF": _check_gif_blocks, "WEBP": _check_riff_chunks}
"""Formats whose whole stream is walked without decoding pixels (PNG after ``verify()``, which checks CRCs)."""


def _inspect_opened(img: Image.Image, source: Path | bytes, label: str) -> ImageInfo:
    """The integrity pass on a header-checked image (closes it); ``source`` is re-read for the stream walks."""
    info = ImageInfo(img.width, img.height, img.mode, img.format, _conversion_notes(img.mode))
    try:
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # decodes at 1/8 scale; a truncated stream raises here
        elif img.format in _STREAM_CHECKS:
            if img.format == "PNG":
                img.verify()  # walks the chunks (CRCs, end marker); CRC-valid chunks can still hold too few pixels
            with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as fh:
                fh.seek(0)
                _STREAM_CHECKS[img.format](fh)
        else:
            img.load()  # BMP, TIFF, …: the first frame decoded (the header check bounded its size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, zlib.error, struct.error) as err:
        raise ImageProblem(f"image is truncated or corrupt ({str(err).splitlines()[0][:80]}): {label}") from None
    finally:
        img.close()
    return info


def inspect_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> ImageInfo:
    """Validate an image from its header plus a cheap integrity pass; never a full-resolution decode.

    Raises:
        ImageProblem: one line naming the file and what is wrong with it (:class:`ImageTooLarge` for the
            decompression-bomb guard).
    """
    path = Path(path)
    return _inspect_opened(_open_checked(path, max_pixels, min_side), path, str(path))


def inspect_image_bytes(
    data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> ImageInfo:
    """:func:`inspect_image` for an image held in memory; ``name`` is what the error messages call it.

    Raises:
        ImageProblem: one line naming ``name`` and what is wrong (:class:`ImageTooLarge` for the bomb guard).
    """
    return _inspect_opened(_open_bytes(data, name, max_pixels, min_side), data, name)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha on white, 16/32-bit scaled, CMYK via PIL's conversion)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def downscale(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """The image with its longer side at most ``max_side`` (aspect kept, PIL's default filter) and the scale.

    The one resize of ``features.max_side``: feature extraction, uploaded photos and the catalogue's
    scaled views (:mod:`kaleido_bert.data.views`) all go through it, so a view's features are the original's
    extracted at that ``max_side``."""
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image, scale


def _decode_rgb(img: Image.Image, label: str) -> Image.Image:
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(f"image is truncated or corrupt ({str(err).splitlines()[0][:80]}): {label}") from None


def load_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
             sha256: str | None = None) -> Image.Image:
    """Load an image as RGB with the EXIF orientation applied, refusing bombs and tiny images first.

    Args:
        sha256: the content hash the file must have (a catalogue's record of it); None skips the check.

    Raises:
        ImageProblem: missing, empty, unreadable, truncated, too small or too large, or another content than
            ``sha256`` (one line, names the file).
    """
    path = Path(path)
    if sha256 is None:
        return _decode_rgb(_open_checked(path, max_pixels, min_side), str(path))
    _open_checked(path, max_pixels, min_side).close()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageProblem(f"image changed after the catalogue was written (its SHA-256 differs from the one in "
                           f"catalogue.jsonl: re-import the catalogue): {path}")
    return _decode_rgb(_open_bytes(data, str(path), max_pixels, min_side), str(path))


def load_rgb_bytes(
    data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> Image.Image:
    """:func:`load_rgb` for an image held in memory; ``name`` is what the error messages call it.

    Raises:
        ImageProblem: empty, unreadable, truncated, too small or too large (one line, names ``name``).
    """
    return _decode_rgb(_open_bytes(data, name, max_pixels, min_side), name)
