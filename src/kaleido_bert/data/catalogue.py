"""The catalogue: the one input format every later stage reads (paper §4.1 uses Fashion-Gen in this shape).

A catalogue is a directory::

    catalogue.jsonl   one JSON object per image: id, product_id, image (path relative to the directory),
                      title, description, category, subcategory, split (train|val|test), extra (optional dict),
                      sha256 (the image file's content hash, recorded when the catalogue is written)
    labels.json       {"category": {name: id}, "subcategory": {name: id}, "subcategory_category": {sub: cat}}
    stats.json        counts and description-length quantiles (see :func:`compute_stats`)
    problems.jsonl    (optional) rows an importer skipped or converted, one JSON object each
    images/           the image files (importers copy or write them here)

Several images may belong to one product (Fashion-Gen poses, or a scaled training view: ``extra.view_of`` names
the item it was downscaled from, :mod:`kaleido_bert.data.views`). Splits are by product: every image of a product
is in the same split, so no product is seen in training and tested on.

The catalogue hash (:meth:`Catalogue.hash`) identifies a catalogue's texts *and* image contents: it is the
SHA-256 of ``catalogue.jsonl``, whose rows carry each image's SHA-256; for rows written before ``sha256`` was
recorded, the image files are hashed when the catalogue hash is first asked for. Feature stores record it
(:meth:`kaleido_bert.patches.store.FeatureStore.require_catalogue`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert.atomic import atomic_write_json, atomic_write_text, one_line_os_errors, read_json
from kaleido_bert.config.recipe import LABEL_TASKS
from kaleido_bert.errors import KaleidoError

CATALOGUE_FILE = "catalogue.jsonl"
LABELS_FILE = "labels.json"
STATS_FILE = "stats.json"
PROBLEMS_FILE = "problems.jsonl"
SPLITS = ("train", "val", "test")
LABEL_FIELDS = LABEL_TASKS
"""The label fields a classifier predicts (paper §4.2 CR and SUB; the config owns the names, as its tasks)."""
REQUIRED = ("id", "product_id", "image", "title", "description", "category", "subcategory", "split")
OPTIONAL = ("extra", "sha256")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
VIEW_OF = "view_of"
"""The ``extra`` key that marks an item as a scaled training view (:mod:`kaleido_bert.data.views`), holding the id
of the item it was made from."""


class CatalogueError(KaleidoError):
    """A catalogue file or row that does not follow the format."""


@dataclass
class Item:
    """One catalogue row: an image of a product with its texts and labels."""

    id: str
    product_id: str
    image: str
    title: str
    description: str
    category: str
    subcategory: str
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    """SHA-256 of the image file's bytes, recorded by :func:`write_catalogue` ("" in older catalogues)."""

    def to_json(self) -> str:
        data = asdict(self)
        for key in OPTIONAL:
            if not data[key]:
                del data[key]
        return json.dumps(data, ensure_ascii=False)


def is_view(item: Item) -> bool:
    """Whether ``item`` is a scaled training view (left out of search indexes)."""
    return VIEW_OF in item.extra


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clean_text(value: Any, *, what: str, item_id: str) -> str:
    """Decode (UTF-8, then Latin-1), collapse whitespace and strip; empty text is an error naming the item."""
    if isinstance(value, bytes | np.bytes_):
        raw = bytes(value).rstrip(b"\x00")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        value = ""
    text = re.sub(r"\s+", " ", str(value).replace("\x00", " ")).strip()
    if not text:
        raise CatalogueError(f"item {item_id}: {what} is empty or whitespace-only")
    return text


