"""``kaleido patches``: run the Kaleido Patch Generator over a catalogue into a feature store (paper §3.2).

Per image: decode (DataLoader workers) → saliency box → 55 Kaleido boxes and positions → 74 patch features
(``features.PatchEncoder``) → one store row. Images are encoded in fixed batches of the catalogue's row order
(batch b holds rows 8b … 8b+7) whatever is left to do, so that a resumed, limited or sharded run encodes every
image next to the same images as one uninterrupted process does, and writes the same bytes. Resumable: rows
already marked done are skipped, so a killed run re-run with the same arguments only does the rest; a bad image
is recorded and the run goes on. Each image is checked against the content hash the catalogue recorded, and a
re-run after the catalogue changed extracts the images whose content changed again, and the items it gained
(the store grows: :func:`~kaleido_bert.patches.store_writer.grow_rows`;
:class:`~kaleido_bert.patches.store_writer.StoreWriter`).

Under ``torchrun`` (``RANK``/``WORLD_SIZE``, :mod:`kaleido_bert.distributed`) batch b goes to rank b mod W.
Rank 0 projects the store's size, creates or resumes the store and merges what an earlier run's shards committed;
then every rank writes its rows into the shared arrays and its own status/problems shard
(:class:`~kaleido_bert.patches.shards.ShardWriter`). Rank 0 waits for the other ranks' shards on disk (the one
collective is the start barrier, so ranks that finish hours apart cannot time out), merges them and marks the
store complete. A re-run, with the same or another number of processes, merges first and then shares out what
is left: each rank does only the remainder of its own batches.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kaleido_bert import distributed as dist
from kaleido_bert.config import FeaturesConfig
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.data.images import downscale, load_rgb
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.backbones import build_backbone
from kaleido_bert.patches.features import PatchEncoder
from kaleido_bert.patches.grid import kaleido_boxes, positions
from kaleido_bert.patches.saliency import build_saliency
from kaleido_bert.patches.shards import ShardWriter
from kaleido_bert.patches.store_files import FAILED, TODO, load_status, shard_files
from kaleido_bert.patches.store_writer import RowWriter, StoreWriter

IMAGES_PER_BATCH = 8
"""Images per encoder call; batch b of a store is always rows 8b … 8b+7."""
FLUSH_SECONDS = 1.0
"""Rows are committed after the first batch, then after the batch that ends this long after the last commit."""
WAIT_SECONDS = 0.5
"""How often rank 0 looks at the other ranks' shards once its own batches are done."""


class RankZeroRefused(KaleidoError):
    """Raised on the other ranks of a sharded run when rank 0 refused the store (rank 0 reports why)."""


class _ImageDataset(Dataset):
    """Decode an image and find its saliency box; a problem is returned, not raised, so the run continues."""

    def __init__(self, paths: list[Path], rows: list[int], saliency: str, checkpoint: str | None,
                 hashes: list[str], max_side: int) -> None:
        self.paths, self.rows, self.hashes = paths, rows, hashes
        self.saliency, self.checkpoint, self.max_side = saliency, checkpoint, max_side
        self._detector = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        try:
            image, scale = downscale(load_rgb(self.paths[row], sha256=self.hashes[row] or None), self.max_side)
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
        "saliency": config.saliency, "max_side": config.max_side, "levels": 5, "feature_size": feature_size,
        "catalogue_hash": catalogue_hash,
    }


