"""Graded ranking metrics of judged queries and their bootstrap intervals (beyond the paper: the BEIR / trec_eval
definitions, as ``pytrec_eval`` computes them for BEIR).

Per query, from its ranking of the gallery (best first) and its judged grades (unjudged documents grade 0):

* **MRR@10**: 1 / the rank of the first relevant document (grade ≥ 1) in the top 10, else 0.
* **nDCG@10**: DCG@10 / IDCG@10, DCG = Σ_{r ≤ 10} gain_r / log2(r + 1) with the grade as the gain (linear gains,
  Järvelin & Kekäläinen 2002; grades below 0 gain 0); IDCG is the DCG of the query's judged grades sorted
  best first, the ideal ranking of what was judged.
* **R@k** (k = 1, 5, 10): the share of the query's relevant documents found in the top k (BEIR's recall@k,
  trec_eval's ``recall_k``) — not the sample-100 protocol's "a positive in the top k" hit rate.

Rankings break score ties in gallery order (trec_eval would order tied documents by id). Each metric is a mean
over queries. Intervals: percentile bootstrap over queries (95%: the 2.5 and 97.5
percentiles), the same resampled queries for the model, the baseline and their difference, which makes the
difference's interval paired (Efron & Tibshirani 1993; Koehn 2004), as :mod:`kaleido_bert.eval.bootstrap` pairs
the protocols' outcomes. Shapes: rankings ``(Q, K)`` gallery rows; per-query metrics ``(Q,)``; scores ``(Q, G)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kaleido_bert.errors import KaleidoError

CUTOFF = 10
"""Depth of the rankings every metric reads."""
RECALL_KS = (1, 5, 10)
METRIC_NAMES = ("MRR@10", "nDCG@10", *(f"R@{k}" for k in RECALL_KS))
RESAMPLES = 2000
"""Bootstrap draws of every interval."""
_CHUNK_ELEMENTS = 4_000_000  # score-matrix elements ranked at a time: (rows, G) float32


def query_metrics(ranked: Sequence[int], grades: Mapping[int, int]) -> dict[str, float]:
    """MRR@10, nDCG@10 and R@1/5/10 of one query, as fractions.

    Args:
        ranked: gallery rows, best first (the first :data:`CUTOFF` are read).
        grades: gallery row → judged grade; at least one grade ≥ 1.

    Raises:
        KaleidoError: no relevant judged document.
    """
    relevant = {row for row, g in grades.items() if g >= 1}
    if not relevant:
        raise KaleidoError("a query without a relevant judged document has no ranking metrics")
    top = list(ranked[:CUTOFF])
    first = next((r for r, row in enumerate(top, start=1) if row in relevant), None)
    discount = 1.0 / np.log2(np.arange(2, CUTOFF + 2))  # rank r → 1 / log2(r + 1)
    dcg = sum(max(grades.get(row, 0), 0) * discount[r] for r, row in enumerate(top))
    ideal = sorted((max(g, 0) for g in grades.values()), reverse=True)[:CUTOFF]
    idcg = sum(g * discount[r] for r, g in enumerate(ideal))
    out = {"MRR@10": 1.0 / first if first else 0.0, "nDCG@10": float(dcg / idcg)}
    for k in RECALL_KS:
        out[f"R@{k}"] = len(relevant.intersection(top[:k])) / len(relevant)
    return out


def per_query_metrics(rankings: np.ndarray | Sequence[Sequence[int]], grades: Sequence[Mapping[int, int]]
                      ) -> dict[str, np.ndarray]:
    """:func:`query_metrics` of every query: metric name → ``(Q,)`` float64 fractions."""
    if len(rankings) != len(grades):
        raise KaleidoError(f"{len(rankings)} rankings for {len(grades)} judged queries")
    rows = [query_metrics([int(r) for r in ranked], g) for ranked, g in zip(rankings, grades, strict=True)]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in METRIC_NAMES}


def rank_rows(queries: np.ndarray, gallery: np.ndarray, *, offsets: np.ndarray | None = None,
              k: int = CUTOFF) -> np.ndarray:
    """Each query's top ``k`` gallery rows by ``q · g − offset(g)`` (plain inner product without ``offsets``),
    ties in gallery order: ``(Q, D)``, ``(G, D)``, ``(G,)`` → ``(Q, min(k, G))`` int64."""
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    out = np.empty((len(queries), min(k, len(gallery))), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(gallery)))
    for lo in range(0, len(queries), step):
        scores = queries[lo:lo + step] @ gallery.T  # (chunk, G)
        if offsets is not None:
            scores = scores - np.asarray(offsets, np.float32)[None, :]
        out[lo:lo + step] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


def _interval(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_comparison(model: Mapping[str, np.ndarray], baseline: Mapping[str, np.ndarray] | None = None, *,
                         resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Means over queries with bootstrap 95% intervals, and the paired interval of model − baseline.

    Args:
        model: metric name → per-query values ``(Q,)``.
        baseline: the same metrics over the same queries in the same order, or None.
        resamples: bootstrap draws (each picks Q queries with replacement, the same for every metric and side).
        seed: the draws' seed (the same seed gives the same intervals).

    Returns:
        Per metric ``{"model", "model_low", "model_high"}`` and, with a baseline, ``"baseline", "baseline_low",
        "baseline_high", "diff", "low", "high"`` (``diff`` = model − baseline), in the inputs' unit.

    Raises:
        KaleidoError: no queries, or the two sides cover different numbers of queries.
    """
    sizes = {len(v) for v in model.values()} | ({len(v) for v in baseline.values()} if baseline else set())
    if len(sizes) != 1 or 0 in sizes:
        raise KaleidoError(f"the bootstrap needs the same non-empty queries on both sides, got sizes {sorted(sizes)}")
    (n,) = sizes
    sides = {"model": {k: np.asarray(v, np.float64) for k, v in model.items()}}
    if baseline is not None:
        sides["baseline"] = {k: np.asarray(baseline[k], np.float64) for k in model}
    draws = {side: {k: np.empty(resamples) for k in model} for side in sides}
    rng = np.random.default_rng(seed)
    block = max(1, _CHUNK_ELEMENTS // n)
    for lo in range(0, resamples, block):  # (block, Q) picks at a time: one resample per row, shared by all
        picks = rng.integers(0, n, (min(block, resamples - lo), n))
        for side, metrics in sides.items():
            for name, values in metrics.items():
                draws[side][name][lo:lo + len(picks)] = values[picks].mean(axis=1)
    out: dict[str, dict[str, Any]] = {}
    for name in model:
        found: dict[str, Any] = {}
        for side in sides:
            found[side] = float(sides[side][name].mean())
            found[f"{side}_low"], found[f"{side}_high"] = _interval(draws[side][name])
        if baseline is not None:
            found["diff"] = found["model"] - found["baseline"]
            found["low"], found["high"] = _interval(draws["model"][name] - draws["baseline"][name])
        out[name] = found
    return out
