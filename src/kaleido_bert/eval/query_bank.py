"""Query-bank normalisation of full-gallery search (beyond the paper; the inverted softmax of Smith et
al. 2017, "Offline bilingual word vectors, orthogonal transformations and the inverted softmax", as QB-Norm uses
it, Bogolin et al. CVPR 2022).

A dual encoder's gallery has hubs: items near many queries, which crowd the top of rankings they do not belong
to. The inverted softmax divides each gallery item's ``exp(β·cos)`` by its sum over a bank of queries the model
has seen in training, so an item that is near every query loses what it gains from being near this one. In logs
and divided by ``β`` the score becomes ``cos(q, g) − offset(g)``, ``offset(g) = logsumexp_b(β·cos(b, g)) / β``:
one number per gallery item, so the normalised ranking is an inner product of ``[q, 1]`` and ``[g, −offset(g)]``
and a FAISS inner-product index ranks by it. ``β = 0`` is off (no offset).

Banks, from the **training** split: the training images for a gallery of descriptions (ITR), the training
products' descriptions for a gallery of images (TIR). ``β`` is chosen among ``eval.query_bank_betas`` by
full-gallery mean recall (ITR and TIR averaged) on the **validation** split (the first on a tie) by ``kaleido
calibrate``, which keeps the choice in the retrieval checkpoint's calibration record
(:mod:`kaleido_bert.model.calibration`) and the banks' embeddings beside it (:data:`BANK_WEIGHTS`), so the
evaluation and the search service rank alike. Embedding the banks and choosing ``β`` (which needs the full-gallery
evaluation of :mod:`kaleido_bert.eval.retrieval`) is :mod:`kaleido_bert.eval.query_bank_fit`; this module is the
bank itself, the offsets and the embeddings kept in the checkpoint.

Shapes: bank ``(B, D)``, gallery ``(G, D)`` → offsets ``(G,)``; :func:`with_offsets` ``(G, D)`` → ``(G, D + 1)``,
:func:`as_queries` ``(Q, D)`` → ``(Q, D + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaleido_bert.atomic import atomic_path
from kaleido_bert.errors import KaleidoError

if TYPE_CHECKING:
    from kaleido_bert.config import RunConfig

BANK_WEIGHTS = "query_bank.safetensors"
"""In the retrieval checkpoint: the banks' embeddings, ``images`` ``(B_i, D)`` and ``texts`` ``(B_t, D)``."""
_CHUNK = 1024  # gallery columns per similarity block: (B, 1024) float32


def bank_offsets(bank: np.ndarray, gallery: np.ndarray, beta: float) -> np.ndarray:
    """``offset(g) = logsumexp_b(β·cos(b, g)) / β`` of each gallery row against ``bank``: ``(G,)`` float64; zeros
    when ``β = 0`` or the bank is empty."""
    gallery = np.asarray(gallery, np.float32)
    out = np.zeros(len(gallery))
    if beta <= 0 or len(bank) == 0:
        return out
    bank = np.asarray(bank, np.float32)
    for lo in range(0, len(gallery), _CHUNK):
        sims = bank @ gallery[lo:lo + _CHUNK].T  # (B, chunk) float32
        top = sims.max(axis=0)  # shifted by the column's maximum: every exp is in (0, 1], the sum in [1, B]
        total = np.exp(np.float32(beta) * (sims - top)).sum(axis=0, dtype=np.float64)
        out[lo:lo + _CHUNK] = top + np.log(total) / beta
    return out


