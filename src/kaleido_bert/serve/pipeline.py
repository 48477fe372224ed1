"""The Python API of a trained run: encode, score, search, caption and classify raw images and texts (beyond the paper).

:class:`KaleidoBertPipeline` loads every model of a run directory once (the layout of
:func:`kaleido_bert.runs.run_parts`) and is what ``kaleido serve`` wraps (:mod:`kaleido_bert.serve.app`):

============================  =====================================================================
model                         used by
============================  =====================================================================
finetune/retrieval (else      ``encode_text``, ``encode_image``, ``score``, ``search_text``,
pretrain)                     ``search_image``: dual-encoder recall, ITM re-ranking; ``zero_shot``:
                              labels ranked by their prompts' cosine with the photo
finetune/caption              ``caption``: beam search with the seq2seq mask (paper §4.2 FC); a run
                              without one and with ``eval.caption_retrieval_k`` = k > 0 (the ``real``
                              recipe) captions by retrieval: the consensus of the k catalogue
                              descriptions nearest the photo in the retrieval model's space
finetune/{category,           ``classify``: image-only classifiers for a photo alone, image+text ones
subcategory}[-image]          when a text comes with it (paper §4.2 CR/SUB)
============================  =====================================================================

An uploaded photo goes through the Kaleido Patch Generator of the catalogue's feature store
(:class:`PatchGenerator`: the store manifest's backbone, weights, seed, mode, sizes and saliency method; the
steps of :mod:`kaleido_bert.patches.extraction`), so it is encoded exactly like the catalogue images it is compared with.

Search: the query embedding recalls catalogue images from the :class:`~kaleido_bert.serve.catalogue_index.CatalogueIndex`
(optionally only one category's), results are deduplicated by product (its best image), and with ``rerank``
the best ``min(eval.rerank_k, 50)`` products (at least ``k``) are re-scored in one batch by the ITM logit. With a
query bank in the index, a description query ranks images (and a photo ranks descriptions) by the normalised
``cos − offset``, which is then the ITC part of the pair score; photo-to-photo similarity and retrieved captions
stay plain cosines, as evaluated.

Shapes: P patches (55), F patch feature size, D embedding size; embeddings ``(N, D)`` float32, L2-normalised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kaleido_bert import distributed as dist
from kaleido_bert.data.catalogue import LABEL_FIELDS
from kaleido_bert.errors import KaleidoError, require_utf8
from kaleido_bert.eval.caption_retrieval import caption_k
from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
from kaleido_bert.model.loading import load_pretrained, require_head
from kaleido_bert.model.zero_shot import DEFAULT_TEMPLATE, prompts, rank_labels
from kaleido_bert.serve.catalogue_index import CatalogueIndex, RunData, embed_catalogue, open_run

RERANK_CAP = 50
"""Most candidates the ITM cross-encoder re-scores per query (beyond ``k``)."""
DESCRIPTIONS = 5
"""Catalogue descriptions returned by :meth:`KaleidoBertPipeline.search_image`."""
TOP_LABELS = 5
"""Labels per field returned by :meth:`KaleidoBertPipeline.classify`."""
CLASSIFIER_PARTS = {("category", "image+text"): "category", ("category", "image"): "category-image",
                    ("subcategory", "image+text"): "subcategory", ("subcategory", "image"): "subcategory-image"}




class PatchGenerator:
    """The Kaleido Patch Generator of a feature store, applied to new images (paper §3.2).

    Per image, as ``kaleido patches``: downscale to at most the store's ``max_side``, saliency box, the 55 Kaleido
    boxes, the backbone's patch features (colour rows) and the 5-d positions.

    Args:
        manifest: the feature store's manifest (backbone, weights, seed, mode, patch_size, image_size, saliency).
        saliency_checkpoint: the U-Net checkpoint when the saliency method is ``unet``.
        batch_size: backbone inputs per forward pass.
        device: where the backbone runs.
    """

    def __init__(self, manifest: dict[str, Any], *, saliency_checkpoint: str | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> None:
        from kaleido_bert.patches.backbones import build_backbone
        from kaleido_bert.patches.features import PatchEncoder
        from kaleido_bert.patches.saliency import build_saliency
        from kaleido_bert.patches.store import manifest_value

        with torch.random.fork_rng(devices=[]):  # a random-init backbone is seeded as extraction seeded it
            torch.manual_seed(int(manifest.get("seed") or 0))
            backbone = build_backbone(manifest["backbone"], manifest["weights"], device=device)
        if backbone.feature_size != int(manifest["feature_size"]):
            raise KaleidoError(f"backbone {manifest['backbone']} gives {backbone.feature_size}-d features, the store "
                               f"has {manifest['feature_size']}")
        self.encoder = PatchEncoder(backbone, mode=manifest["mode"], patch_size=int(manifest["patch_size"]),
                                    image_size=int(manifest["image_size"]), batch_size=batch_size)
        self.detector = build_saliency(manifest["saliency"], checkpoint=saliency_checkpoint, device=str(device))
        self.max_side = int(manifest_value(manifest, "max_side"))
        self.settings = {k: manifest.get(k) for k in ("backbone", "weights", "mode", "patch_size", "image_size",
                                                      "saliency")} | {"max_side": self.max_side}

    @classmethod
    def of_run(cls, data: RunData, device: str | torch.device = "cpu") -> PatchGenerator:
        """The patch generator of a run's feature store, with the run's saliency checkpoint and batch size."""
        return cls(data.store.manifest, saliency_checkpoint=data.config.features.saliency_checkpoint,
                   batch_size=data.config.features.batch_size, device=device)

    def __call__(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """RGB images → colour patch features ``(B, P, F)`` and positions ``(B, P, 5)``, float32 on the CPU."""
        from kaleido_bert.data.images import downscale
        from kaleido_bert.patches.features import NUM_COLOUR
        from kaleido_bert.patches.grid import kaleido_boxes, positions

        tensors, boxes, places = [], [], []
        for image in images:
            image, _ = downscale(image.convert("RGB"), self.max_side)
            pixels = np.asarray(image)
            box = kaleido_boxes(self.detector(pixels).box)
            tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
            h, w = tensor.shape[1:]
            tensors.append(tensor)
            boxes.append(box)
            places.append(positions(box, w, h))
        feats = self.encoder.encode(tensors, boxes)[:, :NUM_COLOUR]  # (B, P, F)
        return feats.float(), torch.stack(places)


class KaleidoBertPipeline:
    """A run's models, its catalogue and its index, loaded once; build it with :meth:`from_pretrained`."""

    def __init__(self, *, data: RunData, encoder: DualEncoder, patches: PatchGenerator, index: CatalogueIndex,
                 captioner: Any = None, classifiers: dict[tuple[str, str], Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.data, self.encoder, self.patches, self.index = data, encoder, patches, index
        self.captioner, self.classifiers = captioner, dict(classifiers or {})
        self.device = torch.device(device)
        self.config = data.config
        self.items = {it.id: it for it in data.catalogue.items}
        unknown = [i for i in index.images.ids if i not in self.items]
        if unknown:
            raise KaleidoError(f"the index holds {len(unknown)} items the catalogue {data.catalogue.root} lacks (e.g. "
                               f"{unknown[0]!r}): index this catalogue with kaleido index")
        indexed = [self.items[i] for i in index.images.ids]
        self.descriptions = product_descriptions(indexed)
        self.titles: dict[str, str] = {}  # product id → its title (a product's first row names it)
        self.by_category: dict[str, list[str]] = {}
        views: dict[str, int] = {}
        for it in indexed:
            self.titles.setdefault(it.product_id, it.title)
            self.by_category.setdefault(it.category, []).append(it.id)
            views[it.product_id] = views.get(it.product_id, 0) + 1
        self.max_views = max(views.values(), default=1)
        self.caption_k = caption_k(data.checkpoint, self.config) if self.config.eval.caption_retrieval_k else 0
        """Consensus k of retrieved captions: the one chosen on validation, else ``eval.caption_retrieval_k``."""
        self._similarity: tuple[list[str], dict[str, int], Any] | None = None  # (ids, rows, NgramSimilarity)

    @classmethod
    def from_pretrained(cls, run: str | Path, *, index: str | Path | None = None,
                        catalogue: str | Path | None = None, features: str | Path | None = None,
                        device: str | torch.device | None = None, progress: bool = True) -> KaleidoBertPipeline:
        """Load a run directory's models, catalogue, feature store and index.

        Args:
            run: run directory (``RUN/pretrain``, ``RUN/finetune/...``) or a single checkpoint.
            index: a ``kaleido index`` directory (its config hash must match); None embeds the catalogue now.
            catalogue, features: override the run config's ``data.catalogue`` / ``data.features``.
            device: where the models run (default CUDA when available).
            progress: progress bars while embedding the catalogue (``index=None``).

        Raises:
            KaleidoError: a missing part, catalogue or store, a store of another catalogue, or an index built
                with another model or patch generator (one line each).
        """
        from kaleido_bert.model.captioning import KaleidoBertForCaptioning
        from kaleido_bert.model.classification import KaleidoBertForClassification

        device = torch.device(device) if device else dist.device()
        data = open_run(run, catalogue=catalogue, features=features)
        encoder = DualEncoder.from_checkpoint(data.checkpoint, batch_size=data.config.eval.batch_size, device=device)
        if index is None:
            loaded, _ = embed_catalogue(encoder, data, progress=progress)
        else:
            loaded = CatalogueIndex.load(index, expect_hash=data.config_hash())
        patches = PatchGenerator.of_run(data, device)
        captioner = None
        if "caption" in data.parts:
            require_head(data.parts["caption"], "lm.", "captioning")
            captioner = load_pretrained(KaleidoBertForCaptioning, data.parts["caption"]).eval().to(device)
        classifiers = {}
        for key, part in CLASSIFIER_PARTS.items():
            if part in data.parts:
                require_head(data.parts[part], "classifier.", "classification")
                classifiers[key] = load_pretrained(KaleidoBertForClassification, data.parts[part]).eval().to(device)
        return cls(data=data, encoder=encoder, patches=patches, index=loaded, captioner=captioner,
                   classifiers=classifiers, device=device)

    # ------------------------------------------------------------------ encoding and scoring
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Dual-encoder text embeddings: ``(N, D)``.

        Raises:
            KaleidoError: a text that is not valid UTF-8 (a lone surrogate), naming which.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            require_utf8(text, f"text {i}")
        return self.encoder.embed_texts(texts)

    def image_features(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """The Kaleido patches of one image as the catalogue's store holds them: ``(P, F)`` and ``(P, 5)``."""
        feats, pos = self.patches([image])
        return feats[0], pos[0]

    def encode_image(self, images: list[Image.Image]) -> np.ndarray:
        """Dual-encoder image embeddings of RGB images (patch generator, then the encoder): ``(N, D)``."""
        return self.encoder.embed_patches(*self.patches(list(images)))

    def score(self, image: Image.Image, text: str) -> float:
        """The ITM logit of an image and a text (higher = a better match)."""
        require_utf8(text, "the text")
        feats, pos = self.patches([image])
        return float(self.encoder.itm_logits([text], feats, pos)[0])

    # ------------------------------------------------------------------ search
    def _hit(self, item_id: str, score: float) -> dict[str, Any]:
        it = self.items[item_id]
        return {"id": it.id, "product_id": it.product_id, "title": it.title, "description": it.description,
                "category": it.category, "subcategory": it.subcategory, "score": float(score), "image": it.image}

    def _top_products(self, query: np.ndarray, n: int, allowed: list[str] | None, *,
                      normalised: bool = True) -> list[tuple[str, float]]:
        """The best image of each of the ``n`` best products by inner product (``normalised``: minus the images'
        query-bank offsets, for description queries): ``[(item id, score)]``."""
        pool = len(self.index.images) if allowed is None else len(allowed)
        depth = min(pool, n * self.max_views)  # n products have at most n * max_views images
        while True:
            best: dict[str, tuple[str, float]] = {}
            for item_id, score in self.index.images.search(query, max(depth, 1), allowed=allowed,
                                                           normalised=normalised)[0]:
                best.setdefault(self.items[item_id].product_id, (item_id, score))
            if len(best) >= n or depth >= pool:
                return list(best.values())[:n]
            depth = min(pool, 2 * depth)

    @property
    def reranks(self) -> bool:
        """Whether text search and image captions-by-description re-score with the cross-encoder: an ITM head and
        the checkpoint's validation choice (:attr:`~kaleido_bert.model.dual_encoder.DualEncoder.rerank`)."""
        return self.encoder.rerank

    def _rerank_depth(self, k: int) -> int:
        return max(k, min(int(self.config.eval.rerank_k), RERANK_CAP))

    def search_text(self, query: str, k: int, *, category: str | None = None,
                    rerank: bool = True) -> list[dict[str, Any]]:
        """The ``k`` products that best match a description, best first, each with its best image.

        Args:
            query: what to look for, in words.
            k: number of products.
            category: only products of this category.
            rerank: re-score the recalled products with the ITM cross-encoder (their ``score`` is then the ITM
                logit, or with ``eval.pair_score = itm+itc`` the ITM log-odds plus the ITC logit; otherwise the
                cosine similarity), when the model's validation choice is to re-rank (``encoder.rerank``).

        Raises:
            KaleidoError: an empty query, ``k`` < 1, or an unknown category.
        """
        if not query or not query.strip():
            raise KaleidoError("the query is empty")
        require_utf8(query, "the query")
        if k < 1:
            raise KaleidoError(f"k must be ≥ 1, got {k}")
        allowed = None
        if category is not None:
            if category not in self.by_category:
                raise KaleidoError(f"unknown category {category!r} (known: {', '.join(self.categories())})")
            allowed = self.by_category[category]
        rerank = rerank and self.reranks
        hits = self._top_products(self.encode_text([query]), self._rerank_depth(k) if rerank else k, allowed)
        if rerank and hits:
            ids = [item_id for item_id, _ in hits]
            feats, pos = store_patches(self.data.store, ids)
            logits = self.encoder.pair_scores([query] * len(ids), feats, pos, [score for _, score in hits],
                                              pair_score=self.config.eval.pair_score)
            order = np.argsort(-logits, kind="stable")
            hits = [(ids[j], float(logits[j])) for j in order]
        return [self._hit(item_id, score) for item_id, score in hits[:k]]

    def search_image(self, image: Image.Image, k: int) -> dict[str, list[dict[str, Any]]]:
        """Products whose images look like ``image`` and the catalogue descriptions that match it best.

        Products are ranked by image-embedding similarity (cosine). Descriptions are recalled with the image
        embedding from the description index and, when the model has an ITM head, re-scored by the ITM logit.

        Returns:
            ``{"products": [result dicts, ≤ k], "descriptions": [{"product_id", "title", "description", "score"},
            ≤ 5]}`` (the product's title and description as the catalogue holds them)
        """
        if k < 1:
            raise KaleidoError(f"k must be ≥ 1, got {k}")
        feats, pos = self.patches([image])
        query = self.encoder.embed_patches(feats, pos)
        products = [self._hit(i, s) for i, s in self._top_products(query, k, None, normalised=False)]
        found = self.index.texts.search(query, self._rerank_depth(DESCRIPTIONS))[0]
        if self.reranks and found:
            texts = [self.descriptions[p] for p, _ in found]
            logits = self.encoder.pair_scores(texts, feats.expand(len(texts), -1, -1),
                                              pos.expand(len(texts), -1, -1), [score for _, score in found],
                                              pair_score=self.config.eval.pair_score)
            found = sorted(((p, float(s)) for (p, _), s in zip(found, logits, strict=True)), key=lambda h: -h[1])
        return {"products": products, "descriptions": [
            {"product_id": p, "title": self.titles[p], "description": self.descriptions[p], "score": float(s)}
            for p, s in found[:DESCRIPTIONS]]}

    # ------------------------------------------------------------------ caption and classify
    @property
    def caption_method(self) -> str | None:
        """``beam`` (the run's caption model), ``retrieval`` (``eval.caption_retrieval_k`` > 0) or None."""
        if self.captioner is not None:
            return "beam"
        return "retrieval" if self.caption_k > 0 and len(self.index.texts) else None

    def caption(self, image: Image.Image) -> str:
        """A description of a photo: generated by the run's caption model (beam search, ``eval.beam_size`` beams,
        ≤ ``eval.max_caption_len`` tokens), or, for a run without one and ``eval.caption_retrieval_k`` = k > 0,
        retrieved: of the k indexed products whose descriptions are nearest the photo's embedding, the
        description most like the other k − 1 (:func:`~kaleido_bert.eval.caption_retrieval.consensus_pick`, the
        ``real`` recipe's captions; the evaluation retrieves from the training products, this from the index).

        Raises:
            KaleidoError: the run has neither a caption model (``kaleido finetune caption``) nor
                ``eval.caption_retrieval_k`` > 0.
        """
        from kaleido_bert.model.decoding import generate

        method = self.caption_method
        if method is None:
            raise KaleidoError(f"run {self.data.run} has no caption model: fine-tune one with kaleido finetune "
                               f"caption --out {self.data.run / 'finetune' / 'caption'}, or caption by retrieval "
                               f"with --set eval.caption_retrieval_k=20")
        feats, pos = self.patches([image])
        if method == "retrieval":
            return self._retrieved_caption(self.encoder.embed_patches(feats, pos))
        tok = self.encoder.tokenizer
        tokens = generate(self.captioner, feats.to(self.device), pos.to(self.device), cls_id=tok.cls_token_id,
                          sep_id=tok.sep_token_id, beam_size=int(self.config.eval.beam_size),
                          max_len=int(self.config.eval.max_caption_len), banned_ids=tok.all_special_ids)[0]
        return tok.decode(tokens, skip_special_tokens=True).lower()

    def _retrieved_caption(self, query: np.ndarray) -> str:
        from kaleido_bert.eval.caption_retrieval import NgramSimilarity, consensus_pick

        if self._similarity is None:  # the IDF of the indexed descriptions, once
            pids = self.index.texts.ids
            self._similarity = (pids, {p: j for j, p in enumerate(pids)},
                                NgramSimilarity([self.descriptions[p] for p in pids]))
        pids, row, similarity = self._similarity
        found = self.index.texts.search(query, min(self.caption_k, len(pids)), normalised=False)[0]  # as evaluated
        return self.descriptions[pids[consensus_pick(np.array([row[p] for p, _ in found]), similarity)]]

    def _classifier(self, field: str, text: str | None) -> tuple[Any, str]:
        if text is not None and (field, "image+text") in self.classifiers:
            return self.classifiers[(field, "image+text")], "image+text"
        if (field, "image") in self.classifiers:
            return self.classifiers[(field, "image")], "image"
        have = ", ".join(CLASSIFIER_PARTS[key] for key in sorted(self.classifiers)) or "none"
        needed = f"finetune/{CLASSIFIER_PARTS[(field, 'image')]}"
        what = "an image and a text" if text is not None else "an image alone"
        if text is not None:
            needed += f" or finetune/{CLASSIFIER_PARTS[(field, 'image+text')]}"
        raise KaleidoError(f"run {self.data.run} has no {field} classifier for {what}: it needs {needed} "
                           f"(classifiers found: {have})")

    @torch.inference_mode()
    def classify(self, image: Image.Image, text: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """The top categories and sub-categories of a photo (and its text, when given), most likely first.

        Each field uses the image+text classifier when ``text`` is given and the run has one, else the image-only
        classifier.

        Returns:
            ``{"category": [{"label", "prob"}, ...], "subcategory": [...]}``, at most 5 labels each.

        Raises:
            KaleidoError: the run lacks a classifier a field needs (one line naming the missing part).
        """
        text = require_utf8(text.strip(), "the text") if text and text.strip() else None
        chosen = {field: self._classifier(field, text) for field in LABEL_FIELDS}
        feats, pos = self.patches([image])
        feats, pos = feats.to(self.device), pos.to(self.device)
        out: dict[str, list[dict[str, Any]]] = {}
        for field, (model, source) in chosen.items():
            if source == "image+text":
                ids, mask = self.encoder.tokenize([text])
            else:
                ids = torch.tensor([[self.encoder.tokenizer.cls_token_id]], device=self.device)
                mask = torch.ones_like(ids)
            logits = model({"text_ids": ids, "text_mask": mask, "patch_features": feats,
                            "patch_positions": pos}).logits[0]
            probs = logits.float().softmax(-1).cpu()
            names = {int(i): name for name, i in dict(model.config.label2id).items()}
            top = torch.argsort(probs, descending=True, stable=True)[:TOP_LABELS].tolist()
            out[field] = [{"label": names[j], "prob": float(probs[j])} for j in top]
        return out

    def zero_shot(self, image: Image.Image, labels: list[str],
                  template: str = DEFAULT_TEMPLATE) -> list[dict[str, Any]]:
        """Rank labels no classifier was trained on (a new category, a colour, a pattern) by the photo's
        dual-encoder cosine with each label's prompt (:mod:`kaleido_bert.model.zero_shot`).

        Returns:
            ``[{"label", "score" (cosine), "prob" (softmax over the labels with the ITC logit scale; None without
            an ITC head)}]``, best first.

        Raises:
            KaleidoError: no labels, a blank, repeated or non-UTF-8 label, or a template without exactly one ``{}``.
        """
        prompts(labels, template)  # refused before the photo is encoded
        return rank_labels(self.encoder, self.encode_image([image]), labels, template)

    # ------------------------------------------------------------------ facts
    def categories(self) -> list[str]:
        """The categories of the indexed products (what ``search_text(category=...)`` accepts)."""
        return sorted(self.by_category)

    def info(self) -> dict[str, Any]:
        """What is loaded: run, models, catalogue, index (served by ``GET /healthz``).

        No absolute path: the models are named relative to the run directory, the run and the catalogue by
        their directory names, a path-valued patch-generator setting by its file name.
        """
        run = self.data.run.resolve()

        def name(path: str | Path) -> str:
            path = Path(path).resolve()
            return path.relative_to(run).as_posix() if path.is_relative_to(run) else path.name

        parts = {"retrieval": name(self.data.checkpoint)}
        if self.captioner is not None:
            parts["caption"] = name(self.data.parts["caption"])
        elif self.caption_method == "retrieval":
            parts["caption"] = f"retrieval (consensus of the {self.caption_k} nearest descriptions)"
        for key in self.classifiers:
            parts[CLASSIFIER_PARTS[key]] = name(self.data.parts[CLASSIFIER_PARTS[key]])
        settings = {k: Path(v).name if isinstance(v, str) and Path(v).is_absolute() else v
                    for k, v in self.patches.settings.items()}
        return {"pipeline": "kaleido-bert", "run": run.name, "models": parts,
                "catalogue": self.data.catalogue.root.resolve().name, "items": len(self.index.images),
                "products": len(self.index.texts), "index": self.index.images.kind,
                "config_hash": self.index.config_hash, "patch_generator": settings,
                "rerank": self.reranks, "rerank_choice": self.encoder.rerank_choice, "device": str(self.device)}
