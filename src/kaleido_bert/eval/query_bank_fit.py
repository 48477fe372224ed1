"""Fitting the query bank of full-gallery search (beyond the paper; the inverted softmax of
:mod:`kaleido_bert.eval.query_bank`): embed the training banks with the retrieval model and choose ``β`` on the
validation split's full-gallery mean recall (ITR and TIR averaged, the first ``β`` on a tie); ``kaleido calibrate``
keeps the banks' embeddings in the checkpoint and the choice in its calibration record.

Shapes: banks ``(B_i, D)`` training images and ``(B_t, D)`` training product descriptions; validation galleries are
embedded once and ranked at every ``β``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.query_bank import QueryBank, member_mix, save_bank_embeddings
from kaleido_bert.eval.retrieval import PairScorer, evaluate_gallery

if TYPE_CHECKING:
    from kaleido_bert.config import RunConfig
    from kaleido_bert.data.catalogue import Catalogue
    from kaleido_bert.patches.store import FeatureStore


def embed_bank(scorer: PairScorer, catalogue: Catalogue, available: set[str], *, progress: bool) -> QueryBank:
    """The training split's images and product descriptions embedded by ``scorer`` (a
    :class:`~kaleido_bert.eval.retrieval.PairScorer`), with ``β = 0``."""
    train = [it for it in catalogue.split("train") if it.id in available]
    pids = sorted({it.product_id for it in train})
    return QueryBank(scorer.embed_images([it.id for it in train], progress=progress),
                     scorer.embed_texts(pids, progress=progress))


def choose_query_bank(checkpoint: str | Path, config: RunConfig, *, progress: bool,
                      data: tuple[Catalogue, FeatureStore] | None = None) -> dict[str, Any]:
    """Embed the training banks with the retrieval model of ``checkpoint`` (written into it,
    :data:`~kaleido_bert.eval.query_bank.BANK_WEIGHTS`) and choose ``β`` among ``eval.query_bank_betas`` on
    validation full-gallery mean recall.

    Returns:
        The choice: ``beta``, ``grid`` (``[{"beta", "mean_recall"}]``, in %), the member's weight ``mix``, the
        banks' width ``dim`` and sizes, and ``seconds``. Without validation items the grid is empty and ``β = 0``.

    Raises:
        KaleidoError: the checkpoint has no ITC head (no dual encoder to normalise).
    """
    from kaleido_bert import distributed as dist
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    catalogue, store = data or open_data(config)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, device=dist.device())
    if not encoder.has_itc:
        raise KaleidoError(f"eval.query_bank_betas normalises the dual encoder's gallery scores, but checkpoint "
                           f"{checkpoint} has no ITC head: add itc to model.tasks or set eval.query_bank_betas=[]")
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items))
    available = set(store.available_ids())
    bank = embed_bank(scorer, catalogue, available, progress=progress)
    grid, beta = choose_beta(scorer, catalogue, available, bank, config.eval.query_bank_betas)
    report = {"beta": beta, "grid": grid, "split": "val",
              "selection": "validation full-gallery mean recall (ITR and TIR averaged, no re-ranking)",
              "mix": member_mix(checkpoint), "dim": int(encoder.dim), "images": len(bank.images), "texts": len(bank.texts),
              "seconds": round(time.perf_counter() - start, 1)}
    save_bank_embeddings(checkpoint, bank)
    return report


def choose_beta(scorer: PairScorer, catalogue: Catalogue, available: set[str], bank: QueryBank, betas: list[float]
                ) -> tuple[list[dict[str, float]], float]:
    """Validation full-gallery mean recall (ITR and TIR averaged, no re-ranking, in %) of ``scorer`` with ``bank``
    at each β (the validation split embedded once), and the best β (the first on a tie; 0 without validation
    items, when the grid is empty)."""
    val = {it.id for it in catalogue.split("val") if it.id in available}
    grid: list[dict[str, float]] = []
    cache: dict[str, Any] = {}  # the validation embeddings, computed once for every β
    for beta in betas if val else []:
        found = evaluate_gallery(scorer, catalogue, val, split="val", rerank_k=0, progress=False,
                                 bank=bank.with_beta(beta), cache=cache)["metrics"]
        grid.append({"beta": float(beta), "mean_recall": (found["itr_gallery/mean_recall"]
                                                          + found["tir_gallery/mean_recall"]) / 2})
    best = max(range(len(grid)), key=lambda j: (grid[j]["mean_recall"], -j)) if grid else None
    return grid, grid[best]["beta"] if best is not None else 0.0
