"""The frozen dual-encoder baseline: what a linear probe on frozen features scores on the model's protocols (beyond the paper).

Image side: the feature store's frozen features, either the whole-image pooled feature (the 1×1 Kaleido patch, row 0
of the colour patches) or the mean of the 55 colour patches, whichever scores higher full-gallery mean recall on the
validation split. Text side: the model's text initialisation checkpoint (``model.init``; when unset, the offline
all-MiniLM-L6-v2 that :func:`~kaleido_bert.data.tokenizer.resolve_bert_dir` finds), frozen, mean-pooled over tokens.
Both standardised with training statistics; two linear maps to 256-d trained with a symmetric InfoNCE loss
(learnable temperature, Adam 1e-3, batch 256, 5 epochs, seeded). CR/SUB: scikit-learn logistic regression on the
frozen features (image + text = the two concatenated; image only = image features). Captions: the description of
the nearest training product in the shared space.

Scored by the model's own code on the model's own items: :func:`~kaleido_bert.eval.retrieval.evaluate_sample100`
over the run's ``candidates.json`` (cosine similarity in place of the ITM logit; ties at their expected rank),
:func:`~kaleido_bert.eval.retrieval.evaluate_gallery` without re-ranking, :func:`classification_metrics` and
:func:`caption_metrics`. Shapes: image features ``(N, F)``, text features ``(M, H)``, embeddings ``(·, 256)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaleido_bert.data.catalogue import Catalogue, Item, label_map
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.baseline_report import BASELINE_FILE, BASELINE_OUTCOMES_FILE
from kaleido_bert.eval.caption_retrieval import nearest_descriptions
from kaleido_bert.model.linear_probe import (
    IMAGE_POOLS,
    BaselineSettings,
    FrozenText,
    image_features,
    standardiser,
    train_projection,
)
from kaleido_bert.patches.store import FeatureStore


class EmbeddingScorer:
    """The :class:`~kaleido_bert.eval.retrieval.PairScorer` interface over fixed embeddings (cosine = the score)."""

    has_itc = False
    """Its score is already the cosine, so a sample-100 shortlist by cosine would change nothing."""

    def __init__(self, image_emb: dict[str, np.ndarray], text_emb: dict[str, np.ndarray],
                 text_encoder: Callable[[list[str]], np.ndarray] | None = None) -> None:
        self.image_emb, self.text_emb, self.text_encoder = image_emb, text_emb, text_encoder

    def embed_strings(self, texts: list[str]) -> np.ndarray:
        """Embeddings of new strings (label prompts, users' queries) in the shared space: ``(M, 256)`` float32.

        Raises:
            KaleidoError: the scorer was built from fixed embeddings only.
        """
        if self.text_encoder is None:
            raise KaleidoError("this baseline scorer has no text encoder: it embeds only the catalogue's descriptions")
        return self.text_encoder(list(texts)).astype(np.float32)

    def itm_logits(self, pairs: list[tuple[str, str]], *, desc: str = "", progress: bool = False,
                   cosine: np.ndarray | None = None) -> np.ndarray:
        if cosine is not None:  # the caller's (e.g. query-bank normalised) score of these pairs
            return np.asarray(cosine, np.float64)
        if not pairs:
            return np.empty(0)
        img = np.stack([self.image_emb[i] for i, _ in pairs]).astype(np.float64)
        txt = np.stack([self.text_emb[p] for _, p in pairs]).astype(np.float64)
        return (img * txt).sum(1)

    def embed_texts(self, pids: list[str], *, progress: bool = False) -> np.ndarray:
        return np.stack([self.text_emb[p] for p in pids]).astype(np.float32)

    def embed_images(self, image_ids: list[str], *, progress: bool = False) -> np.ndarray:
        return np.stack([self.image_emb[i] for i in image_ids]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- the baseline
class FrozenBaseline:
    """Frozen features of a catalogue + feature store, and the projections / classifiers fitted on its train split.

    Args:
        catalogue, store: the evaluated catalogue and its feature store.
        bert_dir: the frozen text checkpoint directory.
    """

    def __init__(self, catalogue: Catalogue, store: FeatureStore, bert_dir: str | Path, *,
                 settings: BaselineSettings | None = None) -> None:
        settings = settings or BaselineSettings()
        self.catalogue, self.store, self.settings = catalogue, store, settings
        self.items = [it for it in catalogue.items if it.id in store]
        if not any(it.split == "train" for it in self.items):
            raise KaleidoError("the frozen baseline needs train items with features")
        self.descriptions: dict[str, str] = {}
        for it in self.items:
            self.descriptions.setdefault(it.product_id, it.description)
        self.pids = list(self.descriptions)
        self.frozen_text = FrozenText(bert_dir)  # loaded once: the descriptions now, new strings later
        raw_text = self.frozen_text([self.descriptions[p] for p in self.pids], max_len=settings.text_max_len)
        train_pids = sorted({it.product_id for it in self.split("train")}, key=self.pids.index)
        rows = {p: j for j, p in enumerate(self.pids)}
        mean, std = standardiser(raw_text[[rows[p] for p in train_pids]])
        self.text_stats = (mean, std)
        self.text = {p: (raw_text[rows[p]] - mean) / std for p in self.pids}
        self.images: dict[str, dict[str, np.ndarray]] = {}
        ids = [it.id for it in self.items]
        train_rows = [j for j, it in enumerate(self.items) if it.split == "train"]
        for pool in IMAGE_POOLS:
            raw = image_features(store, ids, pool)
            mean, std = standardiser(raw[train_rows])
            self.images[pool] = dict(zip(ids, (raw - mean) / std, strict=True))

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def fit_projection(self, pool: str, seed: int) -> tuple[EmbeddingScorer, dict[str, Any]]:
        """Train the projections on the train split's (image, its product's text) pairs; embed every item."""
        train = self.split("train")
        model, history = train_projection(np.stack([self.images[pool][it.id] for it in train]),
                                          np.stack([self.text[it.product_id] for it in train]),
                                          seed=seed, settings=self.settings)
        with torch.no_grad():
            ids = [it.id for it in self.items]
            img = model.embed(torch.from_numpy(np.stack([self.images[pool][i] for i in ids])).float(), "image")
            txt = model.embed(torch.from_numpy(np.stack([self.text[p] for p in self.pids])).float(), "text")
        scorer = EmbeddingScorer(dict(zip(ids, img.numpy(), strict=True)), dict(zip(self.pids, txt.numpy(), strict=True)),
                                 text_encoder=lambda texts: self._embed_strings(model, texts))
        return scorer, history

    def _embed_strings(self, model, texts: list[str]) -> np.ndarray:
        """New strings through the frozen text encoder, the training standardisation and ``model``'s text map."""
        mean, std = self.text_stats
        raw = (self.frozen_text(texts, max_len=self.settings.text_max_len) - mean) / std
        with torch.no_grad():
            return model.embed(torch.from_numpy(raw).float(), "text").numpy()

    def classify(self, field: str, source: str, pool: str, split: str) -> dict[str, Any]:
        """Logistic regression on the train split's frozen features; accuracy and macro-F1 on ``split``."""
        from sklearn.linear_model import LogisticRegression

        from kaleido_bert.data.label_scores import classification_metrics

        label2id = label_map(self.catalogue.labels, field)

        def features(items: list[Item]) -> np.ndarray:
            img = np.stack([self.images[pool][it.id] for it in items])
            if source == "image":
                return img
            return np.concatenate([img, np.stack([self.text[it.product_id] for it in items])], axis=1)

        train, test = self.split("train"), self.split(split)
        if not test:
            raise KaleidoError(f"the catalogue has no {split} items with features to classify")
        y = np.array([label2id[getattr(it, field)] for it in train])
        gold = np.array([label2id[getattr(it, field)] for it in test])
        if len(set(y.tolist())) < 2:
            pred = np.full(len(test), y[0])
        else:
            clf = LogisticRegression(C=self.settings.logreg_c, max_iter=self.settings.logreg_iter)
            clf.fit(features(train), y)
            pred = clf.predict(features(test))
        return {"field": field, "input": source, "items": len(test),
                **classification_metrics(gold, pred, len(label2id)),
                "outcomes": {"ids": [it.id for it in test], "gold": gold.tolist(), "pred": pred.tolist()}}

    def nearest_captions(self, scorer: EmbeddingScorer, items: list[Item]) -> dict[str, str]:
        """Each item's caption = the description of the training product nearest to its image embedding."""
        train_pids = sorted({it.product_id for it in self.split("train")})
        gallery = scorer.embed_texts(train_pids)
        queries = scorer.embed_images([it.id for it in items])
        hyps = nearest_descriptions(queries, gallery, [self.descriptions[p] for p in train_pids])
        return {it.id: hyp for it, hyp in zip(items, hyps, strict=True)}