def batch_plan(status: np.ndarray, *, world_size: int = 1, rank: int = 0,
               limit: int | None = None) -> tuple[list[list[int]], set[int]]:
    """This rank's batches (row indices to decode, in order) and the rows it writes.

    Batch b holds rows 8b … 8b+7; it is this rank's when b mod W = rank and one of its rows is among the first
    ``limit`` rows to do (all of them without a limit). A batch is decoded and encoded whole, its done rows too
    (failed rows never were), so each image meets the same batch as in one uninterrupted run; only its rows to
    do are written.
    """
    todo = np.flatnonzero(status == TODO)[:limit]
    writes = set(todo.tolist())
    batches = []
    for b in sorted({i // IMAGES_PER_BATCH for i in writes}):
        if b % world_size == rank:
            rows = range(b * IMAGES_PER_BATCH, min((b + 1) * IMAGES_PER_BATCH, len(status)))
            batches.append([i for i in rows if status[i] != FAILED])
    return batches, {i for batch in batches for i in batch if i in writes}


def rank_rows(n: int, world_size: int, rank: int) -> np.ndarray:
    """Mask of the rows rank ``rank`` owns: those of batches b with b mod W = rank."""
    return (np.arange(n) // IMAGES_PER_BATCH) % world_size == rank


def _open_store(out: Path, manifest: dict[str, Any], ids: list[str], hashes: list[str], *,
                progress: bool) -> tuple[RowWriter, list[int], int]:
    """Rank 0 creates or resumes the store (merging old shards); under ``torchrun`` every rank then opens its
    shard. Returns the writer, the rows whose image changed since the store was built and how many rows the
    store gained (items the catalogue gained since)."""
    rank, world = dist.rank(), dist.world_size()
    writer, refusal = None, None
    if rank == 0:
        try:
            writer = StoreWriter(out, manifest, ids, image_hashes=hashes)
        except KaleidoError as err:
            if world == 1:
                raise
            refusal = err
        else:
            if progress:
                print(writer.projection, file=sys.stderr, flush=True)
    if world == 1:
        return writer, writer.changed, len(writer.added)
    reasons = dist.all_gather_object(str(refusal) if refusal else None)  # also the barrier: the store exists
    # The only collective of the run: the ranks leave the group together now, so ranks that finish hours apart
    # never wait in a collective (its timeout) nor in NCCL's collective teardown; rank 0 then waits on disk.
    dist.cleanup()
    if refusal is not None:
        raise refusal
    if reasons[0]:
        raise RankZeroRefused(reasons[0])
    changed, added = (writer.changed, len(writer.added)) if writer else ([], 0)
    if writer:
        writer.close()
    shard = ShardWriter(out, manifest, ids, rank=rank, world_size=world, owned=rank_rows(len(ids), world, rank))
    return shard, changed, added


def _wait_for_ranks(out: Path, plans: list[tuple[list[list[int]], set[int]]], n: int, *, progress: bool) -> None:
    """Rank 0: wait until each other rank's shard on disk marks the rows it planned done or failed."""
    world = len(plans)
    waiting = {r: np.array(sorted(plans[r][1])) for r in range(1, world) if plans[r][1]}
    if waiting and progress:
        print(f"rank 0 done; waiting for rank(s) {', '.join(map(str, waiting))}", file=sys.stderr, flush=True)
    while waiting:
        for r, rows in list(waiting.items()):
            name = shard_files(r, world)[0]
            if (out / name).is_file() and (load_status(out, n, name)[rows] != TODO).all():
                del waiting[r]
        if waiting:
            time.sleep(WAIT_SECONDS)


def extract_features(
    catalogue: str | Path, out: str | Path, config: FeaturesConfig, *, seed: int = 0, device: str = "cpu",
    num_workers: int = 2, limit: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) the feature store of a catalogue; under ``torchrun``, this rank's share of it.

    Args:
        catalogue: catalogue directory.
        out: store directory (created, or resumed when its manifest matches).
        config: backbone, weights, mode, sizes, saliency method.
        seed: seeds a randomly initialised backbone (``weights: none``), so a resumed run uses the same weights.
        device: ``cpu`` or ``cuda`` (under ``torchrun``: this rank's ``cuda:LOCAL_RANK``).
        limit: process at most this many pending images (the first, in row order, over all ranks), then stop
            (as an interruption would).

    Returns:
        A summary: items, done, failed, processed this run, seconds, images/s, backbone GFLOPs per image, and per
        rank its rows, the rows it skipped (done or failed before) and the rows it processed. Under ``torchrun``
        only rank 0 returns once the store is merged (and its summary covers it); the other ranks return as soon
        as their own rows are committed, having left the process group (``distributed.init`` joins it again).
    """
    if num_workers < 0 or (limit is not None and limit < 0):
        raise KaleidoError(f"--workers ({num_workers}) and --limit ({limit}) must not be negative")
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    if device == "cuda" and world > 1:
        device = str(dist.device())
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
    out, ids, hashes = Path(out), [it.id for it in cat.items], cat.image_hashes()
    writer, changed, added = _open_store(out, manifest, ids, hashes, progress=progress)
    before = writer.status.copy()
    plans = [batch_plan(before, world_size=world, rank=r, limit=limit) for r in range(world)]
    batches, writes = plans[rank]
    start = time.perf_counter()
    try:
        _encode_batches(cat, writer, encoder, config, batches, writes, hashes, num_workers=num_workers,
                        desc=f"patches ({config.mode}, {config.backbone})" + (f" rank 0 of {world}" if world > 1 else ""),
                        progress=progress and rank == 0)
    finally:
        writer.close()
    owners = [rank_rows(len(ids), world, r) for r in range(world)]
    ranks = [{"rank": r, "rows": int(owned.sum()), "skipped": int((owned & (before != TODO)).sum()),
              "processed": len(plans[r][1])} for r, owned in enumerate(owners)]
    if world > 1:
        if rank != 0:
            return {"store": str(out), "rank": rank, **ranks[rank], "seconds": round(time.perf_counter() - start, 2)}
        _wait_for_ranks(out, plans, len(ids), progress=progress)
        writer = StoreWriter(out, manifest, ids, image_hashes=hashes)  # merges the shards, marks the store complete
        writer.close()
    seconds = time.perf_counter() - start
    processed = sum(r["processed"] for r in ranks)
    return {
        "store": str(out), "items": len(cat.items), "processes": world, "processed": processed,
        "changed": len(changed), "added": added, "done": writer.manifest["done"], "failed": writer.manifest["failed"],
        "fallback_boxes": writer.manifest["fallback_boxes"], "complete": writer.manifest["complete"],
        "seconds": round(seconds, 2), "images_per_s": round(processed / seconds, 2) if seconds > 0 else None,
        "gflops_per_image": round(encoder.flops_per_image() / 1e9, 3), "ranks": ranks,
    }


def _encode_batches(cat, writer: RowWriter, encoder: PatchEncoder, config: FeaturesConfig, batches: list[list[int]],
                    writes: set[int], hashes: list[str], *, num_workers: int, desc: str, progress: bool) -> None:
    """Decode and encode ``batches`` whole; write the rows of ``writes`` and commit them (after the first batch,
    then about every second, and at the end)."""
    if not batches:
        return
    order = [i for batch in batches for i in batch]
    ends = np.cumsum([len(batch) for batch in batches]).tolist()
    sampler = [list(range(end - len(batch), end)) for batch, end in zip(batches, ends, strict=True)]
    dataset = _ImageDataset([cat.image_path(it) for it in cat.items], order, config.saliency,
                            config.saliency_checkpoint, hashes, max_side=config.max_side)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=list,
                        worker_init_fn=_worker_init if num_workers else None)
    last_flush = float("-inf")  # the first batch is committed at once, then about every FLUSH_SECONDS
    bar = tqdm(total=len(writes), unit="img", desc=desc, disable=not progress)
    with bar:  # closed before an error propagates, so the error prints on a line of its own
        for batch in loader:
            good = [b for b in batch if "image" in b]
            for b in batch:
                if "problem" in b and b["row"] in writes:
                    item_id = cat.items[b["row"]].id
                    writer.fail(b["row"], item_id, b["problem"])
                    tqdm.write(f"skipped item {item_id}: {b['problem']}")
            if good:
                boxes = [kaleido_boxes(b["box"]) for b in good]
                feats = encoder.encode([b["image"] for b in good], boxes)
                for b, box, feat in zip(good, boxes, feats, strict=True):
                    if b["row"] not in writes:  # encoded only to keep the batch whole
                        continue
                    h, w = b["image"].shape[1:]
                    s = b["scale"]
                    writer.write(b["row"], features=feat, boxes=box / s, positions=positions(box, w, h),
                                 saliency=tuple(v / s for v in b["box"]), fallback=b["fallback"],
                                 size=(round(w / s), round(h / s)))
            bar.update(sum(b["row"] in writes for b in batch))
            if time.perf_counter() - last_flush > FLUSH_SECONDS:
                writer.flush()
                last_flush = time.perf_counter()
        writer.flush()
