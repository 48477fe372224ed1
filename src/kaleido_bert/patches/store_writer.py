"""Writing the feature store (paper §3.2 output): create, resume, update and grow it, rows committed by ``flush``.

The layout, the manifest rules and the reader are :mod:`kaleido_bert.patches.store`. :class:`StoreWriter` creates a
store (arrays preallocated, the manifest written last, so a killed creation is recognised and started again) or
resumes one whose manifest matches (:data:`RESUME_KEYS`), merging the per-rank shards a sharded run left
(:mod:`kaleido_bert.patches.shards`). A store built for an earlier version of the same catalogue is brought up to
date: rows whose image content changed are done again (:meth:`RowWriter.pending`); a catalogue that gained items
grows its store first (:func:`grow_rows`). :class:`RowWriter` is the part one process and one rank share: rows
written in place, made durable, then marked done.

Shapes: rows of ``features`` ``(74, F)`` float16, ``boxes`` ``(55, 4)``, ``positions`` ``(55, 5)``, ``saliency``
``(5,)``, ``sizes`` ``(2,)``; ``status`` ``(N,)`` uint8.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaleido_bert.atomic import (
    atomic_directory,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    one_line_os_errors,
)
from kaleido_bert.patches.features import FEATURE_LAYOUT
from kaleido_bert.patches.store import MATCH_KEYS, array_specs, describe_mismatch, open_arrays
from kaleido_bert.patches.store_files import (
    DONE,
    FAILED,
    IDS,
    IMAGES,
    MANIFEST,
    NOT_OWNED,
    PROBLEMS,
    REBUILD,
    STATUS,
    TODO,
    RowFiles,
    StoreError,
    check_npy,
    load_status,
    problem_lines,
    read_problems,
    read_shards,
    read_store_json,
    require_disk_space,
)

STORE_VERSION = 2
"""2 added ``images.json`` (per-row image content hashes)."""
ARRAYS = ("features", "boxes", "positions", "saliency", "sizes")
GROW_CHUNK = 1024
"""Rows copied at a time when a store grows (about 190 MB of a 1280-d store's features)."""
RESUME_KEYS = tuple(key for key in MATCH_KEYS if key != "catalogue_hash")
"""Fields a resumed store must share; a new catalogue hash instead redoes the rows whose image changed."""


def _is_interrupted_creation(root: Path) -> bool:
    """A directory holding only the files a store writes before its first manifest (a killed creation)."""
    known = {IDS, IMAGES, STATUS, PROBLEMS, *(f"{name}.npy" for name in ARRAYS)}
    entries = list(root.iterdir())
    return bool(entries) and all(p.is_file() and (p.name in known or p.name.endswith(".tmp")) for p in entries)


class RowWriter:
    """Rows written by index into a store's arrays (:class:`~kaleido_bert.patches.store_files.RowFiles`), then
    committed by ``flush``: the part :class:`StoreWriter` (one process) and :class:`ShardWriter` (one rank) share."""

    def __init__(self, root: str | Path, feature_size: int, n: int) -> None:
        self.root = Path(root)
        self.specs = array_specs(n, feature_size)
        self.rows: RowFiles | None = None
        self.status = np.zeros(n, np.uint8)
        self.problems: list[dict[str, Any]] = []
        self._staged: list[int] = []
        self._failed_since_flush = False

    def pending(self) -> list[int]:
        """Row indices still to do."""
        return np.flatnonzero(self.status == TODO).tolist()

    def write(self, index: int, *, features: torch.Tensor, boxes: torch.Tensor, positions: torch.Tensor,
              saliency: tuple[float, float, float, float], fallback: bool, size: tuple[int, int]) -> None:
        """Write one item's row (not yet committed: call ``flush``)."""
        if not torch.isfinite(features).all():
            raise StoreError(f"item {index}: non-finite patch features (backbone overflow?)")
        with one_line_os_errors(f"feature store {self.root}: rows flushed earlier are kept, re-run to resume",
                                StoreError):
            self.rows.write("features", index, features.numpy().astype(np.float16))
            self.rows.write("boxes", index, boxes.numpy())
            self.rows.write("positions", index, positions.numpy())
            self.rows.write("saliency", index, [*saliency, float(fallback)])
            self.rows.write("sizes", index, size)
        self._staged.append(index)

    def fail(self, index: int, item_id: str, problem: str) -> None:
        """Record an item that could not be processed; the run goes on."""
        self.problems.append({"row": index, "id": item_id, "problem": problem})
        self.status[index] = FAILED
        self._failed_since_flush = True

    def _commit_rows(self) -> None:
        """Make the staged rows durable, then mark them done (in memory; the subclass writes the status)."""
        self.rows.sync()
        for index in self._staged:
            self.status[index] = DONE
        self._staged = []
        self._failed_since_flush = False

    def _reset_orphans(self) -> bool:
        """Failed rows without a problem record (a kill between the status and the problems write) go back to
        do; True when there were any."""
        recorded = {p["row"] for p in self.problems}
        orphans = [i for i in np.flatnonzero(self.status == FAILED).tolist() if i not in recorded]
        self.status[orphans] = TODO
        return bool(orphans)

    def close(self) -> None:
        """Close the array files (rows not flushed are lost, as after a kill)."""
        if self.rows is not None:
            self.rows.close()
            self.rows = None


class StoreWriter(RowWriter):
    """Create or resume a store; rows are written by index and committed with :meth:`flush`.

    Opening a store first merges the per-rank shards a sharded run left (:class:`ShardWriter`; rows each rank
    committed are kept, whatever number of processes resumes it) and projects the store's size against the free
    disk space (``projection``, one line).

    Args:
        root: the store directory.
        manifest: the fields the store is built with (:data:`MATCH_KEYS`, ``feature_size`` required).
        ids: item ids in row order.
        image_hashes: each row's image content hash (the catalogue's); when given, a store built for another
            version of the catalogue is updated: rows whose hash changed are done again, and when the catalogue
            gained items (every stored id is still in ``ids``) the store grows to ``ids`` first (:func:`grow_rows`).

    Raises:
        StoreError: a store that does not match, is corrupt (any file whose size or header is wrong), a
            directory that is not a store, or a disk that cannot hold it; an ``OSError`` (a full disk) as one
            line naming the path.
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any], ids: list[str], *,
                 image_hashes: list[str] | None = None) -> None:
        super().__init__(root, int(manifest["feature_size"]), len(ids))
        self.changed: list[int] = []
        """Rows reset to do because their image changed since the store was built."""
        self.merged: list[str] = []
        """The shard files of a sharded run merged into ``status.npy`` when the store was opened."""
        self.added: list[int] = []
        """Rows added because the catalogue gained items since the store was built (:func:`grow_rows`)."""
        if image_hashes is not None and len(image_hashes) != len(ids):
            raise StoreError(f"{len(image_hashes)} image hashes for {len(ids)} ids")
        with one_line_os_errors(f"feature store {self.root}", StoreError):
            self.projection = require_disk_space(self.root, self.specs)
            if (self.root / MANIFEST).is_file():
                try:
                    self._resume(manifest, ids, image_hashes)
                except BaseException:
                    self.close()
                    raise
            else:
                self._create(manifest, ids, image_hashes)

    def _create(self, manifest: dict[str, Any], ids: list[str], image_hashes: list[str] | None) -> None:
        if self.root.exists() and any(self.root.iterdir()):
            if not _is_interrupted_creation(self.root):
                raise StoreError(f"{self.root} exists and is not a feature store (no {MANIFEST})")
            for leftover in self.root.iterdir():  # no manifest yet means no row was ever committed
                leftover.unlink()
        made_dir = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = {**manifest, "version": STORE_VERSION, "num_items": len(ids), "complete": False,
                         "layout": FEATURE_LAYOUT, "dtype": "float16"}
        try:
            atomic_write_json(self.root / IDS, ids)
            if image_hashes is not None:
                atomic_write_json(self.root / IMAGES, image_hashes)
            for name, (shape, dtype) in self.specs.items():  # sparse files; open_arrays reserves their blocks
                np.lib.format.open_memmap(self.root / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            self.arrays = open_arrays(self.root, self.specs, reserve=True)
            self.rows = RowFiles(self.root, self.specs)
            self.flush()  # the manifest comes last: until it exists, the directory is an interrupted creation
        except BaseException:
            self.close()
            self.arrays = {}
            for name in (IDS, IMAGES, STATUS, PROBLEMS, *(f"{a}.npy" for a in ARRAYS)):
                (self.root / name).unlink(missing_ok=True)
            if made_dir and not any(self.root.iterdir()):
                self.root.rmdir()
            raise

    def _resume(self, manifest: dict[str, Any], ids: list[str], image_hashes: list[str] | None) -> None:
        found = read_store_json(self.root / MANIFEST, dict, "a store manifest (a JSON object)")
        rebuild = " (use another --out, or delete the store to rebuild it)"
        problem = describe_mismatch(found, manifest, str(self.root), RESUME_KEYS)
        if problem:
            raise StoreError(problem + rebuild)
        stored = read_store_json(self.root / IDS, list, "a list of item ids")
        if stored != ids:
            if image_hashes is None or len(set(stored)) != len(stored) or not set(stored) <= set(ids):
                raise StoreError(f"feature store {self.root} holds other item ids than the catalogue{rebuild}")
            self.added = grow_rows(self.root, stored, ids, self.specs)
            found = read_store_json(self.root / MANIFEST, dict, "a store manifest (a JSON object)")
        n = len(ids)
        self.status = load_status(self.root, n)
        self.problems = read_problems(self.root, n=n)
        shard_status, shard_problems, shard_files = read_shards(self.root, n)
        covered = shard_status != NOT_OWNED  # each shard is authoritative for its rows
        self.status[covered] = shard_status[covered]
        self.problems = [p for p in self.problems if not covered[p["row"]]] + shard_problems
        orphans = self._reset_orphans()
        self.arrays = open_arrays(self.root, self.specs, reserve=True)
        self.rows = RowFiles(self.root, self.specs)
        self.manifest = found
        new_hash = manifest.get("catalogue_hash")
        if new_hash is not None and found.get("catalogue_hash") != new_hash:
            if image_hashes is None:
                raise StoreError(describe_mismatch(found, manifest, str(self.root), ("catalogue_hash",)) + rebuild)
            self._update_catalogue(manifest, image_hashes)
        if shard_files or orphans:
            self.flush()  # the merged status is committed before the shard files go (a re-merge gives the same)
            for path in shard_files:
                path.unlink(missing_ok=True)
            self.merged = [path.name for path in shard_files]

    def _update_catalogue(self, manifest: dict[str, Any], image_hashes: list[str]) -> None:
        """Same ids, another catalogue version: redo the rows whose image changed, then adopt the new hash.

        Kill-safe order: status.npy (changed rows to do) first, then images.json, then the manifest, so an
        interrupted update finds the same rows to do (or finds them already marked) when it runs again.
        """
        path = self.root / IMAGES
        old = read_store_json(path, list, "a list of image hashes") if path.is_file() else [None] * len(image_hashes)
        if len(old) != len(image_hashes):
            raise StoreError(f"{path} holds {len(old)} hashes for {len(image_hashes)} items (corrupt store: {REBUILD})")
        redo = [i for i, (a, b) in enumerate(zip(old, image_hashes, strict=True)) if a != b]
        added = set(self.added)
        self.changed = [i for i in redo if i not in added]  # the new rows are not changed ones
        self.status[redo] = TODO
        redone = set(redo)
        self.problems = [p for p in self.problems if p["row"] not in redone]
        self._write_status()
        atomic_write_json(path, image_hashes)
        self.manifest.update(catalogue_hash=manifest["catalogue_hash"], version=STORE_VERSION,
                             **{k: manifest[k] for k in ("catalogue",) if k in manifest})
        self.flush()

    def _write_status(self) -> None:
        with atomic_path(self.root / STATUS) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.status)

    def flush(self) -> None:
        """Commit: make the written rows durable, then mark them done (atomically).

        Raises:
            StoreError: a write failed (a full disk): one line naming the file; rows committed before stay done.
        """
        with one_line_os_errors(f"feature store {self.root}: rows flushed earlier are kept, re-run to resume",
                                StoreError):
            self._commit_rows()
            self._write_status()
            atomic_write_text(self.root / PROBLEMS, problem_lines(self.problems, self.status))
            self.manifest["complete"] = bool((self.status != TODO).all())
            self.manifest["done"] = int((self.status == DONE).sum())
            self.manifest["failed"] = int((self.status == FAILED).sum())
            self.manifest["fallback_boxes"] = int(self.arrays["saliency"][self.status == DONE, 4].sum())
            atomic_write_json(self.root / MANIFEST, self.manifest)


def grow_rows(root: Path, stored: list[str], ids: list[str],
              specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[int]:
    """Rebuild the store at ``root`` for ``ids``, a catalogue that gained items: each stored row moves to its id's
    new place with its status, problems and image hash, the new rows are to do; returns the new rows.

    The grown store is built beside the old one and swapped in (:func:`~kaleido_bert.atomic.atomic_directory`):
    a kill before the swap leaves the old store as it was, and the next run grows it again. Its content hash
    stays the old catalogue's, so :meth:`StoreWriter._update_catalogue` then finds the new rows (no hash yet) and
    the rows whose image changed, and adopts the new catalogue.

    Raises:
        StoreError: shard files of an interrupted sharded run (finish it with the catalogue it began with first),
            a disk that cannot hold the grown copy beside the old, or a corrupt file.
    """
    n_old = len(stored)
    if read_shards(root, n_old)[2]:
        raise StoreError(f"feature store {root} holds the shards of an interrupted sharded run: finish it with the "
                         "catalogue it began with, then add items")
    place = {item: row for row, item in enumerate(ids)}
    rows = np.array([place[item] for item in stored], dtype=np.int64)
    status = np.full(len(ids), TODO, np.uint8)
    status[rows] = load_status(root, n_old)
    problems = [{**p, "row": int(rows[p["row"]])} for p in read_problems(root, n=n_old)]
    manifest = read_store_json(root / MANIFEST, dict, "a store manifest (a JSON object)")
    old_specs = array_specs(n_old, specs["features"][0][2])
    with atomic_directory(root, overwrite=True) as tmp:
        require_disk_space(tmp, specs)
        for name, (shape, dtype) in specs.items():
            check_npy(root / f"{name}.npy", old_specs[name][0], dtype)
            old = np.load(root / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            new = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for start in range(0, n_old, GROW_CHUNK):
                new[rows[start:start + GROW_CHUNK]] = old[start:start + GROW_CHUNK]
            new.flush()
            del new, old
        with atomic_path(tmp / STATUS) as path, open(path, "wb") as fh:
            np.save(fh, status)
        atomic_write_text(tmp / PROBLEMS, problem_lines(problems, status))
        if (root / IMAGES).is_file():
            hashes = [""] * len(ids)  # no image extracted yet: differs from any content hash
            for row, content in zip(rows, read_store_json(root / IMAGES, list, "a list of image hashes"), strict=True):
                hashes[row] = content
            atomic_write_json(tmp / IMAGES, hashes)
        atomic_write_json(tmp / IDS, ids)
        known = {MANIFEST, IDS, IMAGES, STATUS, PROBLEMS, *(f"{name}.npy" for name in specs)}
        for other in root.iterdir():  # what else lives there (the run.yaml `kaleido patches` writes)
            if other.is_file() and other.name not in known:
                shutil.copy2(other, tmp / other.name)
        atomic_write_json(tmp / MANIFEST, {**manifest, "num_items": len(ids), "complete": False})
    new_rows = np.ones(len(ids), bool)
    new_rows[rows] = False
    return np.flatnonzero(new_rows).tolist()
