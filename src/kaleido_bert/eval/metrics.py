"""Metric definitions of the evaluation protocols (paper §4, Tables 2 and 3).

Retrieval (ITR / TIR):

* :func:`rank_hits` — ``scores (Q, C)`` float, higher is better, ``positive (Q, C)`` bool with at least one True
  per row → ``{K: mean P(rank ≤ K)}``. Ties count at their expected rank under random tie-breaking: with ``g``
  candidates scoring strictly above the query's best positive and ``t`` *other* candidates scoring exactly the
  same, ``P(rank ≤ K) = clip((K − g) / (t + 1), 0, 1)``. Other positives tied with the best one are counted
  among the ``t`` like negatives, which is exact for one positive and slightly conservative for several.
  The sample-100 protocol (Table 2) has ``C = 101``: one positive and 100 negatives.
* :func:`gallery_recall` — ``similarity (Q, G)`` and one set of correct gallery columns per query →
  ``{"R@1", "R@5", "R@10", "mean_recall"}`` as fractions (full-gallery protocol).
* :func:`sum_r` — SumR = (R@1 + R@5 + R@10 of both directions) × 100.

Classification (CR / SUB): :func:`~kaleido_bert.data.label_scores.classification_metrics` (in the data layer, so
that training's validation choices use the same rule) gives accuracy and macro-F1 over *all* label ids of the
label map (classes absent from the test set count as F1 = 0, as the original EasyTransfer evaluator did);
:func:`sum_cls` = (ACC + macro-F1) × 100 summed over both tasks.

Captioning (FC) metrics live in :mod:`kaleido_bert.eval.caption_metrics`.

Inputs are numpy arrays (or anything ``np.asarray`` takes); every result is a plain Python float. Bad input
raises :class:`~kaleido_bert.errors.KaleidoError` with a one-line message naming the item.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kaleido_bert.errors import KaleidoError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
SUM_KS: tuple[int, ...] = (1, 5, 10)
_CHUNK_ELEMENTS = 4_000_000  # rows of (Q, C) processed at a time in rank_hits, to bound temporary memory


# ----------------------------------------------------------------------------------------------- retrieval
def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise KaleidoError("ks is empty: give at least one cut-off K")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise KaleidoError(f"cut-off K={k!r} is not a positive integer")
    return tuple(int(k) for k in out)


def _as_bool_matrix(positive: Any, name: str) -> np.ndarray:
    arr = np.asarray(positive)
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
            raise KaleidoError(f"{name} must be a boolean matrix, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def rank_hits(scores: Any, positive: Any, ks: Sequence[int] = DEFAULT_KS, *,
              per_query_out: list | None = None) -> dict[int, float]:
    """Rank@K of the best-scored positive of each query, ties at their expected rank.

    Args:
        scores: ``(Q, C)`` float array of candidate scores, higher is better (``±inf`` allowed, NaN not).
        positive: ``(Q, C)`` bool array marking the correct candidates; every row needs at least one True.
        ks: the cut-offs K.
        per_query_out: when given, the ``(Q, len(ks))`` per-query ``P(rank ≤ K)`` is appended to it (the
            outcomes a paired bootstrap resamples).

    Returns:
        ``{K: mean over queries of P(rank ≤ K)}``, fractions in [0, 1]. With ``g`` candidates strictly above the
        query's best positive and ``t`` other candidates tied with it, ``P(rank ≤ K) = clip((K − g)/(t + 1), 0, 1)``
        (exact under random tie-breaking for one positive; tied positives count as negatives, so slightly
        conservative for several).

    Raises:
        KaleidoError: on shape mismatch, an empty matrix, NaN scores, a query without a positive or a bad K.
    """
    ks = _check_ks(ks)
    s = np.asarray(scores, dtype=np.float64)
    pos = _as_bool_matrix(positive, "positive")
    if s.ndim != 2:
        raise KaleidoError(f"scores must be a (Q, C) matrix, got shape {s.shape}")
    if pos.shape != s.shape:
        raise KaleidoError(f"positive has shape {pos.shape} but scores has shape {s.shape}")
    q, c = s.shape
    if q == 0 or c == 0:
        raise KaleidoError(f"scores is empty (shape {s.shape})")
    no_pos = np.flatnonzero(~pos.any(axis=1))
    if no_pos.size:
        raise KaleidoError(f"query {int(no_pos[0])} has no positive candidate ({no_pos.size} such queries)")
    nan_rows = np.flatnonzero(np.isnan(s).any(axis=1))
    if nan_rows.size:
        raise KaleidoError(f"scores of query {int(nan_rows[0])} contain NaN")

    higher = np.empty(q, dtype=np.int64)
    ties = np.empty(q, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // c)
    for lo in range(0, q, step):
        blk, pblk = s[lo : lo + step], pos[lo : lo + step]
        best = np.where(pblk, blk, -np.inf).max(axis=1, keepdims=True)
        higher[lo : lo + step] = (blk > best).sum(axis=1)
        ties[lo : lo + step] = (blk == best).sum(axis=1) - 1
    per_query = np.clip((np.asarray(ks)[None, :] - higher[:, None]) / (ties[:, None] + 1), 0.0, 1.0)
    if per_query_out is not None:
        per_query_out.append(per_query)
    return {k: float(per_query[:, j].mean()) for j, k in enumerate(ks)}


def gallery_recall(
    similarity: Any, positives: Sequence[Iterable[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K of a full-gallery search: a query is a hit when one of its positives is in the top K.

    Args:
        similarity: ``(Q, G)`` float array, query × gallery, higher is better.
        positives: ``Q`` non-empty collections of gallery column indices that are correct for each query.
        ks: the cut-offs K.

    Returns:
        ``{"R@K": fraction of queries hit, ..., "mean_recall": mean of the R@K}``; ties at their expected rank as
        in :func:`rank_hits`.

    Raises:
        KaleidoError: on a shape or length mismatch, a query without positives or an index out of range.
    """
    ks = _check_ks(ks)
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise KaleidoError(f"similarity must be a (Q, G) matrix, got shape {sim.shape}")
    q, g = sim.shape
    if len(positives) != q:
        raise KaleidoError(f"positives has {len(positives)} entries but similarity has {q} query rows")
    mask = np.zeros((q, g), dtype=bool)
    for i, cols in enumerate(positives):
        idx = [int(j) for j in cols]
        if not idx:
            raise KaleidoError(f"query {i} has no positive gallery index")
        bad = [j for j in idx if not 0 <= j < g]
        if bad:
            raise KaleidoError(f"query {i} has gallery index {bad[0]} outside [0, {g})")
        mask[i, idx] = True
    hits = rank_hits(sim, mask, ks)
    out = {f"R@{k}": hits[k] for k in ks}
    out["mean_recall"] = float(np.mean([hits[k] for k in ks]))
    return out


