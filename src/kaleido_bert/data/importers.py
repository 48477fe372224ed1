"""Importers that turn product data into a self-contained catalogue (format: :mod:`kaleido_bert.data.catalogue`).

Two sources:

* a CSV (e.g. Myntra ``styles.csv``) with one row per image plus a folder of images, read by
  :func:`kaleido_bert.data.csvfile.read_csv_table` (UTF-16/32 decoded, cells decoded one by one with UTF-8 first
  and Latin-1 as the fallback, an unterminated quote reported at its line without swallowing the rows after it).
  Rows are numbered as in a spreadsheet: the header is row 1, the first data row is row 2. Images are validated
  from their header (:func:`kaleido_bert.data.images.inspect_image`) and the file a path resolves to (through
  any symlink) is hard-linked (or copied) to ``out/images/<id><ext>``.
* the official Fashion-Gen h5 files (``fashiongen_256_256_{train,validation}.h5``), read in chunks; each image
  is written as a JPEG (quality 95) to ``out/images/<productID>_<index>.jpg``. Rows are numbered from 0, as
  h5 indexes them. The validation file becomes the ``test`` split (paper §4.1); ``val`` is carved out of the
  training products.

With ``on_error="skip"`` a bad row is left out, recorded in ``problems.jsonl`` as ``{"row", "id", "problem",
"level": "error"}`` and reported on stderr; with ``on_error="fail"`` the first bad row raises
:class:`~kaleido_bert.errors.KaleidoError` and nothing is left at ``out``. Images that only need converting
(CMYK, 16-bit, greyscale, alpha, palette) are kept and recorded with ``"level": "warning"``. The summary
counts every row read (imported + skipped) and notes the encoding. A failed write (a full disk) is one line
naming the path, and nothing is left at ``out``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from kaleido_bert.atomic import atomic_directory, one_line_os_errors, with_path
from kaleido_bert.data.catalogue import (
    PROBLEMS_FILE,
    CatalogueError,
    Item,
    assign_splits,
    clean_text,
    write_catalogue,
)
from kaleido_bert.data.csvfile import read_csv_table
from kaleido_bert.data.images import MIN_SIDE, ImageProblem, inspect_image
from kaleido_bert.errors import KaleidoError

IMAGE_DIR = "images"
DEFAULT_IMAGE_COL = "image"
TITLE_WORDS = 8
"""Without a title column, the title is the description's first words."""
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
FASHIONGEN_CHUNK = 256
"""Rows read from an h5 file at once (256 images of 256×256×3 are 50 MB)."""


class BadRow(Exception):
    """One unusable row, raised inside an importer, which skips it or turns it into a KaleidoError."""


@dataclass
class ImportReport:
    """What an import did: where the catalogue went, row counts, the problem records and the stats."""

    out: Path
    imported: int
    skipped: int
    converted: int
    problems: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """One line each: the source's encoding, rows left out before they were rows."""

    def summary(self) -> str:
        """A few human-readable lines for the CLI."""
        splits = self.stats.get("splits", {})
        lines = [
            f"imported {self.imported:,} items ({self.stats.get('products', 0):,} products, "
            f"{self.stats.get('categories', 0)} categories, "
            f"{self.stats.get('subcategories', 0)} sub-categories) "
            f"into {self.out}",
            "splits: " + ", ".join(f"{name} {count:,}" for name, count in splits.items()),
        ]
        if self.converted:
            lines.append(f"converted on load: {self.converted:,} images (not RGB; kept, see {PROBLEMS_FILE})")
        if self.skipped:
            lines.append(f"skipped: {self.skipped:,} bad rows (listed in {self.out / PROBLEMS_FILE})")
        lines.append(f"rows read: {self.imported + self.skipped:,} = {self.imported:,} imported + "
                     f"{self.skipped:,} skipped")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


