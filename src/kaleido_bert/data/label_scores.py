"""Accuracy and macro-F1 over a label map: the CR / SUB scores (paper §4.2 task 3, Table 3).

One rule for every place that scores a classifier: evaluation (:mod:`kaleido_bert.eval.evaluate`), the frozen
baseline and the linear probe's validation choice of C (:mod:`kaleido_bert.train.probe`). Macro-F1
averages over *every* id of the label map, so a class absent from both gold and predictions counts as F1 = 0 (the
original EasyTransfer evaluator's rule). Shapes: gold and predicted label ids ``(N,)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kaleido_bert.errors import KaleidoError


def _as_labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise KaleidoError(f"{name} must be a 1-D label array, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise KaleidoError(f"{name} must hold integer label ids, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise KaleidoError(f"{name} must hold integer label ids, got non-integer values")
        arr = arr.astype(np.int64)
    return arr


def classification_metrics(y_true: Any, y_pred: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all label ids of the label map (CR / SUB).

    Args:
        y_true: ``(N,)`` integer gold label ids.
        y_pred: ``(N,)`` integer predicted label ids.
        num_labels: size of the label map; ids live in ``[0, num_labels)``.

    Returns:
        ``{"accuracy", "macro_f1"}`` as fractions. Macro-F1 averages over every id of the label map, so a class
        absent from both gold and predictions counts as F1 = 0 (the original EasyTransfer evaluator's rule).

    Raises:
        KaleidoError: on a length mismatch, no examples, non-integer labels or a label outside the map.
    """
    from sklearn.metrics import f1_score

    if num_labels < 1:
        raise KaleidoError(f"num_labels must be at least 1, got {num_labels}")
    yt, yp = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise KaleidoError(f"y_true has {yt.size} labels but y_pred has {yp.size}")
    if yt.size == 0:
        raise KaleidoError("no examples to score")
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        bad = np.flatnonzero((arr < 0) | (arr >= num_labels))
        if bad.size:
            i = int(bad[0])
            raise KaleidoError(f"{name}[{i}] = {int(arr[i])} is outside the label map [0, {num_labels})")
    acc = float(np.mean(yt == yp))
    f1 = f1_score(yt, yp, labels=list(range(num_labels)), average="macro", zero_division=0)
    return {"accuracy": acc, "macro_f1": float(f1)}
