"""Linear probe of a classifier head before fine-tuning (LP-FT, Kumar et al. 2022; paper §4.2 CR & SUB).

Fine-tuning a randomly initialised head distorts the pre-trained features while the head is still wrong; LP-FT
first fits the head on the frozen encoder, then fine-tunes everything from there. :func:`fit_probe` runs the
frozen encoder (eval mode, ``torch.inference_mode``, fp32 as evaluation) over the training split, standardises the
head inputs by their training mean and standard deviation, fits a multinomial logistic regression (sklearn, lbfgs,
300 iterations, the fine-tuning class weights) for each inverse L2 strength ``C`` of ``finetune.probe_c``, keeps the
one whose validation accuracy + macro-F1 (over the label map) is highest (the first on a tie, or when there is no
validation split) and installs it with
:meth:`~kaleido_bert.model.classification.KaleidoBertForClassification.load_linear` (the wide head keeps the
standardisation as its buffers, the pooled head folds it into its ``Linear``). Classes absent from the training
split get a zero weight row and the bias :data:`ABSENT_BIAS`, so they are never predicted.

With ``mixes`` below 1 (``finetune.probe_mix``) and a model that carries the frozen member, a second logistic
regression is fitted on the frozen columns alone (the colour feature and the sentence embedding; same C grid), and
every (head C, member C, α) is scored on validation with the ensemble's predictions; α = 1 (the head alone) is
scored once and comes first, so a tie keeps the plain head (without a validation split nothing can choose the
member, so it is not fitted and α stays 1).

Shapes: head inputs ``X (N, H)`` float64, labels ``y (N,)``, mean / std ``(H,)``, weight ``(C, H)``, bias ``(C,)``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kaleido_bert.data.label_scores import classification_metrics
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.classification import KaleidoBertForClassification
from kaleido_bert.model.linear_probe import standardiser

PROBE_C = 1.0
"""Inverse L2 strength of the probe's logistic regression (sklearn's default)."""
PROBE_ITER = 300
"""lbfgs iterations of the probe."""
ABSENT_BIAS = -1e4
"""Bias of a class absent from the training split: never predicted (and finite in fp16)."""


def head_features(model: KaleidoBertForClassification, dataset: Dataset, collate_fn: Callable, *,
                  batch_size: int, device: torch.device, progress: bool = True, num_workers: int = 0,
                  desc: str = "probe") -> tuple[np.ndarray, np.ndarray]:
    """The frozen model's head inputs ``(N, H)`` float64 and labels ``(N,)`` of every sample, in dataset order."""
    was_training = model.training
    model.eval().to(device)  # outside inference mode: moved parameters must stay trainable
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=num_workers, generator=torch.Generator())  # leaves the global RNG alone
    xs, ys = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            xs.append(model.head_input(inputs).double().cpu().numpy())
            ys.append(batch["label"].numpy())
    model.train(was_training)
    if not xs:
        return np.zeros((0, model.head_size)), np.zeros(0, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def fit_linear(x: np.ndarray, y: np.ndarray, num_labels: int, *, class_weight: Tensor | None = None,
               c: float = PROBE_C) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The probe of head inputs ``x (N, H)`` and labels ``y (N,)``: ``(weight (C, H), bias (C,), mean (H,),
    std (H,), converged)``, the logits of ``x`` being ``weight · (x − mean) / std + bias``.

    ``class_weight (C,)`` (None = unweighted) is passed to sklearn for the classes present. sklearn orders its
    rows by the sorted labels present; a binary fit (one row ``w``) becomes the rows ``−w/2, w/2``, the same
    decisions and probabilities; a single class present gets bias 0 and every other class :data:`ABSENT_BIAS`.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = standardiser(x)
    weight = np.zeros((num_labels, x.shape[1]))
    bias = np.full(num_labels, ABSENT_BIAS)
    present = np.unique(y)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return weight, bias, mean, std, True
    weights = None if class_weight is None else {int(c): float(class_weight[c]) for c in present}
    clf = LogisticRegression(C=c, max_iter=PROBE_ITER, solver="lbfgs", class_weight=weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as ``converged`` instead
        clf.fit((x - mean) / std, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    return weight, bias, mean, std, bool(np.max(clf.n_iter_) < PROBE_ITER)


def head_predictions(model: KaleidoBertForClassification, x: np.ndarray) -> np.ndarray:
    """The installed head's predicted label ids ``(N,)`` of head inputs ``x (N, H)`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model.head_logits(torch.from_numpy(x).float().to(device))
    model.train(was_training)
    return logits.argmax(-1).cpu().numpy()


def log_probs(x: np.ndarray, fitted: tuple) -> np.ndarray:
    """Log-probabilities ``(N, C)`` of a :func:`fit_linear` classifier on its (unstandardised) inputs ``x``."""
    from scipy.special import log_softmax

    weight, bias, mean, std = fitted[:4]
    return log_softmax(((x - mean) / std) @ weight.T + bias, axis=1)


def fit_probe(model: KaleidoBertForClassification, train_set: Dataset, val_set: Dataset | None,
              collate_fn: Callable, *, batch_size: int, device: torch.device, class_weight: Tensor | None = None,
              c_values: Sequence[float] = (PROBE_C,), mixes: Sequence[float] = (1.0,), progress: bool = True,
              num_workers: int = 0) -> dict[str, Any]:
    """Fit ``model``'s head by a linear probe on the frozen encoder's features of ``train_set``, in place; with
    several ``c_values`` (and ``mixes``, for a model with the frozen member) the one that scores best on
    ``val_set`` (accuracy + macro-F1) is installed.

    Returns:
        ``{"c", "train_accuracy", "val_accuracy" (None without a validation split), "val_macro_f1", "items",
        "converged", "seconds", "grid"}`` (``grid``: each setting's validation accuracy and macro-F1), accuracies
        and F1 as fractions, as the installed head predicts; with the frozen member also ``"mix"`` (α) and
        ``"frozen_c"`` (None at α = 1).

    Raises:
        KaleidoError: an empty training split, or ``mixes`` below 1 for a model without the frozen member.
    """
    started = time.perf_counter()
    member_mixes = [float(m) for m in mixes if m < 1]
    if member_mixes and not model.frozen_member:
        raise KaleidoError("finetune.probe_mix below 1 needs the classifier's frozen member "
                           "(config.classifier_frozen_member)")
    if len(train_set) == 0:
        raise KaleidoError("the linear probe (finetune.probe) needs training items: the train split has none "
                           "with features")
    x, y = head_features(model, train_set, collate_fn, batch_size=batch_size, device=device, progress=progress,
                         num_workers=num_workers, desc="probe train")
    vx = vy = None
    if val_set is not None and len(val_set) > 0:
        vx, vy = head_features(model, val_set, collate_fn, batch_size=batch_size, device=device,
                               progress=progress, num_workers=num_workers, desc="probe val")
    num_labels, start = model.config.num_labels, model.frozen_start if model.frozen_member else 0
    fits = [fit_linear(x, y, num_labels, class_weight=class_weight, c=float(c))
            for c in tqdm(list(c_values), desc="probe C", unit="fit", disable=not progress, leave=False)]
    member_cs = list(c_values) if member_mixes and vx is not None else []  # only validation can choose a member
    members = [fit_linear(x[:, start:], y, num_labels, class_weight=class_weight, c=float(c))
               for c in tqdm(member_cs, desc="probe member C", unit="fit", disable=not progress, leave=False)]
    settings = [(i, None, 1.0) for i in range(len(fits))]  # (head fit, member fit, α): the head alone first
    settings += [(i, j, m) for m in member_mixes for i in range(len(fits)) for j in range(len(members))]
    heads = [log_probs(vx, f) for f in fits] if vx is not None else []
    tails = [log_probs(vx[:, start:], f) for f in members] if vx is not None else []
    best: tuple[float, int] | None = None
    grid = []
    for rank, (i, j, mix) in enumerate(settings):
        entry: dict[str, Any] = {"c": float(c_values[i]), "val_accuracy": None, "val_macro_f1": None}
        if model.frozen_member:
            entry.update(mix=mix, frozen_c=None if j is None else float(c_values[j]))
        score = 0.0
        if vx is not None:
            logp = heads[i] if j is None else mix * heads[i] + (1 - mix) * tails[j]
            scores = classification_metrics(vy, logp.argmax(1), num_labels)
            entry["val_accuracy"] = round(scores["accuracy"], 5)
            entry["val_macro_f1"] = round(scores["macro_f1"], 5)
            score = entry["val_accuracy"] + entry["val_macro_f1"]
        grid.append(entry)
        if best is None or score > best[0]:
            best = (score, rank)
    assert best is not None  # c_values is non-empty (the config refuses an empty list)
    rank = best[1]
    i, j, mix = settings[rank]
    weight, bias, mean, std, converged = fits[i]
    model.load_linear(*(torch.from_numpy(a).float() for a in (weight, bias, mean, std)))
    if model.frozen_member:
        member = members[j] if j is not None else (np.zeros((num_labels, x.shape[1] - start)), np.zeros(num_labels))
        model.load_frozen_member(torch.from_numpy(member[0]).float(), torch.from_numpy(member[1]).float(), mix)
        converged = converged and (j is None or members[j][4])
    result: dict[str, Any] = {**grid[rank],
                              "train_accuracy": round(float(np.mean(head_predictions(model, x) == y)), 5),
                              "items": len(y), "converged": converged, "grid": grid}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def validation_scores(model: KaleidoBertForClassification, val_set: Dataset, collate_fn: Callable, *,
                      batch_size: int, device: torch.device, num_workers: int = 0) -> dict[str, float]:
    """The model's accuracy and macro-F1 (over its label map) on ``val_set``, in eval mode: ``{"accuracy",
    "macro_f1", "score"}``, ``score`` their sum (how the probe's settings are ranked)."""
    x, y = head_features(model, val_set, collate_fn, batch_size=batch_size, device=device, progress=False,
                         num_workers=num_workers, desc="validation")
    scores = classification_metrics(y, head_predictions(model, x), model.config.num_labels)
    return {"accuracy": round(scores["accuracy"], 5), "macro_f1": round(scores["macro_f1"], 5),
            "score": round(scores["accuracy"] + scores["macro_f1"], 5)}