# ---------------------------------------------------------------------------------------------- protocols
def _chance(catalogue: Catalogue, baseline: FrozenBaseline, candidates: dict[str, Any], gallery: dict[str, Any],
            split: str) -> dict[str, Any]:
    """Chance levels: a random ranking, the training majority class, a random training description."""
    from kaleido_bert.data.label_scores import classification_metrics

    n = int(candidates["num_negatives"]) + 1
    out: dict[str, Any] = {"sample100/SumR": 3200 / n}
    for direction, size in (("itr", gallery["gallery/products"]), ("tir", gallery["gallery/images"])):
        out[f"{direction}_gallery/mean_recall"] = 100 * float(np.mean([min(k, size) / size for k in (1, 5, 10)]))
    train, test = baseline.split("train"), baseline.split(split)
    for field, short in (("category", "cr"), ("subcategory", "sub")):
        label2id = label_map(catalogue.labels, field)
        counts = np.bincount([label2id[getattr(it, field)] for it in train], minlength=len(label2id))
        gold = np.array([label2id[getattr(it, field)] for it in test])
        scores = classification_metrics(gold, np.full(len(gold), int(counts.argmax())), len(label2id))
        for source in ("image+text", "image"):
            out[f"{short}/{source}/accuracy"] = 100 * scores["accuracy"]
            out[f"{short}/{source}/macro_f1"] = scores["macro_f1"]
    return out


