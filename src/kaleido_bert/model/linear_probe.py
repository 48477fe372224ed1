"""The linear probe on frozen features (beyond the paper): the frozen baseline's maps, and the start of LP-FT.

Frozen image features are the store's colour patch features, pooled (the 1×1 patch or the mean of the patches);
frozen text features are a BERT checkpoint's last hidden states mean-pooled over real tokens (as sentence encoders
such as all-MiniLM-L6-v2 are trained). Both are standardised with training statistics, and two linear maps into a
shared L2-normalised space are trained with a symmetric InfoNCE loss (learnable temperature). The frozen baseline
(:mod:`kaleido_bert.eval.baseline`) scores these maps; pre-training with ``train.probe_init`` starts Kaleido-BERT's
ITC projections from them (:func:`folded`). Shapes: image features ``(N, F)``, text features ``(M, H)``,
embeddings ``(·, dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import sentence_embedding
from kaleido_bert.model.heads import ITC_DIM
from kaleido_bert.patches.features import NUM_COLOUR
from kaleido_bert.patches.store import FeatureStore

IMAGE_POOLS = ("whole", "mean")
"""``whole`` = the 1×1 Kaleido patch (row 0); ``mean`` = the mean of the 55 colour patches."""


@dataclass
class BaselineSettings:
    """How the linear probe is trained: its embedding width (the ITC head's, :data:`ITC_DIM`; a probe that
    starts an ITC head takes the head's own), InfoNCE epochs, batch and learning rate, the text length of the frozen
    encoder, and the logistic regressions' C and iterations."""

    dim: int = ITC_DIM
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    text_max_len: int = 64
    logreg_c: float = 1.0
    logreg_iter: int = 300


# ---------------------------------------------------------------------------------------------- frozen features
def image_features(store: FeatureStore, ids: list[str], pool: str, chunk: int = 512,
                   keep: np.ndarray | None = None) -> np.ndarray:
    """Frozen image features of store rows: ``(N, F)`` float32 (``pool`` in :data:`IMAGE_POOLS`; ``keep``, a
    ``(P,)`` bool mask, restricts the ``mean`` to the patches a model attends to)."""
    if pool not in IMAGE_POOLS:
        raise KaleidoError(f"unknown image pool {pool!r}: choose one of {', '.join(IMAGE_POOLS)}")
    out = np.empty((len(ids), store.feature_size), np.float32)
    rows = np.array([store.index[i] for i in ids], dtype=np.int64)
    used = np.arange(NUM_COLOUR) if keep is None else np.flatnonzero(keep)
    for lo in range(0, len(ids), chunk):
        r = rows[lo:lo + chunk]
        if pool == "whole":
            out[lo:lo + chunk] = store.arrays["features"][r, 0]
        else:
            out[lo:lo + chunk] = np.asarray(store.arrays["features"][r, :NUM_COLOUR], np.float32)[:, used].mean(1)
    return out


class FrozenText:
    """A frozen BERT checkpoint (tokenizer and model, loaded once): strings → mean-pooled (over real tokens) last
    hidden states, ``(M, H)`` float32."""

    def __init__(self, bert_dir: str | Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
        self.model = AutoModel.from_pretrained(str(bert_dir)).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str], *, max_len: int = 64, batch_size: int = 128) -> np.ndarray:
        parts = [np.empty((0, self.model.config.hidden_size), np.float32)]
        for lo in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[lo:lo + batch_size], padding=True, truncation=True, max_length=max_len,
                                 return_tensors="pt")
            parts.append(sentence_embedding(self.model, enc["input_ids"], enc["attention_mask"]).numpy())
        return np.concatenate(parts)


def text_features(texts: list[str], bert_dir: str | Path, *, max_len: int = 64, batch_size: int = 128) -> np.ndarray:
    """Mean-pooled (over real tokens) last hidden states of a frozen BERT checkpoint: ``(M, H)`` float32."""
    return FrozenText(bert_dir)(texts, max_len=max_len, batch_size=batch_size)


MIN_STD = 1e-6
"""A feature whose training standard deviation is below this is constant there: it is divided by 1, not by ~0
(so a value that varies only outside training cannot be blown up)."""