class _Problems:
    """Collects problem records; in fail mode the first bad row raises instead."""

    def __init__(self, on_error: str, source: str) -> None:
        if on_error not in ("fail", "skip"):
            raise KaleidoError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.skip = on_error == "skip"
        self.source = source
        self.records: list[dict[str, Any]] = []
        self.skipped = 0
        self.converted = 0

    def bad(self, row: int, item_id: str, message: str, **extra: Any) -> None:
        where = f"{self.source} row {row} (id {item_id or '?'})"
        if not self.skip:
            raise KaleidoError(f"{where}: {message}")
        self.skipped += 1
        self.records.append({"row": row, "id": item_id, "problem": message, "level": "error", **extra})
        tqdm.write(f"skipped {where}: {message}", file=sys.stderr)

    def warn(self, row: int, item_id: str, message: str, **extra: Any) -> None:
        self.converted += 1
        self.records.append({"row": row, "id": item_id, "problem": message, "level": "warning", **extra})


def _text(value: Any, what: str, item_id: str) -> str:
    try:
        return clean_text(value, what=what, item_id=item_id)
    except CatalogueError:
        raise BadRow(f"{what} is empty or whitespace-only") from None


def _optional_text(value: Any, what: str, item_id: str) -> str:
    """Like :func:`_text` but a blank value gives ``""``."""
    try:
        return _text(value, what, item_id)
    except BadRow:
        return ""


def _title_from(description: str) -> str:
    return " ".join(description.split()[:TITLE_WORDS])


