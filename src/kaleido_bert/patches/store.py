"""The feature store: per-image Kaleido patch features on disk, read by random access (paper §3.2 output).

A store is a directory::

    manifest.json    backbone, weights, mode, patch/image size, feature size F, levels, saliency method,
                     catalogue hash, version, layout, complete flag
    ids.json         item ids in row order (the catalogue's order)
    images.json      SHA-256 of each row's image file (the catalogue's content hashes), in row order
    features.npy     (N, 74, F) float16: 55 colour patches, 3 rotated 1×1, 16 grey 4×4 (features.FEATURE_LAYOUT)
    boxes.npy        (N, 55, 4) float32: patch boxes x1, y1, x2, y2 in the source image's pixels
    positions.npy    (N, 55, 5) float32: [x1, x2, y1, y2, w*h] normalised to [0, 1]
    saliency.npy     (N, 5) float32: saliency box x1, y1, x2, y2 and 1.0 where it fell back to the whole image
    sizes.npy        (N, 2) int32: source image width, height
    status.npy       (N,) uint8: 0 to do, 1 done, 2 failed (see problems.jsonl); replaced atomically
    problems.jsonl   items that failed to decode, one JSON object each

The ``.npy`` arrays are memory-mapped for reading: rows are read on demand, never the whole file. Every file is
checked before it is used, on the read and the write path alike (:mod:`kaleido_bert.patches.store_files`: an
``.npy`` file's header against its size, shape and dtype; JSON files and status values). Before a store is
created or resumed its size is projected (rows × bytes per row) and refused in one line when the disk cannot hold
it; new arrays are preallocated (``os.posix_fallocate``), so a full disk fails when the store is opened, not in
the middle of a run. Rows are written in place (``os.pwrite``) and made durable before ``status.npy`` marks them
done, so a killed run resumes exactly where the last flush left it. A sharded run (``torchrun``) leaves per-rank
``status.rank-R-of-W.npy`` / ``problems.rank-R-of-W.jsonl`` files (:mod:`kaleido_bert.patches.shards`) that
the next :class:`~kaleido_bert.patches.store_writer.StoreWriter` merges, whatever number of processes opens it.
``manifest.json`` says ``complete: false`` until every row is done or failed; readers refuse an incomplete store,
and a writer refuses to append to a store whose manifest does not match. A store built for an earlier version of the same catalogue
(same ids, another catalogue hash) is brought up to date: rows whose image content changed are extracted again
(:meth:`~kaleido_bert.patches.store_writer.RowWriter.pending`). A catalogue that gained items (new products, scaled
views) grows its store: the old rows move to their ids' new places and only the new ones are extracted
(:func:`~kaleido_bert.patches.store_writer.grow_rows`, built beside the old store and swapped in, so a kill leaves
one or the other); a catalogue that lost items needs a new store.

This module is the reading side (:class:`FeatureStore`) and the manifest rules both sides share;
:mod:`kaleido_bert.patches.store_writer` creates, resumes, updates and grows a store.
:meth:`FeatureStore.require_catalogue` is the one check that a store belongs to a catalogue.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kaleido_bert.atomic import one_line_os_errors
from kaleido_bert.config import FeaturesConfig
from kaleido_bert.patches.features import FEATURES_PER_IMAGE, GREYED, NUM_COLOUR, ROTATED
from kaleido_bert.patches.store_files import (
    DONE,
    FAILED,
    IDS,
    IMAGES,
    MANIFEST,
    REBUILD,
    TODO,
    NpyHeader,
    StoreError,
    check_npy,
    load_status,
    preallocate,
    read_problems,
    read_store_json,
)

if TYPE_CHECKING:
    from kaleido_bert.data.catalogue import Catalogue

MATCH_KEYS = ("backbone", "weights", "seed", "mode", "patch_size", "image_size", "saliency", "max_side", "levels",
              "feature_size", "catalogue_hash")
"""Manifest fields that must agree before a store is resumed or used."""
MANIFEST_DEFAULTS = {"max_side": FeaturesConfig.max_side}
"""What a store whose manifest lacks a field was built with (it predates the field: ``max_side``)."""
__all__ = ["DONE", "FAILED", "MANIFEST_DEFAULTS", "MATCH_KEYS", "TODO", "FeatureStore", "NpyHeader", "StoreError",
           "array_specs", "check_npy", "describe_mismatch", "manifest_value", "open_arrays"]


def manifest_value(manifest: dict[str, Any], key: str) -> Any:
    """A manifest field, or what a store that predates the field was built with (:data:`MANIFEST_DEFAULTS`)."""
    return manifest.get(key, MANIFEST_DEFAULTS.get(key))


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any], where: str,
                      keys: tuple[str, ...] = MATCH_KEYS) -> str | None:
    """One line naming the first manifest field that differs, or None when they agree."""
    for key in keys:
        have = manifest_value(found, key)
        if key in wanted and have != wanted[key]:
            return f"feature store {where} was built with {key}={have!r}, but {key}={wanted[key]!r} was asked for"
    return None


def array_specs(n: int, feature_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of a store of ``n`` items with feature size F."""
    return {"features": ((n, FEATURES_PER_IMAGE, feature_size), np.dtype(np.float16)),
            "boxes": ((n, NUM_COLOUR, 4), np.dtype(np.float32)), "positions": ((n, NUM_COLOUR, 5), np.dtype(np.float32)),
            "saliency": ((n, 5), np.dtype(np.float32)), "sizes": ((n, 2), np.dtype(np.int32))}


