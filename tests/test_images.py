"""Image validation and loading: bad files give one-line ImageProblems, odd modes load as RGB, no bombs."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from fixtures import (
    BAD_IMAGES,
    CONVERTIBLE_IMAGES,
    write_bad_image,
    write_bomb_png,
    write_convertible_image,
    write_rgb_jpeg,
    write_rgb_png,
)
from kaleido_bert.data.images import ImageProblem, inspect_image, load_rgb


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_is_one_line_problem_naming_the_file(tmp_path, kind):
    path = write_bad_image(tmp_path, kind)
    words = BAD_IMAGES[kind][2]
    for fn in (inspect_image, load_rgb):
        with pytest.raises(ImageProblem) as info:
            fn(path)
        message = str(info.value)
        assert path.name in message and words in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ImageProblem, match="not found.*nope.jpg"):
        inspect_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("kind", sorted(CONVERTIBLE_IMAGES))
def test_convertible_images_load_as_rgb(tmp_path, kind):
    path = write_convertible_image(tmp_path, kind)
    size = CONVERTIBLE_IMAGES[kind][2]
    info = inspect_image(path)
    assert (info.width, info.height) == size and info.notes
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == size


def test_rgba_is_composited_on_white(tmp_path):
    img = np.asarray(load_rgb(write_convertible_image(tmp_path, "rgba")))
    assert tuple(img[5, 2]) == (255, 0, 0)
    assert tuple(img[5, 30]) == (255, 255, 255)


def test_16bit_keeps_its_range(tmp_path):
    img = np.asarray(load_rgb(write_convertible_image(tmp_path, "16bit")))
    assert img.min() < 5 and img.max() > 250


def test_good_images_pass_without_notes(tmp_path):
    for path in (write_rgb_jpeg(tmp_path / "a.jpg"), write_rgb_png(tmp_path / "a.png")):
        info = inspect_image(path)
        assert (info.width, info.height, info.mode, info.notes) == (48, 64, "RGB", [])


def test_bomb_is_refused_quickly_without_allocating(tmp_path):
    path = write_bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for fn in (inspect_image, load_rgb):
        with pytest.raises(ImageProblem, match="too large.*bomb.png"):
            fn(path)
    assert time.perf_counter() - start < 1.0
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000
    )  # kB: far below 1.2 GB of pixels


def test_header_above_max_pixels_but_below_pil_limit(tmp_path):
    path = write_bomb_png(tmp_path / "big.png", size=(7000, 7000))
    with pytest.raises(ImageProblem, match="too large: 7000x7000.*big.png"):
        inspect_image(path)


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_with_valid_chunks_but_short_pixel_data(tmp_path):
    rows = b"".join(b"\x00" + bytes(range(20)) for _ in range(20))
    good, short = tmp_path / "good.png", tmp_path / "short.png"
    good.write_bytes(_png(20, 20, zlib.compress(rows)))
    short.write_bytes(_png(20, 20, zlib.compress(rows[:-30])))
    assert inspect_image(good).mode == "L"
    with pytest.raises(ImageProblem, match="truncated or corrupt.*short.png"):
        inspect_image(short)


def test_truncated_multi_picture_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(2)]
    path = tmp_path / "phone.mpo"
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 4])
    with pytest.raises(ImageProblem, match="phone.mpo"):
        inspect_image(path)
