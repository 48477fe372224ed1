"""Zero-shot CR / SUB (beyond the paper): a split's images classified into the catalogue's own label names through
prompts, with no classifier trained, for the model's dual encoder and for the frozen baseline's.

Label texts: each label-map name with ``_`` and ``-`` turned into spaces, lower-cased (``"T-Shirts"`` → ``"t
shirts"``), put into a template (:mod:`kaleido_bert.model.zero_shot`); an image's prediction is the label whose
prompt has the highest cosine with it. Scored as the trained classifiers are (accuracy in percent and macro-F1 over
the whole label map, :func:`~kaleido_bert.data.label_scores.classification_metrics`, on the split's images that
have features), beside chance: the training split's majority class. Templates other than the default are scored
on every split, but one is *chosen* on the validation split only.

The frozen baseline (:class:`~kaleido_bert.eval.baseline.FrozenBaseline`) embeds the prompts through its frozen text
encoder and fitted text map (``EmbeddingScorer.embed_strings``), with the image pool its report chose on validation
(``report/baseline.json``) or else ``mean``, one projection per seed (mean ± std over the seeds).

Shapes: N items, L labels, D embedding size; image embeddings ``(N, D)``, gold and predicted label ids ``(N,)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kaleido_bert.atomic import read_json
from kaleido_bert.data.catalogue import Catalogue, Item, label_map
from kaleido_bert.data.label_scores import classification_metrics
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.zero_shot import DEFAULT_TEMPLATE, zero_shot_scores
from kaleido_bert.patches.store import FeatureStore

FIELDS = {"category": "cr", "subcategory": "sub"}
"""The label fields and their metric prefixes (as in ``metrics.json``: ``cr/…``, ``sub/…``)."""
TEMPLATES = (DEFAULT_TEMPLATE, "{}", "a photo of a {}, a type of fashion product")
"""Templates the evaluation compares (the first is the default; a choice is made on validation)."""
DEFAULT_POOL = "mean"
"""The baseline's image pool when its report records none."""
IMAGE_BATCH = 512
"""Feature-store rows read and embedded per step."""

TextEncoder = Callable[[list[str]], np.ndarray]
ImageEncoder = Callable[[list[str]], np.ndarray]


def label_text(name: str) -> str:
    """A label-map name as a prompt's words: ``_``/``-`` → spaces, lower case, single spaces (``"T-Shirts"`` → ``"t
    shirts"``)."""
    return " ".join(re.sub(r"[_-]", " ", name).split()).lower()


def field_labels(catalogue: Catalogue, field: str) -> list[str]:
    """The label texts of ``field``, in label-id order: L strings.

    Raises:
        KaleidoError: an unknown field, label ids that are not ``0..L-1``, or two names with the same text.
    """
    label2id = label_map(catalogue.labels, field)
    names = sorted(label2id, key=label2id.__getitem__)
    if [label2id[n] for n in names] != list(range(len(names))):
        raise KaleidoError(f"the {field} label map's ids are not 0..{len(names) - 1}: re-import the catalogue")
    first: dict[str, str] = {}
    for name in names:
        text = label_text(name)
        if not text:
            raise KaleidoError(f"{field} label {name!r} has no words left to prompt with")
        if text in first:
            raise KaleidoError(f"{field} labels {first[text]!r} and {name!r} read the same as label text ({text!r})")
        first[text] = name
    return list(first)


def split_items(catalogue: Catalogue, store: FeatureStore, split: str) -> list[Item]:
    """The split's images with features (the items the trained classifiers are evaluated on)."""
    return [it for it in catalogue.split(split) if it.id in store]


def gold_labels(catalogue: Catalogue, items: Sequence[Item], field: str) -> np.ndarray:
    """``(N,)`` label ids of ``items``' ``field``."""
    label2id = label_map(catalogue.labels, field)
    return np.array([label2id[getattr(it, field)] for it in items], dtype=np.int64)