def open_arrays(root: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]], *,
                 reserve: bool = False) -> dict[str, np.memmap]:
    """Memory-map the arrays read-only after :func:`check_npy`; ``reserve`` first reserves their blocks."""
    arrays = {}
    for name, (shape, dtype) in specs.items():
        path = root / f"{name}.npy"
        check_npy(path, shape, dtype)
        if reserve:
            preallocate(path)
        arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    return arrays


class FeatureStore:
    """Read-only random access to a complete store; arrays are memory-mapped.

    Example:
        >>> store = FeatureStore("runs/demo/features")
        >>> item = store["p00001-v0"]        # dict of tensors
        >>> item["colour"].shape            # (55, F)
    """

    def __init__(self, root: str | Path, *, expect: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{self.root} is not a feature store ({MANIFEST} not found)")
        with one_line_os_errors(f"feature store {self.root}", StoreError):
            self.manifest = read_store_json(path, dict, "a store manifest (a JSON object)")
            self.ids: list[str] = read_store_json(self.root / IDS, list, "a list of item ids")
            feature_size = self.manifest.get("feature_size")
            if not isinstance(feature_size, int) or feature_size < 1:
                raise StoreError(f"{path} has no valid feature_size (corrupt store: {REBUILD})")
            self.status = load_status(self.root, len(self.ids))
            complete = self.manifest.get("complete") and not (self.status == TODO).any()
            if not complete:
                raise StoreError(f"feature store {self.root} is incomplete ({int((self.status != TODO).sum())}/"
                                 f"{len(self.ids)} items): re-run `kaleido patches` to finish it")
            self.arrays = open_arrays(self.root, array_specs(len(self.ids), feature_size))
            self.problems = read_problems(self.root, n=len(self.ids))
        if expect:
            problem = describe_mismatch(self.manifest, expect, str(self.root))
            if problem:
                raise StoreError(problem)
        self.index = {item_id: i for i, item_id in enumerate(self.ids)}

    def require_catalogue(self, catalogue: Catalogue, *, subset: bool = False) -> None:
        """Refuse a store that was not built from ``catalogue`` as it is now (its texts and image contents).

        The one identity check between a catalogue and a store; every command that opens both calls it.

        Args:
            subset: also accept a catalogue that shares only some items with the store (the captioner trains
                on whichever items the store holds), provided each shared item's image has the content its row
                was extracted from (``images.json``; an item with no image file and no recorded hash is not
                checked).

        Raises:
            StoreError: one line naming both directories and how to rebuild the store.
        """
        found, wanted = self.manifest.get("catalogue_hash"), catalogue.hash()
        if found != wanted and subset and (self.root / IMAGES).is_file():
            with one_line_os_errors(f"feature store {self.root}", StoreError):
                rows = read_store_json(self.root / IMAGES, list, "a list of image hashes")
            if len(rows) != len(self.ids):
                raise StoreError(f"{self.root / IMAGES} holds {len(rows)} hashes for {len(self.ids)} items "
                                 f"(corrupt store: {REBUILD})")
            stale = [it.id for it, content in zip(catalogue.items, catalogue.image_hashes(), strict=True)
                     if content and it.id in self.index and rows[self.index[it.id]] != content]
            if not stale:
                return
            raise StoreError(f"feature store {self.root} holds features of another image than {catalogue.root} has "
                             f"for item {stale[0]}{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''}: "
                             f"re-run `kaleido patches` on the store's catalogue to update it")
        if found != wanted:
            raise StoreError(f"feature store {self.root} was built from another catalogue than {catalogue.root} "
                             f"(or from an earlier version of it: catalogue hash {str(found)[:12]} in the store, "
                             f"{wanted[:12]} now): re-run `kaleido patches {catalogue.root} --out {self.root}`")

    @property
    def feature_size(self) -> int:
        return int(self.manifest["feature_size"])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        i = self.index.get(item_id)
        return i is not None and self.status[i] == DONE

    def available_ids(self) -> list[str]:
        """Ids whose features were extracted (failed items excluded)."""
        return [item_id for item_id, s in zip(self.ids, self.status, strict=True) if s == DONE]

    def __getitem__(self, item_id: str) -> dict[str, torch.Tensor]:
        """One item's features as float32 tensors: colour (55, F), rotated (3, F), grey (16, F), positions (55, 5),
        boxes (55, 4), saliency (4,), fallback (bool scalar), size (2,)."""
        i = self.index.get(item_id)
        if i is None or self.status[i] != DONE:
            why = "not in the store" if i is None else "failed during extraction (see problems.jsonl)"
            raise StoreError(f"item {item_id}: {why}")
        feats = torch.from_numpy(np.asarray(self.arrays["features"][i], dtype=np.float32))
        sal = self.arrays["saliency"][i]
        return {
            "colour": feats[:NUM_COLOUR],
            "rotated": feats[ROTATED],
            "grey": feats[GREYED],
            "positions": torch.from_numpy(np.array(self.arrays["positions"][i])),
            "boxes": torch.from_numpy(np.array(self.arrays["boxes"][i])),
            "saliency": torch.from_numpy(np.array(sal[:4])),
            "fallback": torch.tensor(bool(sal[4] > 0.5)),
            "size": torch.from_numpy(np.array(self.arrays["sizes"][i])),
        }
