"""Test helpers that write good, convertible and broken images, CSVs and a tiny Fashion-Gen h5 file.

Images are small and deterministic (seeded noise plus gradients). The decompression bomb is a hand-made PNG
whose IHDR claims 20000×20000 pixels with an IDAT of a few bytes, so writing it allocates nothing.
The Fashion-Gen files follow the official schema: ``input_image`` (N,256,256,3) uint8, text datasets of shape
(N,1) holding fixed-length byte strings, ``input_productID`` and ``index`` (N,1) integers.
"""

from __future__ import annotations

import csv
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    noise = rng.integers(0, 60, (height, width, 3))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def write_rgb_jpeg(path: Path, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    Image.fromarray(_pixels(*size, seed=seed)).save(path, quality=90)
    return path


def write_rgb_png(path: Path, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    Image.fromarray(_pixels(*size, seed=seed)).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    data = write_rgb_jpeg(path, size=(96, 96)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_png(path: Path) -> Path:
    data = write_rgb_png(path, size=(96, 96)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(7).bytes(2048))
    return path


def write_cmyk_jpeg(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    Image.fromarray(_pixels(*size)).convert("CMYK").save(path, quality=90)
    return path


def write_16bit_png(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    arr = (np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0])).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    img.save(path)
    return path


def write_greyscale_jpeg(path: Path, size: tuple[int, int] = (60, 80)) -> Path:
    Image.fromarray(_pixels(*size)).convert("L").save(path, quality=90)
    return path


def write_rgba_png(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """Left half opaque red, right half fully transparent (which must come out white)."""
    arr = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0, 255)
    Image.fromarray(arr, mode="RGBA").save(path)
    return path


def write_palette_png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    Image.fromarray(_pixels(*size)).convert("P").save(path)
    return path


def write_tiny(path: Path) -> Path:
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_bomb_png(path: Path, size: tuple[int, int] = (20000, 20000)) -> Path:
    """A valid-looking PNG header claiming ``size`` RGB pixels with a tiny IDAT; nothing is allocated."""
    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 2, 0, 0, 0)
    body = (
        _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


BAD_IMAGES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "truncated_jpeg": (write_truncated_jpeg, "truncated.jpg", "truncated"),
    "truncated_png": (write_truncated_png, "truncated.png", "truncated"),
    "zero_byte": (write_zero_byte, "zero.jpg", "empty"),
    "garbage": (write_garbage, "garbage.jpg", "not a readable image"),
    "tiny": (write_tiny, "tiny.png", "too small"),
    "bomb": (write_bomb_png, "bomb.png", "too large"),
}
"""kind -> (writer, file name, words the error message must contain)."""

CONVERTIBLE_IMAGES: dict[str, tuple[Callable[[Path], Path], str, tuple[int, int]]] = {
    "cmyk": (write_cmyk_jpeg, "cmyk.jpg", (40, 30)),
    "16bit": (write_16bit_png, "deep.png", (40, 30)),
    "greyscale": (write_greyscale_jpeg, "grey.jpg", (60, 80)),
    "rgba": (write_rgba_png, "alpha.png", (32, 32)),
    "palette": (write_palette_png, "palette.png", (32, 24)),
}
"""kind -> (writer, file name, (width, height))."""


def write_bad_image(directory: Path, kind: str) -> Path:
    writer, name, _ = BAD_IMAGES[kind]
    return writer(Path(directory) / name)


def write_convertible_image(directory: Path, kind: str) -> Path:
    writer, name, _ = CONVERTIBLE_IMAGES[kind]
    return writer(Path(directory) / name)


CSV_HEADER = ["id", "gender", "masterCategory", "subCategory", "articleType", "productDisplayName", "image"]


def good_rows(n: int = 6) -> list[dict[str, str]]:
    """Rows in the Myntra ``styles.csv`` shape; ``image`` is relative to the CSV's folder."""
    kinds = [
        ("Apparel", "Topwear", "Tshirts"),
        ("Footwear", "Shoes", "Casual Shoes"),
        ("Accessories", "Bags", "Backpacks"),
    ]
    rows = []
    for i in range(n):
        cat, sub, art = kinds[i % len(kinds)]
        rows.append(
            {
                "id": str(100 + i),
                "gender": "Men",
                "masterCategory": cat,
                "subCategory": sub,
                "articleType": art,
                "productDisplayName": f"Brand{i} Men Navy Blue Cotton {art} Regular Fit Model {i}",
                "image": f"images/{100 + i}.jpg",
            }
        )
    return rows


def write_csv_dataset(
    root: Path, rows: list[dict[str, str]] | None = None, header: list[str] | None = None
) -> Path:
    """Write ``root/styles.csv`` and a good JPEG ``root/images/<id>.jpg`` per row; returns the CSV path."""
    rows = good_rows() if rows is None else rows
    header = header or CSV_HEADER
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if row.get("id"):
            write_rgb_jpeg(root / "images" / f"{row['id']}.jpg", seed=i)
    path = root / "styles.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


FASHIONGEN_PRODUCTS = {
    "train": [(1001, "TOPS", "SHIRTS"), (1002, "JEANS", "SLIM JEANS"), (1003, "SWEATERS", "CREWNECKS")],
    "validation": [(2001, "TOPS", "T-SHIRTS"), (2002, "SHOES", "SNEAKERS")],
}


def write_fashiongen(directory: Path, *, poses: int = 2, overlap: bool = False) -> list[Path]:
    """Write ``fashiongen_256_256_{train,validation}.h5`` with the official schema; returns both paths.

    Train holds 3 products and validation 2, each with ``poses`` images. Product 1001's description contains
    the Latin-1 byte ``b"caf\\xe9"``. With ``overlap``, validation also holds product 1003 (bad input).
    """
    import h5py

    paths = []
    index = 0
    for part, products in FASHIONGEN_PRODUCTS.items():
        if overlap and part == "validation":
            products = [*products, FASHIONGEN_PRODUCTS["train"][2]]
        rows = [(p, pose) for p in products for pose in range(1, poses + 1)]
        n = len(rows)
        images = np.zeros((n, 256, 256, 3), dtype=np.uint8)
        desc, name, cat, sub, pose_s = [], [], [], [], []
        for i, ((pid, category, subcategory), pose) in enumerate(rows):
            images[i] = _pixels(256, 256, seed=pid * 10 + pose)
            text = f"Long sleeve {subcategory.lower()} by maker {pid} in cotton. Pose {pose}."
            desc.append((b"Caf\xe9 cr\xe8me shirt. " if pid == 1001 else b"") + text.encode())
            name.append(f"Maker {pid} {subcategory.title()}".encode())
            cat.append(category.encode())
            sub.append(subcategory.encode())
            pose_s.append(f"id_gridfs_{pose}".encode())
        path = Path(directory) / f"fashiongen_256_256_{part}.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("input_image", data=images)
            for key, values, width in (
                ("input_description", desc, 400),
                ("input_name", name, 80),
                ("input_category", cat, 40),
                ("input_subcategory", sub, 40),
                ("input_pose", pose_s, 20),
            ):
                h5.create_dataset(key, data=np.array(values, dtype=f"S{width}").reshape(n, 1))
            h5.create_dataset(
                "input_productID", data=np.array([r[0][0] for r in rows], dtype=np.int64).reshape(n, 1)
            )
            h5.create_dataset("index", data=np.arange(index, index + n, dtype=np.int64).reshape(n, 1))
        index += n
        paths.append(path)
    return paths


ITC_TASKS = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"
"""The seven tasks plus ITC: a pre-trained model with a dual-encoder space."""


def pretrain_itc_run(root: Path, config: Callable[..., object], *, products: int, seed: int,
                     extra: tuple[str, ...] = ()) -> Path:
    """A synthetic catalogue of ``products`` under ``root/catalogue``, its tiny-preset feature store
    (``root/store``) and a pre-training run with ITC in ``root/run/pretrain``; ``config(root, *overrides)`` builds
    the run config. Returns ``root``."""
    from kaleido_bert.config import load_config
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    synthesize(root / "catalogue", products=products, seed=seed, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    pretrain(config(root, ITC_TASKS, *extra), root / "run" / "pretrain", progress=False)
    return root


def tiny_config_on(root: Path, sets: list[str], *extra: str):
    """The tiny preset with ``sets`` and ``extra`` on the catalogue and store under ``root``."""
    from kaleido_bert.config import load_config

    return load_config("tiny", [*sets, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                *extra])