def standardiser(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std ``(F,)`` of the training rows ``(N, F)``; a constant feature's std is 1."""
    std = train.std(0)
    return train.mean(0), np.where(std < MIN_STD, 1.0, std)


# ---------------------------------------------------------------------------------------------- projections
class DualProjection(nn.Module):
    """Two linear maps into a shared L2-normalised space and a learnable InfoNCE temperature."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return F.normalize((self.image if side == "image" else self.text)(x), dim=-1)

    def loss(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of matching rows ``(B, F)``, ``(B, H)`` → scalar."""
        logits = self.logit_scale.exp().clamp(max=100) * self.embed(images, "image") @ self.embed(texts, "text").T
        target = torch.arange(len(images))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_projection(images: np.ndarray, texts: np.ndarray, *, seed: int,
                     settings: BaselineSettings | None = None) -> tuple[DualProjection, dict[str, Any]]:
    """Train :class:`DualProjection` on matching rows (image i ↔ text i, standardised).

    Returns:
        The model and ``{"loss_before", "loss_after", "epoch_loss"}`` (full-data batched losses before and
        after training, and each epoch's mean training loss).
    """
    settings = settings or BaselineSettings()
    if len(images) != len(texts) or len(images) < 2:
        raise KaleidoError(f"the baseline needs ≥ 2 matching training pairs, got {len(images)} and {len(texts)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DualProjection(images.shape[1], texts.shape[1], settings.dim)
    x, y = torch.from_numpy(images).float(), torch.from_numpy(texts).float()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)

    def full_loss() -> float:
        with torch.no_grad():
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            batches = [order[i:i + settings.batch_size] for i in range(0, len(x), settings.batch_size)]
            return float(np.mean([model.loss(x[b], y[b]).item() for b in batches if len(b) > 1]))

    history: dict[str, Any] = {"loss_before": full_loss(), "epoch_loss": []}
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=gen)
        losses = []
        for i in range(0, len(x), settings.batch_size):
            b = order[i:i + settings.batch_size]
            if len(b) < 2:
                continue
            loss = model.loss(x[b], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history["epoch_loss"].append(float(np.mean(losses)))
    history["loss_after"] = full_loss()
    return model.eval(), history


def folded(linear: nn.Linear, mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``linear`` applied to raw features: ``W((x − μ)/σ) + b = (W/σ)x + (b − W(μ/σ))``."""
    w = linear.weight.detach().double() / torch.from_numpy(std).double()[None]
    b = linear.bias.detach().double() - w @ torch.from_numpy(mean).double()
    return w.float(), b.float()


def fit_into(text_map: nn.Linear, image_map: nn.Linear, text: np.ndarray, images: np.ndarray, *, seed: int,
             settings: BaselineSettings | None = None) -> tuple[DualProjection, dict[str, Any]]:
    """Train the probe on matching raw rows (text ``(N, H)``, images ``(N, F)``, standardised with their own
    statistics) and copy its two maps, the standardisation folded in, into ``text_map`` and ``image_map``.

    Returns:
        The probe and its training history (:func:`train_projection`).
    """
    t_mean, t_std = standardiser(text)
    i_mean, i_std = standardiser(images)
    probe, history = train_projection((images - i_mean) / i_std, (text - t_mean) / t_std, seed=seed,
                                      settings=settings)
    with torch.no_grad():
        for target, source, mean, std in ((text_map, probe.text, t_mean, t_std),
                                          (image_map, probe.image, i_mean, i_std)):
            w, b = folded(source, mean, std)
            target.weight.copy_(w.to(target.weight.device))
            target.bias.copy_(b.to(target.bias.device))
    return probe, history


def init_itc_from_probe(itc: nn.Module, text: np.ndarray, images: np.ndarray, *, seed: int,
                        settings: BaselineSettings | None = None) -> dict[str, Any]:
    """Start an ITC head (``pool = "mean"``) from the linear probe of matching rows (LP-FT, Kumar et al. 2022).

    Args:
        itc: :class:`~kaleido_bert.model.heads.ContrastiveHead` with a ``skip`` map.
        text: ``(N, D)`` the model's own mean-pooled text states of the pairs' descriptions (what its text
            projection reads), ``images``: ``(N, F)`` the mean clean colour features (what its skip map reads).
        seed: the probe's training seed.

    Returns:
        The probe's training history (:func:`train_projection`) plus the standardisation it folded in.

    The text map and the skip map become the probe's maps with the standardisation folded in; the deep image map
    starts at zero, so at step 0 the model's dual encoder is the probe, and pre-training moves it from there.
    """
    if not hasattr(itc, "skip"):
        raise KaleidoError("train.probe_init needs the ITC head's mean pooling: set model.itc_pool=mean")
    settings = replace(settings or BaselineSettings(), dim=itc.text.out_features)  # the head's width, not a default
    probe, history = fit_into(itc.text, itc.skip, text, images, seed=seed, settings=settings)
    with torch.no_grad():
        itc.image.weight.zero_()
        itc.image.bias.zero_()
        itc.logit_scale.copy_(probe.logit_scale.detach())
    return {**history, "pairs": len(text), "logit_scale": float(probe.logit_scale.detach().exp())}