def _file_stem(item_id: str) -> str:
    """A safe file name for an id; ids that needed changing get a hash suffix so they cannot collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)
    if stem != item_id or stem.startswith("."):
        stem = f"{stem.lstrip('.')}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"
    return stem


def _place(src: Path, dst: Path) -> None:
    """Hard-link the file ``src`` resolves to (never a symlink itself) to ``dst``, else copy it."""
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        try:
            shutil.copy2(src, dst)
        except OSError as err:
            raise (with_path(err, dst) if err.filename is None else err) from None


def _finish(out: Path, tmp: Path, items: list[Item], problems: _Problems, source: str) -> ImportReport:
    if not items:
        errors = [p for p in problems.records if p["level"] == "error"]
        first = f"row {errors[0]['row']} (id {errors[0]['id']}): {errors[0]['problem']}" if errors else ""
        raise KaleidoError(f"no usable rows in {source}" + (f" (first problem: {first})" if first else ""))
    stats = write_catalogue(tmp, items, problems.records)
    return ImportReport(out=out, imported=len(items), skipped=problems.skipped, converted=problems.converted,
                        problems=problems.records, stats=stats)


def _writing(out: Path):
    """OSError while building ``out`` (a full disk) → one line; atomic_directory has removed the partial."""
    return one_line_os_errors(f"import into {out} stopped, nothing was written there")


# ----------------------------------------------------------------------------------------------- CSV


def _find_image(value: str, item_id: str, images: Path, csv_dir: Path) -> Path:
    if value:
        tries = list(dict.fromkeys([images / value, csv_dir / value, images / Path(value).name]))
    else:
        tries = [images / f"{item_id}{ext}" for ext in (".jpg", ".png", ".jpeg")]
    for path in tries:
        if path.is_file():
            return path
    elsewhere = f" (nor {', '.join(map(str, tries[1:]))})" if value and len(tries) > 1 else ""
    raise BadRow(f"image file not found: {tries[0]}" + (elsewhere if value else " (nor .png, .jpeg)"))


def _map_split(value: str) -> str:
    split = SPLIT_NAMES.get(value.strip().lower())
    if split is None:
        raise BadRow(f"split {value!r} is not one of train, val (valid, validation), test")
    return split


def import_csv(csv_path: str | Path, *, images: str | Path, out: str | Path, id_col: str = "id",
               text_col: str = "productDisplayName", title_col: str | None = None,
               category_col: str = "masterCategory", subcategory_col: str = "articleType",
               image_col: str | None = "image", product_col: str | None = None, split_col: str | None = None,
               on_error: str = "fail", overwrite: bool = False, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> ImportReport:
    """Import a product CSV and its images into a catalogue directory.

    Args:
        csv_path: the CSV file (header row, one row per image).
        images: folder the image paths are relative to; a path not found there is tried relative to the CSV's
            folder. Without an image column (or with an empty cell) the image is ``images/<id>.jpg``
            (then ``.png``, ``.jpeg``). The default ``image`` column may be missing from the CSV (images are
            then found by id); any other named column must exist.
        out: the catalogue directory to create.
        id_col, text_col, title_col, category_col, subcategory_col, image_col, product_col, split_col: column
            names. Without ``title_col`` the title is the description's first 8 words; without ``product_col``
            every row is its own product; without ``split_col`` products are split with
            :func:`~kaleido_bert.data.catalogue.assign_splits`.
        on_error: ``"fail"`` (raise on the first bad row, leave nothing) or ``"skip"`` (record and leave out).
        overwrite: replace an existing ``out`` (only once the import has succeeded).
        val_fraction, test_fraction, seed: the product split when there is no split column.
        progress: show a progress bar.

    Returns:
        The :class:`ImportReport`.

    Raises:
        KaleidoError: a missing column (even with ``skip``), an existing ``out`` without ``overwrite``, no
            usable row, or (with ``fail``) the first bad row, named by row number and id.
    """
    csv_path, images, out = Path(csv_path), Path(images), Path(out)
    table = read_csv_table(csv_path)
    header = table.header
    if image_col == "" or (image_col == DEFAULT_IMAGE_COL and image_col not in header):
        image_col = None  # Kaggle's full styles.csv has no image column: its images are <id>.jpg
    col = table.columns([id_col, text_col, category_col, subcategory_col, title_col, image_col, product_col,
                         split_col], csv_path.name)
    problems = _Problems(on_error, csv_path.name)
    seen_ids: dict[str, int] = {}
    product_split: dict[str, tuple[str, int]] = {}
    items: list[Item] = []
    with _writing(out), atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / IMAGE_DIR).mkdir()
        for row in tqdm(table.rows, desc=f"import {csv_path.name}", unit="row", disable=not progress):
            row_no, cells, item_id = row.number, row.cells, ""
            try:
                if len(cells) > col[id_col]:
                    item_id = _optional_text(cells[col[id_col]], "id", "?")
                if row.problem:
                    raise BadRow(row.problem)
                if len(cells) != len(header):
                    raise BadRow(f"row has {len(cells)} fields, the header has {len(header)}")
                cell = {name: cells[i] for name, i in col.items()}
                if not item_id:
                    raise BadRow("id is empty")
                if item_id in seen_ids:
                    raise BadRow(f"duplicate id {item_id} (first in row {seen_ids[item_id]})")
                seen_ids[item_id] = row_no
                description = _text(cell[text_col], "description", item_id)
                title = _optional_text(cell[title_col], "title", item_id) if title_col else ""
                product = _text(cell[product_col], "product id", item_id) if product_col else item_id
                split = "train"
                if split_col is not None:
                    split = _map_split(_text(cell[split_col], "split", item_id))
                    first, first_row = product_split.setdefault(product, (split, row_no))
                    if first != split:
                        raise BadRow(
                            f"product {product} is in split {first} (row {first_row}), this row says {split}"
                        )
                value = _optional_text(cell[image_col], "image", item_id) if image_col else ""
                src = _find_image(value, item_id, images, csv_path.parent)
                try:
                    info = inspect_image(src)
                except ImageProblem as err:
                    raise BadRow(str(err)) from None
                item = Item(id=item_id, product_id=product, image="", title=title or _title_from(description),
                            description=description, category=_text(cell[category_col], "category", item_id),
                            subcategory=_text(cell[subcategory_col], "sub-category", item_id), split=split)
            except BadRow as err:
                problems.bad(row_no, item_id, str(err))
                continue
            for note in info.notes:
                problems.warn(row_no, item_id, f"converted: {note}")
            ext = src.resolve().suffix.lower() or f".{(info.format or 'img').lower().replace('jpeg', 'jpg')}"
            item.image = f"{IMAGE_DIR}/{_file_stem(item_id)}{ext}"
            _place(src, tmp / item.image)
            items.append(item)
        if split_col is None:
            by_product = assign_splits((it.product_id for it in items), val_fraction=val_fraction,
                                       test_fraction=test_fraction, seed=seed)
            for it in items:
                it.split = by_product[it.product_id]
        report = _finish(out, tmp, items, problems, csv_path.name)
    report.notes = table.notes
    return report


# ----------------------------------------------------------------------------------------------- Fashion-Gen

FASHIONGEN_REQUIRED = ("input_image", "input_description", "input_category", "input_subcategory",
                       "input_productID")
FASHIONGEN_OPTIONAL = ("input_name", "input_pose", "index")


def _fashiongen_datasets(h5: Any, path: Path) -> dict[str, Any]:
    names = sorted(h5.keys())
    for key in FASHIONGEN_REQUIRED:
        if key not in h5:
            raise KaleidoError(f"{path.name}: dataset {key!r} not found; datasets: {', '.join(names)}")
    sets = {key: h5[key] for key in (*FASHIONGEN_REQUIRED, *FASHIONGEN_OPTIONAL) if key in h5}
    image = sets["input_image"]
    if image.ndim != 4 or image.shape[3] != 3 or image.dtype != np.uint8:
        raise KaleidoError(f"{path.name}: input_image must be (N, H, W, 3) uint8, not {image.shape} "
                           f"{image.dtype}")
    if min(image.shape[1:3]) < MIN_SIDE:
        raise KaleidoError(f"{path.name}: images are {image.shape[2]}x{image.shape[1]}, need {MIN_SIDE} px "
                           "a side")
    for key, ds in sets.items():
        if ds.shape[0] != image.shape[0]:
            raise KaleidoError(f"{path.name}: {key} has {ds.shape[0]} rows, input_image has {image.shape[0]}")
    return sets


def _column(chunk: dict[str, np.ndarray], key: str, i: int) -> Any:
    value = chunk[key][i]
    return value.reshape(-1)[0] if isinstance(value, np.ndarray) else value


def _save_jpeg(job: tuple[np.ndarray, Path]) -> None:
    try:
        Image.fromarray(job[0]).save(job[1], format="JPEG", quality=95)
    except OSError as err:  # a full disk: name the file
        raise (with_path(err, job[1]) if err.filename is None else err) from None


class _FashionGenRows:
    """Turns Fashion-Gen h5 rows into items, tracking ids and which file each product came from."""

    def __init__(self) -> None:
        self.seen_ids: set[str] = set()
        self.product_file: dict[str, str] = {}
        self.last_id = ""
        """The id of the row :meth:`item` last looked at ("" when it failed before knowing it)."""

    def item(self, chunk: dict[str, np.ndarray], i: int, row: int, file: str, split: str) -> Item:
        """The item for row ``i`` of ``chunk`` (row ``row`` of ``file``); raises BadRow."""
        self.last_id = ""
        raw_product = _column(chunk, "input_productID", i)
        try:
            product = str(int(raw_product))
        except (TypeError, ValueError):
            raise BadRow(f"input_productID {raw_product!r} is not an integer") from None
        index = int(_column(chunk, "index", i)) if "index" in chunk else row
        item_id = self.last_id = f"{product}_{index}"
        if item_id in self.seen_ids:
            raise BadRow(f"duplicate id {item_id}")
        self.seen_ids.add(item_id)
        if self.product_file.setdefault(product, file) != file:
            raise BadRow(f"product {product} is also in {self.product_file[product]}")
        description = _text(_column(chunk, "input_description", i), "description", item_id)
        title = pose = ""
        if "input_name" in chunk:
            title = _optional_text(_column(chunk, "input_name", i), "title", item_id)
        if "input_pose" in chunk:
            pose = _optional_text(_column(chunk, "input_pose", i), "pose", item_id)
        return Item(id=item_id, product_id=product, image=f"{IMAGE_DIR}/{_file_stem(item_id)}.jpg",
                    title=title or _title_from(description), description=description,
                    category=_text(_column(chunk, "input_category", i), "category", item_id),
                    subcategory=_text(_column(chunk, "input_subcategory", i), "sub-category", item_id),
                    split=split, extra={"pose": pose} if pose else {})


def import_fashiongen(files: list[str | Path], *, out: str | Path, on_error: str = "fail",
                      overwrite: bool = False, val_fraction: float = 0.05, seed: int = 0,
                      progress: bool = True) -> ImportReport:
    """Import the official Fashion-Gen h5 files into a catalogue directory.

    Args:
        files: ``fashiongen_256_256_train.h5`` and/or ``fashiongen_256_256_validation.h5``. A file whose name
            contains "valid" becomes the ``test`` split, the others ``train``.
        out: the catalogue directory to create.
        on_error: ``"fail"`` or ``"skip"`` (see :func:`import_csv`); a skipped record also names its ``file``.
        overwrite: replace an existing ``out`` once the import has succeeded.
        val_fraction, seed: share of the training products moved to ``val`` (whole products).
        progress: show a progress bar.

    Returns:
        The :class:`ImportReport`; each item keeps its pose in ``extra["pose"]``.

    Raises:
        KaleidoError: a missing file or dataset, a malformed image dataset, no usable row, or (with ``fail``)
            the first bad row, e.g. a product already imported from another file.
    """
    import h5py

    out, paths = Path(out), [Path(f) for f in files]
    if not paths:
        raise KaleidoError("no Fashion-Gen files given")
    for path in paths:
        if not path.is_file():
            raise KaleidoError(f"Fashion-Gen file not found: {path}")
    problems = _Problems(on_error, "")
    rows = _FashionGenRows()
    items: list[Item] = []
    with (
        _writing(out),
        atomic_directory(out, overwrite=overwrite) as tmp,
        ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
    ):
        (tmp / IMAGE_DIR).mkdir()
        for path in paths:
            split = "test" if "valid" in path.name.lower() else "train"
            problems.source = path.name
            with one_line_os_errors(f"cannot read Fashion-Gen file {path}"):
                h5 = h5py.File(path, "r")
            with h5:
                sets = _fashiongen_datasets(h5, path)
                total = sets["input_image"].shape[0]
                with tqdm(total=total, desc=f"import {path.name}", unit="row", disable=not progress) as bar:
                    for start in range(0, total, FASHIONGEN_CHUNK):
                        stop = min(start + FASHIONGEN_CHUNK, total)
                        chunk = {key: ds[start:stop] for key, ds in sets.items() if key != "input_image"}
                        jobs = []
                        for i in range(stop - start):
                            try:
                                item = rows.item(chunk, i, start + i, path.name, split)
                            except BadRow as err:
                                problems.bad(start + i, rows.last_id, str(err), file=path.name)
                                continue
                            items.append(item)
                            jobs.append((i, tmp / item.image))
                        if jobs:
                            pixels = sets["input_image"][start:stop]
                            list(pool.map(_save_jpeg, [(pixels[i], dst) for i, dst in jobs]))
                        bar.update(stop - start)
        by_product = assign_splits((it.product_id for it in items if it.split == "train"),
                                   val_fraction=val_fraction, test_fraction=0.0, seed=seed)
        for it in items:
            it.split = by_product.get(it.product_id, it.split) if it.split == "train" else it.split
        report = _finish(out, tmp, items, problems, ", ".join(p.name for p in paths))
    return report