def ranked_recall(ranked: Sequence[Sequence[int]], positives: Sequence[Iterable[int]],
                  ks: Sequence[int] = DEFAULT_KS, *, per_query_out: list | None = None) -> dict[str, float]:
    """Recall@K from ranked gallery indices (a search's top-k, best first): a query is a hit when one of its
    positives is among its first K. ``per_query_out`` (optional) receives the ``(Q, len(ks))`` 0/1 hits.

    Returns:
        ``{"R@K": fraction of queries hit, ..., "mean_recall": mean of the R@K}``, as :func:`gallery_recall`
        (which it equals when ``ranked`` is the similarity's order without ties).

    Raises:
        KaleidoError: on a length mismatch or a bad K.
    """
    ks = _check_ks(ks)
    if len(ranked) != len(positives):
        raise KaleidoError(f"positives has {len(positives)} entries but there are {len(ranked)} ranked queries")
    sets = [set(p) for p in positives]
    hits = np.array([[bool(set(r[:k]) & p) for k in ks] for r, p in zip(ranked, sets, strict=True)],
                    dtype=np.float64).reshape(len(ranked), len(ks))
    if per_query_out is not None:
        per_query_out.append(hits)
    out = {f"R@{k}": float(hits[:, j].mean()) for j, k in enumerate(ks)}
    out["mean_recall"] = float(np.mean([out[f"R@{k}"] for k in ks]))
    return out


def sum_r(itr: Mapping[int, float], tir: Mapping[int, float]) -> float:
    """SumR of the sample-100 protocol: (R@1 + R@5 + R@10 of both directions) × 100.

    Args:
        itr: image→text ``{K: fraction}`` as returned by :func:`rank_hits`.
        tir: text→image ``{K: fraction}``.

    Returns:
        SumR in percent points (0–600).

    Raises:
        KaleidoError: if K = 1, 5 or 10 is missing from either direction.
    """
    total = 0.0
    for name, hits in (("itr", itr), ("tir", tir)):
        for k in SUM_KS:
            if k not in hits:
                raise KaleidoError(f"{name} lacks R@{k} needed for SumR")
            total += float(hits[k])
    return total * 100.0


def expected_rank_chance(num_candidates: int, k: int) -> float:
    """Chance level of Rank@K: a random ranking puts the one positive in the top K with probability K / C.

    Args:
        num_candidates: the number of candidates C per query (101 for the sample-100 protocol).
        k: the cut-off K.

    Returns:
        ``min(K, C) / C``.

    Raises:
        KaleidoError: if either is below 1.
    """
    if num_candidates < 1 or k < 1:
        raise KaleidoError(f"chance level needs num_candidates ≥ 1 and k ≥ 1, got {num_candidates} and {k}")
    return min(k, num_candidates) / num_candidates


def sum_cls(category: Mapping[str, float], subcategory: Mapping[str, float]) -> float:
    """SumCLS = (ACC + macro-F1) × 100 summed over category (CR) and sub-category (SUB) recognition.

    Args:
        category: :func:`~kaleido_bert.data.label_scores.classification_metrics` of the category task.
        subcategory: :func:`~kaleido_bert.data.label_scores.classification_metrics` of the sub-category task.

    Returns:
        SumCLS in percent points (0–400).

    Raises:
        KaleidoError: if ``accuracy`` or ``macro_f1`` is missing.
    """
    total = 0.0
    for name, res in (("category", category), ("subcategory", subcategory)):
        for key in ("accuracy", "macro_f1"):
            if key not in res:
                raise KaleidoError(f"{name} metrics lack {key!r} needed for SumCLS")
            total += float(res[key])
    return total * 100.0
