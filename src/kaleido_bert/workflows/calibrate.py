"""``kaleido calibrate RUN``: every choice made on validation after training, for the models of a run that rank
(beyond the paper; the record is :mod:`kaleido_bert.model.calibration`).

For the pre-trained model: whether its cross-encoder re-ranks (:mod:`kaleido_bert.eval.rerank_choice`; a
retrieval fine-tune's cross-encoder re-ranks, as the paper's). For the model that searches the full gallery (the
retrieval model, else the pre-trained one): the query bank's β among ``eval.query_bank_betas`` (:mod:`kaleido_bert.eval.query_bank_fit`)
and the caption k among ``eval.caption_retrieval_grid`` (:mod:`kaleido_bert.eval.caption_retrieval`; needs Java
for METEOR, else left to ``eval.caption_retrieval_k``). Each checkpoint gets one record; ``kaleido evaluate``,
``kaleido index`` and ``kaleido serve`` only read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kaleido_bert.config import RunConfig
from kaleido_bert.model.calibration import CHOICES, fingerprint, read_calibration, write_calibration
from kaleido_bert.runs import run_parts


def calibrate_run(run: str | Path, config: RunConfig, *, progress: bool = True, redo: bool = True
                  ) -> dict[str, dict[str, Any]]:
    """Make the validation choices of ``run``'s ranking models and write each checkpoint's record.

    Args:
        run: a run directory or a pre-training checkpoint.
        config: the run config whose catalogue, store and ``eval`` settings the choices are made with.
        redo: False keeps a checkpoint's record when it is current (made for these weights and settings).

    Returns:
        Part name (``pretrain``, ``retrieval``) → the record written or kept.
    """
    from kaleido_bert.eval.caption_metrics import JAVA_HINT
    from kaleido_bert.inputs.sources import open_data

    parts = run_parts(run)
    searched = parts.get("retrieval", parts["pretrain"])
    ranking = {"pretrain": parts["pretrain"], **({"retrieval": searched} if "retrieval" in parts else {})}
    data = None
    records: dict[str, dict[str, Any]] = {}
    for name, checkpoint in ranking.items():
        kept = read_calibration(checkpoint) if not redo else None
        if kept is not None and kept["fingerprint"] == fingerprint(checkpoint, config):
            records[name] = kept
            continue
        data = data or open_data(config)
        choices = {"rerank": _rerank(checkpoint, config, progress=progress, data=data) if name == "pretrain" else None}
        if checkpoint == searched:
            choices["query_bank"] = _query_bank(checkpoint, config, progress=progress, data=data)
            if config.eval.caption_retrieval_grid and shutil.which("java") is None:
                print(f"[calibrate] caption k: {JAVA_HINT}; captions by retrieval use eval.caption_retrieval_k",
                      flush=True)
            else:
                choices["caption_k"] = _caption_k(checkpoint, config, progress=progress, data=data)
        catalogue, store = data
        facts = {"catalogue": str(catalogue.root), "features": str(store.root), "split": "val",
                 "items": sum(it.id in store for it in catalogue.split("val"))}
        records[name] = write_calibration(checkpoint, config, choices, facts)
        chosen = ", ".join(f"{key} {_summary(key, records[name][key])}" for key in CHOICES)
        print(f"[calibrate] {name}: {chosen}", flush=True)
    return records


def _rerank(checkpoint: Path, config: RunConfig, *, progress: bool, data) -> dict[str, Any] | None:
    from kaleido_bert.eval.rerank_choice import choose_rerank

    return choose_rerank(checkpoint, config, progress=progress, data=data)


def _query_bank(checkpoint: Path, config: RunConfig, *, progress: bool, data) -> dict[str, Any] | None:
    from kaleido_bert.eval.query_bank_fit import choose_query_bank

    return choose_query_bank(checkpoint, config, progress=progress, data=data) if config.eval.query_bank_betas \
        else None


def _caption_k(checkpoint: Path, config: RunConfig, *, progress: bool, data) -> dict[str, Any] | None:
    if not config.eval.caption_retrieval_grid:
        return None
    from kaleido_bert.eval.caption_metrics import CaptionScorer
    from kaleido_bert.eval.caption_retrieval import choose_caption_k

    with CaptionScorer() as scorer:
        return choose_caption_k(checkpoint, config, scorer=scorer, progress=progress, data=data)


def _summary(name: str, choice: dict[str, Any] | None) -> str:
    """One word or number for a choice of the record."""
    if choice is None:
        return "-"
    if name == "rerank":
        return "yes" if choice["rerank"] else "no"
    return f"{choice['beta']:g}" if name == "query_bank" else str(choice["k"])
