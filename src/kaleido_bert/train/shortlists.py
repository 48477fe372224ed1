"""ITM's pairs from the linear probe's shortlists, cross-fitted (paper §3.5 ITM; the negatives beyond the paper).

At search time the cross-encoder re-ranks the dual encoder's top k (``eval.rerank_k``) of products it has never
seen, and its score is added to the ITC logit. So ITM learns there: each training image meets descriptions from
its top k, each description images from its top k, and each pair is scored as search scores it, ITC logit + ITM
log-odds. But the dual encoder starts as the linear probe fitted on these very training pairs, which ranks its own
training positives first almost always (the demo: mean rank 1.03 of 350): scored with it, no pair would be wrong and
ITM would learn nothing. The training split's logits and shortlists therefore come from probes **cross-fitted over
product folds** (stacking, Wolpert 1992): each image's row and each description's column from the probe fitted
without its product, so they are as wrong as the dual encoder is on new products. The validation split's come from
the probe fitted on every training pair, the dual encoder's starting point.

A probe is :func:`~kaleido_bert.model.linear_probe.train_projection` on the frozen text states and mean colour
features (:func:`~kaleido_bert.train.pretrain.probe_inputs`), standardised with its training rows. Own product and
identical descriptions never enter a shortlist. Shapes: N images, P products, k the depth; logits are the probe's
scale × cosine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kaleido_bert.model.linear_probe import standardiser, train_projection

FOLDS = 5
"""Product folds of the cross-fitted training logits."""


@dataclass
class Shortlists:
    """A split's ITM pairs: ``texts (N, k)`` product ranks and ``text_logits (N, k)``; ``images (P, k)`` item
    indices and ``image_logits (P, k)`` (-1 / -inf padding); ``positive_logits (N,)`` each image with its own
    product's description."""

    texts: np.ndarray
    text_logits: np.ndarray
    images: np.ndarray
    image_logits: np.ndarray
    positive_logits: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def _probe_logits(train_text: np.ndarray, train_images: np.ndarray, text: np.ndarray, images: np.ndarray, *,
                  seed: int) -> np.ndarray:
    """Fit a probe on matching rows and return its logits of ``images (N, F)`` × ``text (P, D)``: ``(N, P)``."""
    t_mean, t_std = standardiser(train_text)
    i_mean, i_std = standardiser(train_images)
    probe, _ = train_projection((train_images - i_mean) / i_std, (train_text - t_mean) / t_std, seed=seed)
    with torch.no_grad():
        image_emb = probe.embed(torch.from_numpy((images - i_mean) / i_std).float(), "image")
        text_emb = probe.embed(torch.from_numpy((text - t_mean) / t_std).float(), "text")
        scale = float(probe.logit_scale.exp().clamp(max=100))
        return (scale * image_emb @ text_emb.T).numpy()


def probe_shortlists(train: tuple[np.ndarray, np.ndarray], train_product: np.ndarray, k: int, *, seed: int,
                     apply_to: tuple[tuple[np.ndarray, np.ndarray], np.ndarray] | None = None) -> Shortlists:
    """The ITM pairs of the training split (cross-fitted) or, with ``apply_to``, of another split.

    Args:
        train: the training split's probe inputs, product texts ``(P, D)`` and image features ``(N, F)``.
        train_product: ``(N,)`` each training image's product rank.
        k: shortlist depth.
        seed: the probes' seed.
        apply_to: another split's ``((texts, images), item_product)``, scored by the probe of every training pair.
    """
    start = time.perf_counter()
    text, images = train
    if apply_to is None:
        rng = np.random.default_rng(seed)
        fold = rng.permutation(len(text)) % FOLDS  # (P,) each product's fold
        item_fold = fold[train_product]
        rows = np.empty((len(images), len(text)), np.float32)  # image rows: the probe without the image's product
        cols = np.empty_like(rows)  # description columns: the probe without the description's product
        for f in range(FOLDS):
            fit = item_fold != f
            logits = _probe_logits(text[train_product[fit]], images[fit], text, images, seed=seed + f)
            rows[item_fold == f] = logits[item_fold == f]
            cols[:, fold == f] = logits[:, fold == f]
        product, fit_name = train_product, f"cross-fitted over {FOLDS} product folds"
    else:
        (text, images), product = apply_to
        rows = cols = _probe_logits(train[0][train_product], train[1], text, images, seed=seed)
        fit_name = "the probe of every training pair"
    _, group = np.unique(text, axis=0, return_inverse=True)  # identical descriptions share a group
    group = np.asarray(group).reshape(-1)
    blocked = group[product][:, None] == group[None, :]  # (N, P): own product or the same description
    positive = rows[np.arange(len(product)), product]
    rank = 1 + (rows > positive[:, None]).sum(1)
    texts, text_logits = _top(np.where(blocked, -np.inf, rows), k)
    images_k, image_logits = _top(np.where(blocked, -np.inf, cols).T, k)
    report = {"k": int(texts.shape[1]), "fit": fit_name, "positive_mean_rank": round(float(rank.mean()), 2),
              "images": int(rows.shape[0]), "descriptions": int(rows.shape[1]),
              "seconds": round(time.perf_counter() - start, 1)}
    return Shortlists(texts, text_logits, images_k, image_logits, positive.astype(np.float32), report)


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the column indices of the ``k`` highest finite scores, best first, and those scores: ``(R, k)``
    each, -1 / -inf where a row has fewer."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(scores, order, 1)
    return np.where(np.isfinite(picked), order, -1), picked.astype(np.float32)