def query_bank_gallery(scorer: EmbeddingScorer, catalogue: Catalogue, available: set[str], split: str,
                        betas: list[float]) -> dict[str, float]:
    """The baseline's full gallery normalised by its own training queries as the model's is
    (:mod:`kaleido_bert.eval.query_bank`, β chosen among ``betas`` on validation mean recall; not a row of the
    comparison, which keeps the plain baseline): ``query_bank/beta`` and ``query_bank/{itr,tir}_gallery/…``."""
    from kaleido_bert.eval.query_bank_fit import choose_beta, embed_bank
    from kaleido_bert.eval.retrieval import evaluate_gallery

    bank = embed_bank(scorer, catalogue, available, progress=False)
    _, beta = choose_beta(scorer, catalogue, available, bank, betas)
    found = evaluate_gallery(scorer, catalogue, available, split=split, rerank_k=0, progress=False,
                             bank=bank.with_beta(beta))["metrics"]
    return {"query_bank/beta": beta, **{f"query_bank/{k}": v for k, v in found.items() if k.endswith("mean_recall")}}


def _caption_items(catalogue: Catalogue, store: FeatureStore, split: str, limit: int) -> list[Item]:
    """The items the model's FC protocol captions (:class:`~kaleido_bert.inputs.downstream.CaptionDataset` order)."""
    return [it for it in catalogue.split(split) if it.id in store][:limit or None]