def with_offsets(gallery: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``[g, −offset(g)]``: ``(G, D)`` → ``(G, D + 1)`` float32, whose inner product with :func:`as_queries`'s rows
    is the normalised score."""
    return np.hstack([np.asarray(gallery, np.float32), -np.asarray(offsets, np.float32)[:, None]])


def as_queries(queries: np.ndarray, pad: float = 1.0) -> np.ndarray:
    """``[q, pad]``: ``(Q, D)`` → ``(Q, D + 1)`` float32; ``pad = 0`` scores :func:`with_offsets` rows by the plain
    inner product."""
    queries = np.asarray(queries, np.float32)
    return np.hstack([queries, np.full((len(queries), 1), pad, np.float32)])


@dataclass
class QueryBank:
    """The training queries of both directions, embedded by the retrieval model, and the ``β`` chosen for them.

    Attributes:
        images: ``(B_i, D)`` training image embeddings: the bank of a gallery of descriptions.
        texts: ``(B_t, D)`` training description embeddings: the bank of a gallery of images.
        beta: the inverted softmax's inverse temperature (0 = off).
    """

    images: np.ndarray
    texts: np.ndarray
    beta: float = 0.0

    @property
    def active(self) -> bool:
        return self.beta > 0

    def text_offsets(self, text_emb: np.ndarray) -> np.ndarray:
        """Offsets of a gallery of descriptions ``(G, D)`` (ranked for image queries): ``(G,)``."""
        return bank_offsets(self.images, text_emb, self.beta)

    def image_offsets(self, image_emb: np.ndarray) -> np.ndarray:
        """Offsets of a gallery of images ``(G, D)`` (ranked for description queries): ``(G,)``."""
        return bank_offsets(self.texts, image_emb, self.beta)

    def with_beta(self, beta: float) -> QueryBank:
        return QueryBank(self.images, self.texts, float(beta))


def member_mix(checkpoint: str | Path) -> float:
    """The WiSE-FT weight ``checkpoint`` ranks with now (1.0 without a frozen member)."""
    from kaleido_bert.model.itc_member import read_member_config

    member = read_member_config(checkpoint)
    return float(member["mix"]) if member is not None else 1.0


def save_bank_embeddings(checkpoint: str | Path, bank: QueryBank) -> None:
    """Write the banks' embeddings into ``checkpoint`` (:data:`BANK_WEIGHTS`, atomically); the choice that uses
    them is kept in the calibration record, written after them."""
    from safetensors.numpy import save_file

    with atomic_path(Path(checkpoint) / BANK_WEIGHTS) as tmp:
        save_file({"images": np.ascontiguousarray(bank.images, np.float32),
                   "texts": np.ascontiguousarray(bank.texts, np.float32)}, str(tmp))


def query_bank_choice(checkpoint: str | Path, config: RunConfig) -> dict[str, Any] | None:
    """The β choice in ``checkpoint``'s calibration record (``{"beta", "grid", "split", "mix", "dim", "images",
    "texts", "seconds"}``); None when the record has none or ``config`` asks for no β (``eval.query_bank_betas``
    empty).

    Raises:
        KaleidoError: a stale or malformed record, or a missing one where the config asks for a choice (one line).
    """
    from kaleido_bert.model.calibration import CALIBRATION_FILE, current_choice

    report = current_choice(checkpoint, config, "query_bank") if config.eval.query_bank_betas else None
    if report is None:
        return None
    try:
        beta = float(report["beta"])
        float(report["mix"]), int(report["dim"]), int(report["images"]), int(report["texts"])
    except (ValueError, KeyError, TypeError) as err:
        raise KaleidoError(f"{Path(checkpoint) / CALIBRATION_FILE}: query_bank lacks beta, mix, dim, images and "
                           f"texts ({err.__class__.__name__}): run `kaleido calibrate` again") from None
    if not np.isfinite(beta) or beta < 0:
        raise KaleidoError(f"{Path(checkpoint) / CALIBRATION_FILE}: beta must be a finite number ≥ 0, got "
                           f"{report['beta']!r}")
    return report


def load_query_bank(checkpoint: str | Path, config: RunConfig, encoder) -> QueryBank | None:
    """The bank kept in ``checkpoint`` for ``encoder`` (a :class:`~kaleido_bert.model.dual_encoder.DualEncoder` of
    that checkpoint): None when :func:`query_bank_choice` has none or ``β = 0`` was chosen.

    Raises:
        KaleidoError: an unreadable embeddings file, or one whose shapes disagree with the config or the encoder.
    """
    report = query_bank_choice(checkpoint, config)
    if report is None or float(report["beta"]) == 0:
        return None
    if int(report["dim"]) != int(encoder.dim):
        raise KaleidoError(f"{checkpoint}: banks of width {report['dim']}, but the model embeds in {encoder.dim}: "
                           f"run `kaleido calibrate` again")
    from safetensors.numpy import load_file

    path = Path(checkpoint) / BANK_WEIGHTS
    try:
        arrays = load_file(str(path))
        images, texts = arrays["images"], arrays["texts"]
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a missing or corrupt file
        raise KaleidoError(f"{path} is unreadable ({type(err).__name__}): run `kaleido calibrate` again") from None
    expected = ((int(report["images"]), int(report["dim"])), (int(report["texts"]), int(report["dim"])))
    if (images.shape, texts.shape) != expected:
        raise KaleidoError(f"{path}: embeddings {images.shape} and {texts.shape} disagree with the calibration "
                           f"record ({expected[0]} and {expected[1]}): run `kaleido calibrate` again")
    return QueryBank(images, texts, float(report["beta"]))