def zero_shot_metrics(embed_texts: TextEncoder, image_emb: np.ndarray, gold: np.ndarray, labels: Sequence[str],
                      template: str = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Accuracy and macro-F1 (fractions) of the zero-shot predictions over ``labels`` (label id = position).

    Args:
        embed_texts: the text side, strings → ``(L, D)``.
        image_emb: ``(N, D)``; gold: ``(N,)`` label ids.

    Returns:
        ``{"accuracy", "macro_f1", "pred"}`` (``pred``: ``(N,)`` predicted ids).
    """
    pred = zero_shot_scores(embed_texts, image_emb, labels, template).predictions()
    return {**classification_metrics(gold, pred, len(labels)), "pred": pred}


def majority_chance(catalogue: Catalogue, store: FeatureStore, split: str) -> dict[str, float]:
    """Chance: every item of ``split`` given the training split's most frequent label (``cr/accuracy`` …)."""
    train, items = split_items(catalogue, store, "train"), split_items(catalogue, store, split)
    if not train or not items:
        raise KaleidoError(f"chance needs train and {split} items with features")
    out: dict[str, float] = {}
    for field, short in FIELDS.items():
        num = len(label_map(catalogue.labels, field))
        majority = int(np.bincount(gold_labels(catalogue, train, field), minlength=num).argmax())
        gold = gold_labels(catalogue, items, field)
        scores = classification_metrics(gold, np.full(len(gold), majority), num)
        out[f"{short}/accuracy"], out[f"{short}/macro_f1"] = 100 * scores["accuracy"], scores["macro_f1"]
    return out


def score_split(embed_texts: TextEncoder, image_emb: np.ndarray, catalogue: Catalogue, items: Sequence[Item],
                templates: Sequence[str]) -> dict[str, dict[str, float]]:
    """Zero-shot CR and SUB of ``items`` (embedded as ``image_emb``, ``(N, D)``) for each template:
    ``{template: {"cr/accuracy" (percent), "cr/macro_f1", "sub/…"}}``."""
    out: dict[str, dict[str, float]] = {}
    labels = {field: field_labels(catalogue, field) for field in FIELDS}
    gold = {field: gold_labels(catalogue, items, field) for field in FIELDS}
    for template in templates:
        row: dict[str, float] = {}
        for field, short in FIELDS.items():
            scores = zero_shot_metrics(embed_texts, image_emb, gold[field], labels[field], template)
            row[f"{short}/accuracy"], row[f"{short}/macro_f1"] = 100 * scores["accuracy"], scores["macro_f1"]
        out[template] = row
    return out


def choose_template(val: dict[str, dict[str, float]]) -> str:
    """The template with the best mean CR and SUB accuracy on validation (the default when there is no
    validation split; the earlier template on a tie)."""
    if not val:
        return DEFAULT_TEMPLATE
    return max(val, key=lambda t: (val[t]["cr/accuracy"] + val[t]["sub/accuracy"]) / 2)


def model_image_embeddings(encoder: Any, store: FeatureStore, ids: Sequence[str], *,
                           progress: bool = False) -> np.ndarray:
    """A dual encoder's image embeddings of feature-store rows, :data:`IMAGE_BATCH` rows at a time: ``(N, D)``."""
    from kaleido_bert.model.dual_encoder import store_patches

    parts = [np.empty((0, encoder.dim), np.float32)]
    for start in tqdm(range(0, len(ids), IMAGE_BATCH), desc="embed images", unit="batch", disable=not progress,
                      leave=False):
        parts.append(encoder.embed_patches(*store_patches(store, list(ids[start:start + IMAGE_BATCH]))))
    return np.concatenate(parts)


def evaluate_encoder(embed_texts: TextEncoder, embed_images: ImageEncoder, catalogue: Catalogue,
                     store: FeatureStore, *, split: str = "test",
                     templates: Sequence[str] = TEMPLATES) -> dict[str, Any]:
    """Zero-shot CR / SUB of one dual encoder on ``split`` (and on validation, to choose the template).

    Args:
        embed_texts: strings → ``(L, D)``; embed_images: item ids → ``(N, D)``, in the same space.

    Returns:
        ``{"val": {template: metrics}, "test": {template: metrics}, "template": the one chosen on validation}``
        (``test`` is the evaluated split whatever its name; ``val`` is empty without validation items).

    Raises:
        KaleidoError: the split has no items with features.
    """
    items = split_items(catalogue, store, split)
    if not items:
        raise KaleidoError(f"the catalogue has no {split} items with features to classify")
    val_items = split_items(catalogue, store, "val") if split != "val" else []
    val = score_split(embed_texts, embed_images([it.id for it in val_items]), catalogue, val_items,
                      templates) if val_items else {}
    test = score_split(embed_texts, embed_images([it.id for it in items]), catalogue, items, templates)
    return {"val": val, "test": test, "template": choose_template(val)}


def baseline_zero_shot(baseline: Any, pool: str, seeds: Sequence[int], *, split: str = "test",
                       templates: Sequence[str] = TEMPLATES) -> dict[str, Any]:
    """The frozen baseline's zero-shot CR / SUB, one fitted projection per seed.

    Args:
        baseline: a :class:`~kaleido_bert.eval.baseline.FrozenBaseline`.
        pool: its image pool (``whole`` or ``mean``).

    Returns:
        ``{"per_seed": [evaluate_encoder results], "val": {template: seed-mean metrics}, "test": {template:
        {"mean", "std"}}, "template": chosen on the seed-mean validation metrics}``.
    """
    if not seeds:
        raise KaleidoError("the frozen baseline needs at least one seed")
    runs = []
    for seed in seeds:
        scorer, _ = baseline.fit_projection(pool, int(seed))
        runs.append(evaluate_encoder(scorer.embed_strings, scorer.embed_images, baseline.catalogue, baseline.store,
                                     split=split, templates=templates))

    def stats(part: str, fn: Callable[[np.ndarray], float]) -> dict[str, dict[str, float]]:
        return {t: {k: fn(np.array([r[part][t][k] for r in runs])) for k in runs[0][part][t]} for t in runs[0][part]}

    std = (lambda v: float(v.std(ddof=1))) if len(runs) > 1 else (lambda v: 0.0)
    val = stats("val", lambda v: float(v.mean()))
    test_std = stats("test", std)
    test = {t: {"mean": m, "std": test_std[t]} for t, m in stats("test", lambda v: float(v.mean())).items()}
    return {"per_seed": [{"seed": int(s), **r} for s, r in zip(seeds, runs, strict=True)], "val": val, "test": test,
            "template": choose_template(val)}


def trained_scores(report_dir: Path) -> dict[str, dict[str, float]]:
    """The trained classifiers' CR / SUB from ``report_dir/metrics.json`` (``kaleido evaluate``):
    ``{"image": {"cr/accuracy", …}, "image+text": {…}}``, only the inputs it has; empty without the file."""
    path = report_dir / "metrics.json"
    if not path.is_file():
        return {}
    metrics = read_json(path, dict, what="a metrics report (a JSON object)", fix="re-run `kaleido evaluate`")
    out: dict[str, dict[str, float]] = {}
    for source in ("image", "image+text"):
        row = {f"{short}/{key}": float(metrics[f"{short}/{source}/{key}"]) for short in FIELDS.values()
               for key in ("accuracy", "macro_f1") if f"{short}/{source}/{key}" in metrics}
        if row:
            out[source] = row
    return out


def baseline_pool(report_dir: Path) -> tuple[str, str]:
    """The frozen baseline's image pool chosen on validation (``report_dir/baseline.json``), else
    :data:`DEFAULT_POOL`: ``(pool, where it came from)``."""
    from kaleido_bert.eval.baseline_report import BASELINE_FILE, load_baseline

    pool = (load_baseline(report_dir) or {}).get("image_pool")
    if pool:
        return str(pool), f"{report_dir.name}/{BASELINE_FILE}"
    return DEFAULT_POOL, "default (no baseline report)"


def evaluate_run_zero_shot(run: str | Path, *, split: str = "test", seeds: Sequence[int] = (0, 1, 2),
                           templates: Sequence[str] = TEMPLATES, baseline: bool = True, device: str = "cpu",
                           progress: bool = False) -> dict[str, Any]:
    """Zero-shot CR / SUB of a run directory (``kaleido demo`` layout) beside the frozen baseline, chance and the
    trained classifiers.

    Args:
        run: the run directory: its ``run.yaml`` names the catalogue and store; the dual encoder is
            ``finetune/retrieval`` when present, else ``pretrain``; ``report/`` gives the baseline's pool and the
            trained classifiers' scores when present.
        split: the evaluated split (templates are chosen on ``val``).
        seeds: the baseline's projection seeds; baseline: False skips it.
        device: where the model runs.

    Returns:
        ``{"run", "checkpoint", "split", "items", "labels", "templates", "model", "baseline", "chance", "trained",
        "seconds"}`` (``model``/``baseline`` as :func:`evaluate_encoder` / :func:`baseline_zero_shot`).

    Raises:
        KaleidoError: no pre-trained model, no run config, or no items to classify.
    """
    from kaleido_bert.config import load_config
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.runs import run_config_file, run_parts

    start = time.perf_counter()
    run = Path(run)
    parts = run_parts(run)
    checkpoint = parts.get("retrieval", parts["pretrain"])
    config_file = run_config_file(run)
    if config_file is None:
        raise KaleidoError(f"{run} has no run.yaml naming its catalogue and feature store")
    config = load_config(config_file)
    catalogue, store = open_data(config)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, device=device)
    model = evaluate_encoder(encoder.embed_texts,
                             lambda ids: model_image_embeddings(encoder, store, ids, progress=progress),
                             catalogue, store, split=split, templates=templates)
    result: dict[str, Any] = {
        "run": str(run), "checkpoint": str(checkpoint.relative_to(run)) if checkpoint.is_relative_to(run) else
        str(checkpoint), "split": split,
        "items": {s: len(split_items(catalogue, store, s)) for s in ("train", "val", split)},
        "labels": {short: len(field_labels(catalogue, field)) for field, short in FIELDS.items()},
        "templates": list(templates), "model": model, "chance": majority_chance(catalogue, store, split),
        "trained": trained_scores(run / "report"), "baseline": None,
    }
    if baseline:
        from kaleido_bert.data.tokenizer import resolve_bert_dir
        from kaleido_bert.eval.baseline import FrozenBaseline

        pool, pool_from = baseline_pool(run / "report")
        frozen = FrozenBaseline(catalogue, store, resolve_bert_dir(config.model.init))
        result["baseline"] = {"pool": pool, "pool_from": pool_from, "seeds": [int(s) for s in seeds],
                              "text_model": config.model.init or "the offline all-MiniLM-L6-v2 (model.init unset)",
                              **baseline_zero_shot(frozen, pool, seeds, split=split, templates=templates)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