def run_baseline(config, out: str | Path, *, seeds: tuple[int, ...] = (0, 1, 2),
                 candidates: str | Path | None = None,
                 data: tuple[Catalogue, FeatureStore] | None = None) -> dict[str, Any]:
    """Fit and score the frozen baseline on ``config``'s catalogue; write ``out/baseline.json``.

    Args:
        config: the run config (``data`` names the catalogue and store, ``model.init`` the text checkpoint,
            ``eval`` the split, the candidate draw and the caption items).
        out: the report directory; its ``candidates.json`` is used when present (else ``candidates``, else the
            draw :func:`~kaleido_bert.eval.retrieval.build_candidates` makes from ``eval``, saved there).
        seeds: one projection training per seed; classifiers are deterministic and fitted once.
        data: the catalogue and store already opened for ``config`` (by the evaluation); opened here when None.

    Returns:
        The ``baseline.json`` content (the per-unit outcomes go to ``out/baseline-outcomes.json``, for the paired
        bootstrap of the model against the baseline): per-seed metrics, their mean / std / min / max, chance levels, the image
        pool chosen on validation and the text checkpoint used.
    """
    import hashlib
    import json
    import shutil
    import time

    from kaleido_bert.atomic import atomic_write_json
    from kaleido_bert.data.tokenizer import resolve_bert_dir
    from kaleido_bert.eval.caption_metrics import CaptionScorer, caption_metrics
    from kaleido_bert.eval.retrieval import (
        build_candidates,
        evaluate_gallery,
        evaluate_sample100,
        load_candidates,
        save_candidates,
    )
    from kaleido_bert.inputs.sources import open_data

    if not seeds:
        raise KaleidoError("the frozen baseline needs at least one seed")
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = config.eval
    catalogue, store = data or open_data(config)  # the evaluation's own, when it passes them
    available = set(store.available_ids())
    path = out / "candidates.json" if (out / "candidates.json").is_file() else candidates
    if path:
        cands = load_candidates(path, catalogue, available)
    else:
        cands = build_candidates(catalogue, available, split=ev.split, num_queries=ev.num_queries,
                                 num_negatives=ev.num_negatives, seed=ev.seed)
        path = out / "candidates.json"
        save_candidates(cands, path)
    bert_dir = resolve_bert_dir(config.model.init)
    baseline = FrozenBaseline(catalogue, store, bert_dir)
    result: dict[str, Any] = {
        "text_model": str(bert_dir),
        "text_model_from": "model.init" if config.model.init else "offline all-MiniLM-L6-v2 (model.init unset)",
        "split": ev.split, "seeds": list(seeds), "settings": dict(vars(baseline.settings)),
        "candidates": {"path": str(path), "sha256": hashlib.sha256(
            json.dumps({d: cands[d] for d in ("itr", "tir")}, sort_keys=True).encode()).hexdigest()},
    }
    pools: dict[str, float] = {}
    if baseline.split("val"):
        for pool in IMAGE_POOLS:  # chosen on validation only
            scorer, _ = baseline.fit_projection(pool, seeds[0])
            g = evaluate_gallery(scorer, catalogue, available, split="val", rerank_k=0, progress=False)["metrics"]
            pools[pool] = (g["itr_gallery/mean_recall"] + g["tir_gallery/mean_recall"]) / 2
    pool = max(pools, key=pools.get) if pools else "whole"
    result.update(image_pool=pool, pool_selection={"split": "val", "mean_recall": pools})
    fixed: dict[str, Any] = {}
    classified: dict[str, Any] = {}  # per item: what a paired bootstrap against the model resamples
    for field, short in (("category", "cr"), ("subcategory", "sub")):
        for source in ("image+text", "image"):
            scores = baseline.classify(field, source, pool, ev.split)
            classified[f"{short}/{source}"] = scores["outcomes"]
            fixed[f"{short}/{source}/accuracy"] = 100 * scores["accuracy"]
            fixed[f"{short}/{source}/macro_f1"] = scores["macro_f1"]
    caption_items = _caption_items(catalogue, store, ev.split, ev.caption_items)
    references = {it.id: [it.description] for it in caption_items}
    java = shutil.which("java") is not None and bool(caption_items)
    per_seed, histories, ranked = [], [], []
    with CaptionScorer() if java else contextlib.nullcontext() as cap:
        for seed in seeds:
            scorer, history = baseline.fit_projection(pool, seed)
            histories.append(history)
            sample100 = evaluate_sample100(scorer, cands, progress=False)
            metrics = dict(sample100["metrics"])
            gallery = evaluate_gallery(scorer, catalogue, available, split=ev.split, rerank_k=0, progress=False)
            metrics.update(gallery["metrics"])
            if ev.query_bank_betas:  # the model's gallery normalisation, given to the baseline too (a diagnostic)
                metrics.update(query_bank_gallery(scorer, catalogue, available, ev.split, ev.query_bank_betas))
            ranked.append({"sample100": sample100["outcomes"], "gallery": gallery["outcomes"]})
            if java:
                hyps = baseline.nearest_captions(scorer, caption_items)
                metrics.update({f"fc/nearest/{k}": v for k, v in caption_metrics(references, hyps, scorer=cap).items()})
            per_seed.append({**metrics, **fixed})
        chance = _chance(catalogue, baseline, cands, gallery["metrics"], ev.split)
        if java:
            rng = np.random.default_rng(0)
            train = baseline.split("train")
            hyps = {it.id: train[int(rng.integers(len(train)))].description for it in caption_items}
            chance["fc/nearest/sum_cap"] = caption_metrics(references, hyps, scorer=cap)["sum_cap"]
    keys = [k for k, v in per_seed[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    values = {k: np.array([float(m[k]) for m in per_seed]) for k in keys}
    result.update(
        per_seed=per_seed, chance=chance, training=histories, caption_items=len(caption_items),
        mean={k: float(v.mean()) for k, v in values.items()},
        std={k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
        min={k: float(v.min()) for k, v in values.items()}, max={k: float(v.max()) for k, v in values.items()},
        seconds=round(time.perf_counter() - start, 1))
    atomic_write_json(out / BASELINE_OUTCOMES_FILE, seed_mean_outcomes(ranked, classified, seeds))
    atomic_write_json(out / BASELINE_FILE, result)
    return result


def seed_mean_outcomes(ranked: list[dict[str, Any]], classified: dict[str, Any], seeds: tuple[int, ...]
                       ) -> dict[str, Any]:
    """The baseline's per-unit outcomes in ``outcomes.json``'s layout: each query's ``P(rank ≤ K)`` ``(Q, 3)``
    averaged over the seeds' projections (the expected outcome of one seed), the deterministic classifiers' gold
    and predicted labels as they are."""
    out: dict[str, Any] = {"seeds": list(seeds), "classifiers": classified}
    for protocol in ("sample100", "gallery"):
        out[protocol] = {key: np.mean([np.asarray(r[protocol][key], dtype=np.float64) for r in ranked], axis=0).tolist()
                         for key in ranked[0][protocol]}
    return out
