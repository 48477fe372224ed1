"""Paired bootstrap intervals for the difference between two models on the same test units (paper §4.4, Table 4).

Two evaluations of the same candidates and items (``outcomes.json`` beside each ``metrics.json``) are compared
unit by unit: the sample-100 and full-gallery queries (per query, ``P(rank ≤ K)`` for K = 1, 5, 10) and the
classified items (gold and predicted labels). Each of ``resamples`` bootstrap draws picks the units with
replacement, the same units for both models, and recomputes the metric of both; the interval is the 2.5–97.5
percentile of the differences (Efron & Tibshirani 1993; Koehn 2004 for the paired form).

Metrics: ``sample100/SumR`` (both directions' queries resampled independently), ``{itr,tir}_gallery/mean_recall``
(and ``{itr,tir}_gallery_rerank/mean_recall``, after ITM re-ranking, where the evaluation re-ranked),
``{cr,sub}/{input}/accuracy`` and ``…/macro_f1`` (macro-F1 over the classes present in the resampled gold or
predictions, not over the whole label map as :func:`~kaleido_bert.data.label_scores.classification_metrics`:
a resample has no fixed label set). The two sides may read different metrics of the same units
(``paired_bootstrap(..., metric_b=...)``: the model's re-ranked gallery against a baseline that never re-ranks).
Shapes: per-query outcomes ``(Q, 3)``; labels ``(N,)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert.atomic import read_json
from kaleido_bert.errors import KaleidoError

OUTCOMES_FILE = "outcomes.json"
"""Per-unit outcomes an evaluation writes beside ``metrics.json``."""


def load_outcomes(report: str | Path) -> dict[str, Any]:
    """``REPORT/outcomes.json`` (or the file itself) as a dict.

    Raises:
        KaleidoError: the file is missing or not JSON.
    """
    path = Path(report)
    path = path / OUTCOMES_FILE if path.is_dir() else path
    if not path.is_file():
        raise KaleidoError(f"no per-query outcomes at {path}: re-run `kaleido evaluate` to write them")
    return read_json(path, dict, fix="re-run `kaleido evaluate` to write it again")


def _macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    classes = np.union1d(gold, pred)
    scores = []
    for c in classes:
        tp = float(np.sum((gold == c) & (pred == c)))
        denom = float(np.sum(gold == c) + np.sum(pred == c))
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def _statistic(metric: str, data: dict[str, Any], picks: dict[str, np.ndarray]) -> float:
    if metric == "sample100/SumR":
        return 100 * sum(float(np.asarray(data["sample100"][d])[picks[d]].mean(0).sum()) for d in ("itr", "tir"))
    if metric.endswith("/mean_recall"):
        key = metric.split("/")[0]
        return 100 * float(np.asarray(data["gallery"][key])[picks[_axis(metric)]].mean())
    key, _, name = metric.rpartition("/")
    gold = np.asarray(data["classifiers"][key]["gold"])[picks[key]]
    pred = np.asarray(data["classifiers"][key]["pred"])[picks[key]]
    if name == "accuracy":
        return 100 * float(np.mean(gold == pred))
    if name == "macro_f1":
        return _macro_f1(gold, pred)
    raise KaleidoError(f"no bootstrap for metric {metric!r}")


def _axis(metric: str) -> str:
    """The resampled axis of a gallery metric: its direction's queries, re-ranked or not."""
    return metric.split("_gallery")[0] + "_gallery"


def _units(metric: str, data: dict[str, Any]) -> dict[str, int]:
    """How many units each resampled axis of ``metric`` has (one axis per direction or per classifier)."""
    if metric == "sample100/SumR":
        return {d: len(data["sample100"][d]) for d in ("itr", "tir")}
    if metric.endswith("/mean_recall"):
        key = metric.split("/")[0]
        if key not in data.get("gallery", {}):
            raise KaleidoError(f"{metric}: the outcomes have no {key!r} queries")
        return {_axis(metric): len(data["gallery"][key])}
    key = metric.rpartition("/")[0]
    if key not in data.get("classifiers", {}):
        raise KaleidoError(f"{metric}: the outcomes have no {key!r} classifier")
    return {key: len(data["classifiers"][key]["gold"])}


def available_metrics(data: dict[str, Any]) -> list[str]:
    """The metrics :func:`paired_bootstrap` can compare for an outcomes dict."""
    out = ["sample100/SumR"] if "sample100" in data else []
    out += [f"{k}/mean_recall" for k in sorted(data.get("gallery", {}))]
    for key in sorted(data.get("classifiers", {})):
        out += [f"{key}/accuracy", f"{key}/macro_f1"]
    return out


def paired_bootstrap(a: dict[str, Any], b: dict[str, Any], metric: str, *, metric_b: str | None = None,
                     resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``metric_b(b) − metric(a)`` with its paired bootstrap 95% interval.

    Args:
        a, b: two outcomes dicts over the same units (same queries in the same order, same items).
        metric: one of :func:`available_metrics`.
        metric_b: the metric read from ``b`` (default ``metric``), of the same units: for example
            ``itr_gallery_rerank/mean_recall`` against ``a``'s ``itr_gallery/mean_recall``.
        resamples: bootstrap draws.
        seed: the draws' seed (the same seed gives the same interval).

    Returns:
        ``{"a", "b", "diff", "low", "high", "p_not_above"}``: both point values, their difference, the 2.5 and
        97.5 percentiles of the resampled differences and the share of draws where ``b`` is not above ``a``.

    Raises:
        KaleidoError: the two outcome sets cover different numbers of units (not the same candidates or items),
            or classified items with different ids.
    """
    metric_b = metric_b or metric
    units, units_b = _units(metric, a), _units(metric_b, b)
    if units != units_b:
        raise KaleidoError(f"{metric_b}: the two evaluations cover different units ({units} vs {units_b}); "
                           "evaluate both on the same candidates and items")
    for key in units:  # classified items: the same ids in the same order where both record them
        ids_a, ids_b = (d.get("classifiers", {}).get(key, {}).get("ids") for d in (a, b))
        if ids_a is not None and ids_b is not None and ids_a != ids_b:
            raise KaleidoError(f"{metric_b}: the two evaluations classified different items; evaluate both on the "
                               "same test split")
    full = {k: np.arange(n) for k, n in units.items()}
    point_a, point_b = _statistic(metric, a, full), _statistic(metric_b, b, full)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        picks = {k: rng.integers(0, n, n) for k, n in units.items()}
        diffs[r] = _statistic(metric_b, b, picks) - _statistic(metric, a, picks)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": point_a, "b": point_b, "diff": point_b - point_a, "low": float(low), "high": float(high),
            "p_not_above": float(np.mean(diffs <= 0))}
