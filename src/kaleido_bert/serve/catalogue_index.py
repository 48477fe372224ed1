"""The catalogue index of the search service: dual-encoder embeddings of every catalogue item (beyond the paper).

Full-gallery search (beyond the paper) runs the retrieval model as a dual encoder: text alone gives the text embedding,
a lone ``[CLS]`` in front of the 55 Kaleido patches gives the image embedding (both through the ITC projections
when the model has them), and the ITM head re-scores the best candidates as a cross-encoder.
:class:`~kaleido_bert.eval.retrieval.DualEncoder` does all three on raw inputs (query strings, patch features of uploads
or of feature-store rows).

``kaleido index`` embeds a catalogue once into an index directory (:func:`index_catalogue`)::

    INDEX/images/    ProductIndex of item (image) embeddings, ids = catalogue item ids
    INDEX/texts/     ProductIndex of product description embeddings, ids = product ids
    INDEX/index.json the config hash, the run, catalogue and feature store it was built from, counts

Both ProductIndex metas carry the same ``config_hash`` (:func:`config_hash`: the retrieval checkpoint's
``config.json``, a content hash of its ``model.safetensors``, its ``vocab.txt`` and the feature store's patch
generator settings). The catalogue is not part of the hash, so a grown catalogue can be added incrementally
(``--add``), while a different model or patch generator is refused. The whole directory is replaced atomically.

When the retrieval checkpoint keeps a query bank with an active β (:mod:`kaleido_bert.eval.query_bank`, chosen on
validation by ``kaleido evaluate``), each vector carries its offset (images: against the training descriptions,
for text queries; descriptions: against the training images, for image queries), so the service ranks a
description query over images, and an image over descriptions, by ``cos − offset`` as the evaluation does; its
facts are part of the config hash.

Shapes: B batch, T text tokens, P patches (55), F patch feature size, D embedding size; embeddings are
``(N, D)`` float32, L2-normalised.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_directory, atomic_write_json, read_json
from kaleido_bert.checkpoint import read_model_config
from kaleido_bert.config import RunConfig, load_config
from kaleido_bert.data.catalogue import Catalogue, Item, is_view, load_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.query_bank import load_query_bank, query_bank_choice
from kaleido_bert.model.calibration import current_calibration, model_hash
from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.runs import run_parts
from kaleido_bert.serve.index import IndexKind, ProductIndex

IMAGES_DIR, TEXTS_DIR, INDEX_JSON = "images", "texts", "index.json"
HASH_KEYS = ("backbone", "weights", "seed", "mode", "patch_size", "image_size", "saliency", "levels", "feature_size")
"""Feature-store manifest fields that decide how an image becomes patch features (part of the config hash)."""
BANK_KEYS = ("beta", "mix", "dim", "images", "texts")
"""Query-bank facts (the calibration record's β choice, when active) that the config hash covers."""


# ---------------------------------------------------------------------------------------------- what a run serves
@dataclass
class RunData:
    """The retrieval checkpoint of a run with the run config, catalogue and feature store it is served over."""

    run: Path
    parts: dict[str, Path]  # part name → checkpoint (see ``evaluate.run_parts``)
    checkpoint: Path  # the retrieval model: finetune/retrieval if present, else pretrain
    config: RunConfig  # the checkpoint's run.yaml
    catalogue: Catalogue
    store: FeatureStore

    def items(self) -> list[Item]:
        """Catalogue items with features, in catalogue order; scaled training views are left out (a search
        result is a catalogue image, not its downscaled copy)."""
        return [it for it in self.catalogue.items if it.id in self.store and not is_view(it)]

    def config_hash(self) -> str:
        return config_hash(self.checkpoint, self.store.manifest,
                           query_bank=query_bank_choice(self.checkpoint, self.config))


def open_run(run: str | Path, *, catalogue: str | Path | None = None,
             features: str | Path | None = None) -> RunData:
    """Resolve a run directory (or a checkpoint) to its retrieval model, config, catalogue and feature store.

    Args:
        run: a run directory (``RUN/pretrain``, ``RUN/finetune/...``) or a checkpoint directory.
        catalogue: the catalogue served (default ``data.catalogue`` of the checkpoint's run.yaml).
        features: its feature store (default ``data.features`` of the run.yaml).

    Raises:
        KaleidoError: no checkpoint, no run.yaml, a stale calibration record or none where the run config asks for
            validation choices, no catalogue/store given or configured, a store built from another catalogue or
            with another feature size than the model's (one line each).
    """

    run = Path(run)
    parts = run_parts(run)
    checkpoint = parts.get("retrieval", parts["pretrain"])
    if not (checkpoint / "run.yaml").is_file():
        raise KaleidoError(f"checkpoint {checkpoint} has no run.yaml: it was not written by kaleido pretrain/finetune")
    config = load_config(checkpoint / "run.yaml")
    for ranked in dict.fromkeys((parts["pretrain"], checkpoint)):  # the validation choices search reads
        current_calibration(ranked, config, run=run)
    catalogue_dir = catalogue or config.data.catalogue
    features_dir = features or config.data.features
    if not catalogue_dir or not features_dir:
        raise KaleidoError(f"the run config of {checkpoint} names no catalogue and feature store: pass --catalogue "
                           "and --features")
    for given, configured, flag in ((catalogue, catalogue_dir, "--catalogue"), (features, features_dir, "--features")):
        if given is None and not Path(configured).is_dir():
            raise KaleidoError(f"{configured}, named by the run config of {checkpoint}, is not a directory (relative "
                               f"paths are read from the current directory): pass {flag}")
    cat = load_catalogue(catalogue_dir)
    feature_size = int(read_model_config(checkpoint)["patch_feature_size"])
    store = FeatureStore(features_dir, expect={"feature_size": feature_size})
    store.require_catalogue(cat)
    return RunData(run=run, parts=parts, checkpoint=checkpoint, config=config, catalogue=cat, store=store)


def config_hash(checkpoint: str | Path, manifest: dict[str, Any], *, query_bank: dict[str, Any] | None = None) -> str:
    """16 hex digits identifying what an index's embeddings depend on: model, vocabulary and patch generator.

    Covers the checkpoint's model (:func:`~kaleido_bert.model.calibration.model_hash`: weights, ``config.json``,
    vocabulary, frozen member), the :data:`HASH_KEYS` of the feature store's manifest and an active query bank's
    facts; not the catalogue itself.
    """
    digest = hashlib.sha256(model_hash(checkpoint).encode())
    digest.update(json.dumps({k: manifest.get(k) for k in HASH_KEYS}, sort_keys=True).encode())
    if query_bank is not None and float(query_bank["beta"]) > 0:  # the offsets the vectors carry
        digest.update(json.dumps({k: query_bank.get(k) for k in BANK_KEYS}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the index
@dataclass
class CatalogueIndex:
    """Item image embeddings and product description embeddings of one catalogue, with their facts."""

    images: ProductIndex  # ids = item ids
    texts: ProductIndex  # ids = product ids
    facts: dict[str, Any]  # index.json: config_hash, run, catalogue, features, counts

    @property
    def config_hash(self) -> str:
        return str(self.facts.get("config_hash"))

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``images/``, ``texts/`` and ``index.json``; the directory is replaced as a whole, atomically."""
        directory = Path(directory)
        if overwrite and directory.is_dir() and any(directory.iterdir()) and not (directory / INDEX_JSON).is_file():
            raise KaleidoError(f"{directory} is not empty and holds no {INDEX_JSON}: refusing to replace it")
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.images.save(tmp / IMAGES_DIR)
            self.texts.save(tmp / TEXTS_DIR)
            atomic_write_json(tmp / INDEX_JSON, {**self.facts, "items": len(self.images),
                                                 "products": len(self.texts), "kind": self.images.kind})
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, expect_hash: str | None = None) -> CatalogueIndex:
        """Read an index written by :meth:`save`; a different config hash than ``expect_hash`` is refused.

        Raises:
            KaleidoError: not an index directory, damaged parts, or a config hash mismatch (one line).
        """
        directory = Path(directory)
        if not (directory / INDEX_JSON).is_file():
            raise KaleidoError(f"{directory} is not a catalogue index ({INDEX_JSON} not found): build one with "
                               "kaleido index RUN --out DIR")
        facts = read_json(directory / INDEX_JSON, dict, fix=f"rebuild it with kaleido index RUN --out {directory}")
        images = ProductIndex.load(directory / IMAGES_DIR, expect_hash=expect_hash)
        texts = ProductIndex.load(directory / TEXTS_DIR, expect_hash=expect_hash)
        return cls(images=images, texts=texts, facts=facts)


def _embed_items(encoder: DualEncoder, store: FeatureStore, item_ids: list[str], *, progress: bool) -> np.ndarray:
    parts = [np.empty((0, encoder.dim), np.float32)]
    with tqdm(total=len(item_ids), desc="index images", unit="img", disable=not progress) as bar:
        for start in range(0, len(item_ids), encoder.batch_size):
            chunk = item_ids[start:start + encoder.batch_size]
            parts.append(encoder.embed_patches(*store_patches(store, chunk)))
            bar.update(len(chunk))
    return np.concatenate(parts)


def embed_catalogue(encoder: DualEncoder, data: RunData, *, kind: IndexKind = "exact",
                    existing: CatalogueIndex | None = None, progress: bool = True) -> tuple[CatalogueIndex, dict]:
    """Embed the items (and products) of ``data`` that ``existing`` lacks; build a new index when it is None.

    Returns:
        The index and ``{"added_items", "added_products", "seconds", "items_per_s"}``.
    """
    items = data.items()
    if not items:
        raise KaleidoError(f"catalogue {data.catalogue.root} has no items with features in {data.store.root}")
    new_items = [it.id for it in items if existing is None or it.id not in existing.images]
    texts = product_descriptions(items)
    new_products = [p for p in texts if existing is None or p not in existing.texts]
    start = time.perf_counter()
    image_emb = _embed_items(encoder, data.store, new_items, progress=progress)
    text_emb = encoder.embed_texts([texts[p] for p in new_products], progress=progress)
    bank = load_query_bank(data.checkpoint, data.config, encoder)  # None: plain cosines
    image_offsets = bank.image_offsets(image_emb) if bank is not None else None  # for description queries
    text_offsets = bank.text_offsets(text_emb) if bank is not None else None  # for image queries
    facts = {"config_hash": data.config_hash(), "run": str(data.run), "checkpoint": str(data.checkpoint),
             "catalogue": str(data.catalogue.root), "catalogue_hash": data.catalogue.hash(),
             "features": str(data.store.root)}
    if existing is None:
        meta = {"config_hash": facts["config_hash"], "checkpoint": facts["checkpoint"]}
        index = CatalogueIndex(
            images=ProductIndex.build(new_items, image_emb, kind=kind, meta={**meta, "ids": "item"},
                                      offsets=image_offsets),
            texts=ProductIndex.build(new_products, text_emb, kind=kind, meta={**meta, "ids": "product"},
                                     offsets=text_offsets),
            facts=facts)
    else:
        existing.images.add(new_items, image_emb, offsets=image_offsets)
        existing.texts.add(new_products, text_emb, offsets=text_offsets)
        existing.facts.update(facts)
        index = existing
    seconds = time.perf_counter() - start
    return index, {"added_items": len(new_items), "added_products": len(new_products), "seconds": round(seconds, 2),
                   "items_per_s": round(len(new_items) / seconds, 1) if seconds > 0 and new_items else None}


def index_catalogue(run: str | Path, out: str | Path, *, catalogue: str | Path | None = None,
                    features: str | Path | None = None, kind: IndexKind = "exact", add: bool = False,
                    overwrite: bool = False, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``kaleido index``: embed every catalogue item with features into an index directory.

    Args:
        run: run directory or checkpoint (its retrieval model embeds).
        out: the index directory.
        catalogue, features: override the run config's ``data.catalogue`` / ``data.features``.
        kind: ``exact``, ``ivf`` or ``hnsw`` (a new index only; ``add`` keeps the existing kind).
        add: add the items (and products) missing from the existing index at ``out``; its config hash must be
            this run's. Builds a new index when ``out`` holds none.
        overwrite: replace an existing index at ``out`` (without ``add``).
        device: where the model runs (default CUDA when available).

    Returns:
        A summary: index path, kind, config hash, items, products, added counts, seconds, items/s.

    Raises:
        KaleidoError: an existing index without ``add``/``overwrite``, a config hash mismatch on ``add``, and what
            :func:`open_run` refuses.
    """
    out = Path(out)
    data = open_run(run, catalogue=catalogue, features=features)
    existing = None
    if (out / INDEX_JSON).is_file():
        if add:
            existing = CatalogueIndex.load(out, expect_hash=data.config_hash())
        elif not overwrite:
            raise KaleidoError(f"{out} already holds an index: pass --add to add new items or --overwrite to rebuild")
    elif out.exists() and any(out.iterdir()):
        raise KaleidoError(f"{out} exists, is not empty and holds no catalogue index: choose another --out")
    device = device or str(dist.device())
    encoder = DualEncoder.from_checkpoint(data.checkpoint, batch_size=data.config.eval.batch_size, device=device)
    index, summary = embed_catalogue(encoder, data, kind=kind, existing=existing, progress=progress)
    index.save(out, overwrite=True)
    return {"index": str(out), "kind": index.images.kind, "config_hash": index.config_hash,
            "items": len(index.images), "products": len(index.texts), **summary}
