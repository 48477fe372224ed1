"""Zero-shot classification by label text (beyond the paper: CLIP / FashionCLIP-style prompts in the dual encoder's
shared space).

Each label becomes a prompt through a template (``"a photo of {}"``: the label replaces ``{}``); the text side of a
dual encoder embeds the prompts, the image side the images, and each image scores every label by the cosine of
the two unit vectors. With a logit scale (the ITC head's inverse temperature, the scale the contrastive loss
trained the cosines with) the cosines also become a softmax over the labels. Nothing is trained here, so the
labels may be ones no classifier has seen: a new category, a colour, a pattern.

Used by :meth:`kaleido_bert.serve.pipeline.KaleidoBertPipeline.zero_shot`, ``kaleido classify``, ``POST
/api/classify`` with ``labels``, and the zero-shot evaluation (:mod:`kaleido_bert.eval.zero_shot`).

Shapes: N images, L labels, D embedding size; image embeddings ``(N, D)``, prompt embeddings ``(L, D)``, cosines
and probabilities ``(N, L)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kaleido_bert.errors import KaleidoError, require_utf8

SLOT = "{}"
"""Where a template takes its label."""
DEFAULT_TEMPLATE = "a photo of {}"
"""The prompt a label fills unless another template is given (CLIP's plainest)."""




def parse_labels(text: str) -> list[str]:
    """Labels typed as one comma-separated string (``--labels``, a form field): ``"red, blue"`` → ``["red",
    " blue"]``.

    Only split: :func:`check_labels` strips and refuses blank or repeated items.
    """
    return str(text).split(",")


def check_template(template: str) -> str:
    """``template`` when it holds ``{}`` exactly once (and is UTF-8 text).

    Raises:
        KaleidoError: not a string, no ``{}`` or more than one, or a lone surrogate (one line, quoting it).
    """
    if not isinstance(template, str):
        raise KaleidoError(f"the template must be a string, got {type(template).__name__}")
    count = require_utf8(template, "the template").count(SLOT)
    if count != 1:
        raise KaleidoError(f"the template {template!r} must contain {SLOT} exactly once (where the label goes); "
                           f"it has {count}")
    return template


def check_labels(labels: Sequence[str]) -> list[str]:
    """The labels without surrounding whitespace, when there is at least one and none is blank or repeated.

    Raises:
        KaleidoError: one string instead of a list, no labels, a label that is not a string, blank, not UTF-8,
            or the same as an earlier one after stripping (one line naming its position and text).
    """
    if isinstance(labels, str):
        raise KaleidoError(f"labels must be a list of strings, not one string ({labels[:40]!r}): split a "
                           "comma-separated list first")
    labels = list(labels)
    if not labels:
        raise KaleidoError("no labels to classify into: give at least one")
    first: dict[str, int] = {}
    for i, label in enumerate(labels, 1):
        if not isinstance(label, str):
            raise KaleidoError(f"label {i} is not a string: {label!r}")
        name = require_utf8(label, f"label {i}").strip()
        if not name:
            raise KaleidoError(f"label {i} of {len(labels)} is empty or whitespace-only ({label!r})")
        if name in first:
            raise KaleidoError(f"label {i} {name!r} repeats label {first[name]}")
        first[name] = i
    return list(first)


def prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Each label (stripped) put into the template: ``["red dress"]``, ``"a photo of {}"`` → ``["a photo of red
    dress"]``.

    Raises:
        KaleidoError: a bad template or bad labels (:func:`check_template`, :func:`check_labels`).
    """
    template = check_template(template)
    return [template.replace(SLOT, name) for name in check_labels(labels)]


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # a zero vector stays zero (cosine 0 with everything)


@dataclass(frozen=True)
class ZeroShotScores:
    """The scores of N images over L labels.

    Attributes:
        labels: the L labels, stripped, in the order given.
        prompts: the L texts that were embedded.
        cosine: ``(N, L)`` float64 cosine similarities of each image with each prompt.
        logit_scale: the inverse temperature of :attr:`probs`, or None (no softmax).
    """

    labels: list[str]
    prompts: list[str]
    cosine: np.ndarray
    logit_scale: float | None = None

    @property
    def probs(self) -> np.ndarray | None:
        """``(N, L)`` softmax over the labels of ``logit_scale · cosine``; None without a logit scale."""
        if self.logit_scale is None:
            return None
        logits = self.logit_scale * self.cosine
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def predictions(self) -> np.ndarray:
        """``(N,)`` the index of each image's best label (the first one on a tie)."""
        return self.cosine.argmax(axis=1)

    def order(self, row: int = 0) -> np.ndarray:
        """``(L,)`` label indices of image ``row``, best first (ties keep the given order)."""
        return np.argsort(-self.cosine[row], kind="stable")

    def ranked(self, row: int = 0) -> list[dict[str, Any]]:
        """Image ``row``'s labels, best first: ``[{"label", "score" (cosine), "prob" (None without a scale)}]``."""
        probs = self.probs
        return [{"label": self.labels[j], "score": float(self.cosine[row, j]),
                 "prob": None if probs is None else float(probs[row, j])} for j in self.order(row)]


def zero_shot_scores(embed_texts: Callable[[list[str]], np.ndarray], image_embeddings: np.ndarray,
                     labels: Sequence[str], template: str = DEFAULT_TEMPLATE, *,
                     logit_scale: float | None = None) -> ZeroShotScores:
    """Score images over labels no classifier was trained on, by the cosine of image and prompt embeddings.

    Args:
        embed_texts: the dual encoder's text side, strings → ``(L, D)`` (``DualEncoder.embed_texts``, the frozen
            baseline's ``EmbeddingScorer.embed_strings``); re-normalised here, so any scale is fine.
        image_embeddings: ``(N, D)`` (or ``(D,)`` for one image) in the same space.
        labels: the L label texts (validated by :func:`check_labels`).
        template: the prompt each label fills (:func:`check_template`).
        logit_scale: the softmax's inverse temperature (the ITC logit scale), or None for cosines only.

    Returns:
        :class:`ZeroShotScores`.

    Raises:
        KaleidoError: bad labels or template (before anything is embedded), a logit scale that is not a positive
            finite number, or text and image embeddings of different sizes.
    """
    texts = prompts(labels, template)
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
        raise KaleidoError(f"the logit scale must be a positive finite number, got {logit_scale}")
    images = np.atleast_2d(np.asarray(image_embeddings, dtype=np.float64))
    text = np.asarray(embed_texts(texts), dtype=np.float64)
    if text.ndim != 2 or text.shape[0] != len(texts) or text.shape[1] != images.shape[1]:
        raise KaleidoError(f"{len(texts)} prompts embedded as {text.shape}, images as {images.shape}: the text and "
                           "image embeddings must share one space")
    cosine = np.clip(_unit(images) @ _unit(text).T, -1.0, 1.0)  # (N, L); rounding can step past ±1
    return ZeroShotScores(labels=check_labels(labels), prompts=texts, cosine=cosine,
                          logit_scale=None if logit_scale is None else float(logit_scale))


def logit_scale_of(encoder: Any) -> float | None:
    """The ITC logit scale of a :class:`~kaleido_bert.model.dual_encoder.DualEncoder` (None without an ITC head)."""
    return float(encoder.itc_scale) if getattr(encoder, "has_itc", False) else None


def rank_labels(encoder: Any, image_embedding: np.ndarray, labels: Sequence[str],
                template: str = DEFAULT_TEMPLATE) -> list[dict[str, Any]]:
    """One image's labels through a dual encoder, best first: ``[{"label", "score", "prob"}]`` (the softmax with
    the encoder's ITC logit scale; ``prob`` None without an ITC head).

    Args:
        encoder: a :class:`~kaleido_bert.model.dual_encoder.DualEncoder` (``embed_texts``, ``has_itc``,
            ``itc_scale``).
        image_embedding: the image's embedding by the same encoder, ``(1, D)`` or ``(D,)``.
    """
    return zero_shot_scores(encoder.embed_texts, image_embedding, labels, template,
                            logit_scale=logit_scale_of(encoder)).ranked(0)
