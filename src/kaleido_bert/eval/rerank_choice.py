"""Whether a retrieval checkpoint re-ranks with its cross-encoder, chosen on validation (beyond the paper).

Kaleido-BERT's cross-encoder (ITM, §3.5) is worth its cost only where it ranks better than the dual encoder it
re-ranks. After pre-training (and the frozen member's α), the validation split is searched both ways, as the test
split is in :func:`~kaleido_bert.eval.retrieval.evaluate_gallery`: the dual encoder alone, and its top
``eval.rerank_k`` re-scored by ``eval.pair_score``. The choice is the mean of ITR and TIR full-gallery mean recall:
re-rank only when it is higher. ``kaleido calibrate`` keeps it in the checkpoint's record
(:mod:`kaleido_bert.model.calibration`, ``{"rerank": bool, "rerank_k", "pair_score", "validation":
{"dual_encoder": %, "reranked": %}, ...}``), which :class:`~kaleido_bert.model.dual_encoder.DualEncoder` reads
(``encoder.rerank``), so the search service, the pipeline and the report use the same choice. A checkpoint without
the choice (or without a validation split) re-ranks, as the paper's models do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido_bert.config import RunConfig

if TYPE_CHECKING:
    from kaleido_bert.data.catalogue import Catalogue
    from kaleido_bert.patches.store import FeatureStore


def choose_rerank(checkpoint: str | Path, config: RunConfig, *, progress: bool = True,
                  data: tuple[Catalogue, FeatureStore] | None = None) -> dict[str, Any] | None:
    """Score validation search of ``checkpoint`` with and without re-ranking.

    Returns:
        The choice (see the module docstring), or None when the model has no ITM head or ITC projections,
        ``eval.rerank_k`` is 0, or the catalogue has no validation items with features.
    """
    from kaleido_bert.eval.retrieval import PairScorer, evaluate_gallery
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size)
    catalogue, store = data or open_data(config)
    val = {it.id for it in catalogue.split("val") if it.id in store}
    if not (encoder.has_itm and encoder.has_itc and config.eval.rerank_k > 0 and val):
        return None
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items), pair_score=config.eval.pair_score)
    found = evaluate_gallery(scorer, catalogue, val, split="val", rerank_k=config.eval.rerank_k,
                             progress=progress)["metrics"]
    plain = (found["itr_gallery/mean_recall"] + found["tir_gallery/mean_recall"]) / 2
    reranked = (found["itr_gallery_rerank/mean_recall"] + found["tir_gallery_rerank/mean_recall"]) / 2
    choice = {"rerank": bool(reranked > plain), "rerank_k": int(config.eval.rerank_k),
              "pair_score": config.eval.pair_score,
              "selection": "validation full-gallery mean recall (ITR and TIR averaged), re-ranked vs dual encoder",
              "validation": {"dual_encoder": round(plain, 3), "reranked": round(reranked, 3),
                             **{k: round(v, 3) for k, v in found.items() if k.endswith("mean_recall")}},
              "seconds": round(time.perf_counter() - start, 1)}
    if progress:
        verdict = "re-ranks" if choice["rerank"] else "ranks by the dual encoder alone"
        print(f"[calibrate] cross-encoder: validation mean recall {plain:.1f} (dual encoder) vs {reranked:.1f} "
              f"(top {config.eval.rerank_k} re-ranked by {config.eval.pair_score}): the model {verdict}", flush=True)
    return choice