def assign_splits(
    product_ids: Iterable[str], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """Deterministically assign each product to train/val/test by a seeded hash order.

    Exactly ``round(n * fraction)`` products go to val and to test (at least one each when there are ≥3
    products and the fraction is positive); the order does not depend on the input order.
    """
    unique = sorted(set(product_ids), key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    n = len(unique)

    def count(frac: float) -> int:
        k = round(n * frac)
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_test, n_val = count(test_fraction), count(val_fraction)
    splits = {}
    for i, pid in enumerate(unique):
        splits[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits


def build_labels(items: Iterable[Item]) -> dict[str, Any]:
    """Label maps with ids in sorted-name order, plus each sub-category's (most common) parent category."""
    items = list(items)
    parents: dict[str, Counter] = {}
    for it in items:
        parents.setdefault(it.subcategory, Counter())[it.category] += 1
    return {
        "category": {name: i for i, name in enumerate(sorted({it.category for it in items}))},
        "subcategory": {name: i for i, name in enumerate(sorted(parents))},
        "subcategory_category": {sub: c.most_common(1)[0][0] for sub, c in sorted(parents.items())},
    }


def quantiles(values: Iterable[float], qs: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {}
    return {f"p{int(q * 100)}": float(np.quantile(arr, q)) for q in qs}


def compute_stats(items: list[Item]) -> dict[str, Any]:
    """Counts per split, category and sub-category, and description/title word-length quantiles."""
    by_split = Counter(it.split for it in items)
    return {
        "items": len(items),
        "products": len({it.product_id for it in items}),
        "views": sum(is_view(it) for it in items),
        "categories": len({it.category for it in items}),
        "subcategories": len({it.subcategory for it in items}),
        "splits": {s: by_split.get(s, 0) for s in SPLITS},
        "products_per_split": {s: len({it.product_id for it in items if it.split == s}) for s in SPLITS},
        "description_words": quantiles(len(it.description.split()) for it in items),
        "title_words": quantiles(len(it.title.split()) for it in items),
        "items_per_category": dict(sorted(Counter(it.category for it in items).items())),
        "items_per_subcategory": dict(sorted(Counter(it.subcategory for it in items).items())),
    }


def check_split_rule(items: Iterable[Item]) -> None:
    """Raise if a product appears in two splits or a split name is unknown."""
    seen: dict[str, tuple[str, str]] = {}
    for it in items:
        if it.split not in SPLITS:
            raise CatalogueError(f"item {it.id}: split {it.split!r} is not one of {', '.join(SPLITS)}")
        first = seen.setdefault(it.product_id, (it.split, it.id))
        if first[0] != it.split:
            raise CatalogueError(
                f"product {it.product_id} is in two splits: item {first[1]} in {first[0]}, item {it.id} in {it.split}"
            )


def write_catalogue(out_dir: str | Path, items: list[Item], problems: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write catalogue.jsonl, labels.json, stats.json (and problems.jsonl) into ``out_dir``; returns the stats.

    The caller makes the whole directory atomic (:func:`kaleido_bert.atomic.atomic_directory`); each file is also
    written atomically. Each item's ``sha256`` is set from its image file in ``out_dir`` (left empty when the
    file is not there).

    Raises:
        CatalogueError: duplicate ids, the split rule, or a failed write (a full disk: one line naming the path).
    """
    out = Path(out_dir)
    ids = Counter(it.id for it in items)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise CatalogueError(f"duplicate item id {dup[0]} ({ids[dup[0]]} rows)")
    check_split_rule(items)
    with one_line_os_errors(f"cannot write the catalogue {out}", CatalogueError):
        for it in items:
            image = out / it.image
            it.sha256 = file_sha256(image) if not Path(it.image).is_absolute() and image.is_file() else ""
        atomic_write_text(out / CATALOGUE_FILE, "".join(it.to_json() + "\n" for it in items))
        atomic_write_json(out / LABELS_FILE, build_labels(items))
        stats = compute_stats(items)
        atomic_write_json(out / STATS_FILE, stats)
        problems = list(problems)
        if problems:
            atomic_write_text(out / PROBLEMS_FILE,
                              "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems))
    return stats


@dataclass
class Catalogue:
    """A loaded catalogue: its root directory, rows and label maps."""

    root: Path
    items: list[Item]
    labels: dict[str, Any]

    def image_path(self, item: Item) -> Path:
        return self.root / item.image

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def hash(self) -> str:
        """Identifies the catalogue a feature store was built from: its texts and its images' contents.

        The SHA-256 of ``catalogue.jsonl``; when rows lack a recorded ``sha256`` (older catalogues), the hashes
        of their image files are folded in (computed once per loaded catalogue).
        """
        return self._hash

    @cached_property
    def _hash(self) -> str:
        with one_line_os_errors(f"cannot read the catalogue {self.root}", CatalogueError):
            rows = file_sha256(self.root / CATALOGUE_FILE)
        unrecorded = [(it.id, content) for it, content in zip(self.items, self.image_hashes(), strict=True)
                      if not it.sha256]
        if not unrecorded:
            return rows
        digest = hashlib.sha256(rows.encode())
        for item_id, content in unrecorded:
            digest.update(f"\n{item_id}\0{content}".encode())
        return digest.hexdigest()

    def image_hashes(self) -> list[str]:
        """Each item's image content hash: the recorded ``sha256``, else the file's ("" for a missing file)."""
        return self._image_hashes

    @cached_property
    def _image_hashes(self) -> list[str]:
        def content(it: Item) -> str:
            path = self.image_path(it)
            return it.sha256 or (file_sha256(path) if path.is_file() else "")

        with one_line_os_errors(f"cannot read the images of {self.root}", CatalogueError):
            return [content(it) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


def _parse_row(line: str, lineno: int) -> Item:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno} (id {data.get('id', '?')}): missing field {missing[0]}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno} (id {data['id']}): unknown field {unknown[0]}")
    for key in REQUIRED:
        if not isinstance(data[key], str) or not data[key].strip():
            raise CatalogueError(f"{CATALOGUE_FILE} line {lineno} (id {data.get('id')}): {key} must be a non-empty string")
    if not isinstance(data.get("extra", {}), dict):
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno} (id {data['id']}): extra must be an object")
    recorded = data.get("sha256", "")
    if not isinstance(recorded, str) or (recorded and not SHA256.match(recorded)):
        raise CatalogueError(f"{CATALOGUE_FILE} line {lineno} (id {data['id']}): sha256 must be 64 hex digits")
    return Item(**data)


def load_catalogue(root: str | Path) -> Catalogue:
    """Read and validate a catalogue directory.

    Raises:
        CatalogueError: a missing file, a malformed row, a duplicate id, a product in two splits, or a label
            missing from labels.json (one line, names the row or item).
    """
    root = Path(root)
    path = root / CATALOGUE_FILE
    if not path.is_file():
        raise CatalogueError(f"{root} is not a catalogue: {CATALOGUE_FILE} not found")
    items = []
    seen: set[str] = set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CatalogueError(f"{CATALOGUE_FILE} line {lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            item = _parse_row(line, lineno)
            if item.id in seen:
                raise CatalogueError(f"{CATALOGUE_FILE} line {lineno}: duplicate item id {item.id}")
            seen.add(item.id)
            items.append(item)
    check_split_rule(items)
    labels_path = root / LABELS_FILE
    labels = read_json(labels_path, dict, error=CatalogueError) if labels_path.is_file() else build_labels(items)
    for it in items:
        for kind in ("category", "subcategory"):
            if getattr(it, kind) not in labels.get(kind, {}):
                raise CatalogueError(f"item {it.id}: {kind} {getattr(it, kind)!r} is missing from {LABELS_FILE}")
    return Catalogue(root=root, items=items, labels=labels)


def label_map(labels: dict[str, Any], field: str) -> dict[str, int]:
    """The ``labels.json`` map of one label field (name → id).

    Raises:
        KaleidoError: ``field`` is not one of :data:`LABEL_FIELDS`.
    """
    if field not in LABEL_FIELDS:
        raise KaleidoError(f"unknown label field {field!r}: choose one of {', '.join(LABEL_FIELDS)}")
    return dict(labels[field])
