"""The feature store: per-image Kaleido patch features on disk, read by random access (paper §3.2 output).

A store is a directory::

    manifest.json    backbone, weights, mode, patch/image size, feature size F, levels, saliency method,
                     catalogue hash, version, layout, complete flag
    ids.json         item ids in row order (the catalogue's order)
    features.npy     (N, 74, F) float16: 55 colour patches, 3 rotated 1×1, 16 grey 4×4 (features.FEATURE_LAYOUT)
    boxes.npy        (N, 55, 4) float32: patch boxes x1, y1, x2, y2 in the source image's pixels
    positions.npy    (N, 55, 5) float32: [x1, x2, y1, y2, w*h] normalised to [0, 1]
    saliency.npy     (N, 5) float32: saliency box x1, y1, x2, y2 and 1.0 where it fell back to the whole image
    sizes.npy        (N, 2) int32: source image width, height
    status.npy       (N,) uint8: 0 to do, 1 done, 2 failed (see problems.jsonl); replaced atomically
    problems.jsonl   items that failed to decode, one JSON object each

The ``.npy`` arrays are opened with ``numpy.load(mmap_mode=…)``: rows are read on demand, never the whole
file. Rows are flushed before ``status.npy`` marks them done, so a killed run resumes exactly where the last
flush left it. ``manifest.json`` says ``complete: false`` until every row is done or failed; readers refuse an
incomplete store and a writer refuses to append to a store whose manifest does not match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaleido_bert.atomic import atomic_path, atomic_write_json, atomic_write_text
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.features import FEATURE_LAYOUT, FEATURES_PER_IMAGE, GREYED, NUM_COLOUR, ROTATED

STORE_VERSION = 1
MANIFEST = "manifest.json"
TODO, DONE, FAILED = 0, 1, 2
MATCH_KEYS = ("backbone", "weights", "seed", "mode", "patch_size", "image_size", "saliency", "levels",
              "feature_size", "catalogue_hash")
"""Manifest fields that must agree before a store is resumed or used."""


class StoreError(KaleidoError):
    """A feature store that is missing, incomplete, corrupt or does not match what was asked for."""


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any], where: str) -> str | None:
    """One line naming the first manifest field that differs, or None when they agree."""
    for key in MATCH_KEYS:
        if key in wanted and found.get(key) != wanted[key]:
            return f"feature store {where} was built with {key}={found.get(key)!r}, but {key}={wanted[key]!r} was asked for"
    return None


class StoreWriter:
    """Create or resume a store; rows are written by index and committed with :meth:`flush`."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], ids: list[str]) -> None:
        self.root = Path(root)
        self._staged: list[int] = []
        path = self.root / MANIFEST
        n, f = len(ids), int(manifest["feature_size"])
        if path.is_file():
            found = json.loads(path.read_text())
            problem = describe_mismatch(found, manifest, str(self.root))
            if problem:
                raise StoreError(problem + " (use another --out, or delete the store to rebuild it)")
            stored_ids = json.loads((self.root / "ids.json").read_text())
            if stored_ids != ids:
                raise StoreError(f"feature store {self.root} holds other item ids than the catalogue")
            self.manifest = found
            mode = "r+"
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(f"{self.root} exists and is not a feature store (no {MANIFEST})")
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {**manifest, "version": STORE_VERSION, "num_items": n, "complete": False,
                             "layout": FEATURE_LAYOUT, "dtype": "float16"}
            atomic_write_json(self.root / "ids.json", ids)
            mode = "w+"
        shapes = {"features": ((n, FEATURES_PER_IMAGE, f), np.float16), "boxes": ((n, NUM_COLOUR, 4), np.float32),
                  "positions": ((n, NUM_COLOUR, 5), np.float32), "saliency": ((n, 5), np.float32),
                  "sizes": ((n, 2), np.int32)}
        self.arrays = {}
        for name, (shape, dtype) in shapes.items():
            file = self.root / f"{name}.npy"
            if mode == "w+":
                self.arrays[name] = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
            else:
                self.arrays[name] = np.load(file, mmap_mode="r+")
                if self.arrays[name].shape != shape:
                    raise StoreError(f"feature store {self.root}: {name}.npy has shape {self.arrays[name].shape}, "
                                     f"expected {shape} (corrupt store: delete it to rebuild)")
        status_file = self.root / "status.npy"
        self.status = np.load(status_file) if mode == "r+" and status_file.is_file() else np.zeros(n, np.uint8)
        self.problems = _read_problems(self.root)
        if mode == "w+":
            self.flush()

    def pending(self) -> list[int]:
        """Row indices still to do."""
        return np.flatnonzero(self.status == TODO).tolist()

    def write(self, index: int, *, features: torch.Tensor, boxes: torch.Tensor, positions: torch.Tensor,
              saliency: tuple[float, float, float, float], fallback: bool, size: tuple[int, int]) -> None:
        """Write one item's row (not yet committed: call :meth:`flush`)."""
        if not torch.isfinite(features).all():
            raise StoreError(f"item {index}: non-finite patch features (backbone overflow?)")
        self.arrays["features"][index] = features.numpy().astype(np.float16)
        self.arrays["boxes"][index] = boxes.numpy()
        self.arrays["positions"][index] = positions.numpy()
        self.arrays["saliency"][index] = [*saliency, float(fallback)]
        self.arrays["sizes"][index] = size
        self._staged.append(index)

    def fail(self, index: int, item_id: str, problem: str) -> None:
        """Record an item that could not be processed; the run goes on."""
        self.problems.append({"row": index, "id": item_id, "problem": problem})
        self.status[index] = FAILED

    def flush(self) -> None:
        """Commit: flush the arrays to disk, then mark the staged rows done (atomically)."""
        for array in self.arrays.values():
            array.flush()
        for index in self._staged:
            self.status[index] = DONE
        self._staged = []
        with atomic_path(self.root / "status.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.status)
        atomic_write_text(self.root / "problems.jsonl", "".join(json.dumps(p) + "\n" for p in self.problems))
        self.manifest["complete"] = bool((self.status != TODO).all())
        self.manifest["done"] = int((self.status == DONE).sum())
        self.manifest["failed"] = int((self.status == FAILED).sum())
        self.manifest["fallback_boxes"] = int(self.arrays["saliency"][self.status == DONE, 4].sum())
        atomic_write_json(self.root / MANIFEST, self.manifest)


def _read_problems(root: Path) -> list[dict[str, Any]]:
    path = root / "problems.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        try:
            self.manifest = json.loads(path.read_text())
            self.ids: list[str] = json.loads((self.root / "ids.json").read_text())
            self.status = np.load(self.root / "status.npy")
            self.arrays = {name: np.load(self.root / f"{name}.npy", mmap_mode="r")
                           for name in ("features", "boxes", "positions", "saliency", "sizes")}
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise StoreError(f"feature store {self.root} is corrupt ({type(err).__name__}: {err})") from None
        if not self.manifest.get("complete"):
            raise StoreError(f"feature store {self.root} is incomplete ({self.manifest.get('done', 0)}/"
                             f"{self.manifest.get('num_items')} items): re-run `kaleido patches` to finish it")
        if expect:
            problem = describe_mismatch(self.manifest, expect, str(self.root))
            if problem:
                raise StoreError(problem)
        self.index = {item_id: i for i, item_id in enumerate(self.ids)}
        self.problems = _read_problems(self.root)

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
