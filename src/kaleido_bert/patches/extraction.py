"""``kaleido patches``: run the Kaleido Patch Generator over a catalogue into a feature store (paper §3.2).

Per image: decode (DataLoader workers) → saliency box → 55 Kaleido boxes and positions → 74 patch features
(``features.PatchEncoder``) → one store row. Resumable: rows already marked done are skipped, so a killed run
re-run with the same arguments only does the rest; a bad image is recorded and the run goes on. Each image is
checked against the content hash the catalogue recorded, and a re-run after the catalogue changed extracts the
images whose content changed again (:class:`~kaleido_bert.patches.store.StoreWriter`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kaleido_bert.config import FeaturesConfig
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.data.images import load_rgb
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.backbones import build_backbone
from kaleido_bert.patches.features import PatchEncoder
from kaleido_bert.patches.grid import kaleido_boxes, positions
from kaleido_bert.patches.saliency import build_saliency
from kaleido_bert.patches.store import StoreWriter

MAX_SIDE = 1024
"""Images are downscaled to at most this side before saliency and cropping (patches are ≤ 224 px anyway)."""
IMAGES_PER_BATCH = 8
FLUSH_SECONDS = 1.0


class _ImageDataset(Dataset):
    """Decode an image and find its saliency box; a problem is returned, not raised, so the run continues."""

    def __init__(self, paths: list[Path], rows: list[int], saliency: str, checkpoint: str | None,
                 hashes: list[str]) -> None:
        self.paths, self.rows, self.hashes = paths, rows, hashes
        self.saliency, self.checkpoint = saliency, checkpoint
        self._detector = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        try:
            image = load_rgb(self.paths[row], sha256=self.hashes[row] or None)
            scale = min(1.0, MAX_SIDE / max(image.size))
            if scale < 1.0:
                image = image.resize((round(image.width * scale), round(image.height * scale)))
            pixels = np.asarray(image)
            if self._detector is None:
                self._detector = build_saliency(self.saliency, checkpoint=self.checkpoint)
            found = self._detector(pixels)
        except KaleidoError as err:
            return {"row": row, "problem": str(err)}
        except Exception as err:  # a decoder bug on one file must not stop a catalogue-sized run
            return {"row": row, "problem": f"{type(err).__name__}: {err}"}
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        return {"row": row, "image": tensor, "box": found.box, "fallback": found.fallback, "scale": scale}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def store_manifest(config: FeaturesConfig, *, feature_size: int, catalogue_hash: str, seed: int) -> dict[str, Any]:
    """The manifest fields a store is built with (and must match to be resumed or used)."""
    return {
        "backbone": config.backbone, "weights": config.weights, "seed": seed if config.weights == "none" else None,
        "mode": config.mode, "patch_size": config.patch_size, "image_size": config.image_size,
        "saliency": config.saliency, "levels": 5, "feature_size": feature_size, "catalogue_hash": catalogue_hash,
    }


def extract_features(
    catalogue: str | Path, out: str | Path, config: FeaturesConfig, *, seed: int = 0, device: str = "cpu",
    num_workers: int = 2, limit: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) the feature store of a catalogue.

    Args:
        catalogue: catalogue directory.
        out: store directory (created, or resumed when its manifest matches).
        config: backbone, weights, mode, sizes, saliency method.
        seed: seeds a randomly initialised backbone (``weights: none``), so a resumed run uses the same weights.
        limit: process at most this many pending images, then stop (as an interruption would).

    Returns:
        A summary: items, done, failed, processed this run, seconds, images/s, backbone GFLOPs per image.
    """
    if num_workers < 0 or (limit is not None and limit < 0):
        raise KaleidoError(f"--workers ({num_workers}) and --limit ({limit}) must not be negative")
    cat = load_catalogue(catalogue)
    if not cat.items:
        raise KaleidoError(f"catalogue {catalogue} has no items")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(config.backbone, config.weights, device=device)
    encoder = PatchEncoder(backbone, mode=config.mode, patch_size=config.patch_size, image_size=config.image_size,
                           batch_size=config.batch_size)
    manifest = store_manifest(config, feature_size=backbone.feature_size, catalogue_hash=cat.hash(), seed=seed)
    manifest["catalogue"] = str(Path(catalogue).resolve())
    hashes = cat.image_hashes()
    writer = StoreWriter(out, manifest, [it.id for it in cat.items], image_hashes=hashes)
    pending = writer.pending()
    if limit is not None:
        pending = pending[:limit]
    paths = [cat.image_path(it) for it in cat.items]
    dataset = _ImageDataset(paths, pending, config.saliency, config.saliency_checkpoint, hashes)
    loader = DataLoader(dataset, batch_size=IMAGES_PER_BATCH, num_workers=num_workers, collate_fn=list,
                        worker_init_fn=_worker_init if num_workers else None)
    start = last_flush = time.perf_counter()
    bar = tqdm(total=len(pending), unit="img", desc=f"patches ({config.mode}, {config.backbone})", disable=not progress)
    with bar:  # closed before an error propagates, so the error prints on a line of its own
        for batch in loader:
            good = [b for b in batch if "image" in b]
            for b in batch:
                if "problem" in b:
                    item_id = cat.items[b["row"]].id
                    writer.fail(b["row"], item_id, b["problem"])
                    tqdm.write(f"skipped item {item_id}: {b['problem']}")
            if good:
                boxes = [kaleido_boxes(b["box"]) for b in good]
                feats = encoder.encode([b["image"] for b in good], boxes)
                for b, box, feat in zip(good, boxes, feats, strict=True):
                    h, w = b["image"].shape[1:]
                    s = b["scale"]
                    writer.write(b["row"], features=feat, boxes=box / s, positions=positions(box, w, h),
                                 saliency=tuple(v / s for v in b["box"]), fallback=b["fallback"],
                                 size=(round(w / s), round(h / s)))
            bar.update(len(batch))
            if time.perf_counter() - last_flush > FLUSH_SECONDS:
                writer.flush()
                last_flush = time.perf_counter()
        writer.flush()
    seconds = time.perf_counter() - start
    return {
        "store": str(out), "items": len(cat.items), "processed": len(pending), "changed": len(writer.changed),
        "done": writer.manifest["done"], "failed": writer.manifest["failed"],
        "fallback_boxes": writer.manifest["fallback_boxes"],
        "complete": writer.manifest["complete"], "seconds": round(seconds, 2),
        "images_per_s": round(len(pending) / seconds, 2) if seconds > 0 else None,
        "gflops_per_image": round(encoder.flops_per_image() / 1e9, 3),
    }
