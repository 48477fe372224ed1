"""Fitting the dual encoder's frozen member after pre-training and choosing its weight on validation (the `real` recipe, beyond the paper).

The member (:mod:`kaleido_bert.model.itc_member`) is the linear probe LP-FT started from, kept frozen: the text
initialisation (``model.init``) mean-pooled over the model's own WordPiece ids ``(N, S)``, and the mean clean colour
feature over the attended patches ``(N, F)``, standardised with training statistics, two linear maps to ``d``
trained with symmetric InfoNCE (:func:`~kaleido_bert.model.linear_probe.train_projection`, seeded by
``train.seed``), the standardisation folded into the maps (:func:`~kaleido_bert.model.linear_probe.fit_into`, as
``train.probe_init`` starts the ITC head). Each ``α`` of ``train.probe_mix`` is scored by
full-gallery mean recall (ITR and TIR averaged, no re-ranking) on the **validation** split with
:func:`~kaleido_bert.eval.retrieval.evaluate_gallery`; the best is kept (the first on a tie). With α = 1 the
checkpoint keeps the model alone and only the report is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kaleido_bert.config import RunConfig
from kaleido_bert.data.tokenizer import resolve_bert_dir
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.baseline import EmbeddingScorer
from kaleido_bert.eval.retrieval import evaluate_gallery
from kaleido_bert.inputs.sources import open_data
from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
from kaleido_bert.model.itc_member import ITCMember, ensemble, save_itc_member
from kaleido_bert.model.linear_probe import fit_into, image_features
from kaleido_bert.runs import resolve_checkpoint


def fit_itc_member(checkpoint: str | Path, config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Fit the frozen member of a pre-trained checkpoint, choose α on validation and save both into it.

    Returns:
        The report also written to ``itc_member.json``: ``mix`` (α kept), ``grid`` (validation mean recall per α),
        the probe's training losses, ``pairs`` and ``seconds``.

    Raises:
        KaleidoError: a checkpoint without an ITC head, a text initialisation whose vocabulary differs from the
            model's, or no training pairs with features.
    """
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(checkpoint)
    catalogue, store = open_data(config)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, member=False)
    if not encoder.has_itc:
        raise KaleidoError(f"train.probe_mix below 1 ensembles the ITC head with a frozen member, but checkpoint "
                           f"{checkpoint} has no ITC head: add itc to model.tasks or set train.probe_mix=[1.0]")
    bert_dir = resolve_bert_dir(config.model.init)
    from transformers import BertConfig

    sentence = BertConfig.from_pretrained(str(bert_dir)).to_dict()
    if sentence.get("vocab_size") != len(encoder.tokenizer):
        raise KaleidoError(f"the ITC member reads the model's WordPiece ids, but the text initialisation {bert_dir} "
                           f"has {sentence.get('vocab_size')} tokens and the tokenizer {len(encoder.tokenizer)}")
    member = ITCMember(sentence, store.feature_size, encoder.model_dim)
    member.load_sentence(bert_dir)
    encoder.member = member.to(encoder.device)

    items = [it for it in catalogue.items if it.id in store]
    train = [it for it in items if it.split == "train"]
    if len(train) < 2:
        raise KaleidoError("the ITC member is fitted on the training pairs: the catalogue has fewer than 2 train "
                           "items with features")
    descriptions = product_descriptions(items)
    pids = sorted({it.product_id for it in train})
    row = {p: j for j, p in enumerate(pids)}
    text = _sentence_features(encoder, member, [descriptions[p] for p in pids], progress)[[row[it.product_id]
                                                                                           for it in train]]
    keep = encoder.model.bert.patch_embeddings.keep.cpu().numpy().astype(bool)
    images = image_features(store, [it.id for it in train], "mean", keep=keep)
    _, history = fit_into(member.text, member.image, text, images, seed=config.train.seed)

    grid, mix = _choose_mix(encoder, catalogue, store, config.train.probe_mix, descriptions)
    member.mix.fill_(mix)
    report = {"mix": mix, "grid": grid, "selection": "validation full-gallery mean recall (ITR and TIR averaged)",
              "pairs": len(train), "text_model": str(bert_dir), "loss_before": history["loss_before"],
              "loss_after": history["loss_after"], "seed": config.train.seed,
              "seconds": round(time.perf_counter() - start, 1)}
    save_itc_member(checkpoint, member if mix < 1 else None, report)
    if progress:
        scores = ", ".join("{mix}: {mean_recall:.1f}".format(**g) for g in grid) or "no validation split"
        print(f"[pretrain] ITC member (WiSE-FT): α = {mix} chosen on validation mean recall ({scores}), "
              f"{report['seconds']} s", flush=True)
    return report


def _sentence_features(encoder: DualEncoder, member: ITCMember, texts: list[str], progress: bool) -> np.ndarray:
    """The member's raw text features of ``texts``: ``(N, S)`` float32."""
    parts = [np.empty((0, member.sentence.config.hidden_size), np.float32)]
    for lo in tqdm(range(0, len(texts), encoder.batch_size), desc="ITC member: text", unit="batch",
                   disable=not progress, leave=False):
        ids, mask = encoder.tokenize(texts[lo:lo + encoder.batch_size])
        parts.append(member.sentence_features(ids, mask).float().cpu().numpy())
    return np.concatenate(parts)


def _choose_mix(encoder: DualEncoder, catalogue, store, mixes: list[float], descriptions: dict[str, str]
                ) -> tuple[list[dict[str, float]], float]:
    """Validation mean recall of each α (in the order given) and the best α (the first on a tie; the first α
    without a validation split)."""
    val = [it for it in catalogue.items if it.split == "val" and it.id in store]
    if not val:
        return [], float(mixes[0])
    pids = sorted({it.product_id for it in val})
    ids = [it.id for it in val]
    text_fine, text_member = encoder.text_parts([descriptions[p] for p in pids])
    image_fine, image_member = encoder.patch_parts(*store_patches(store, ids))
    grid = []
    for mix in mixes:
        scorer = EmbeddingScorer(dict(zip(ids, ensemble(image_fine, image_member, mix), strict=True)),
                                 dict(zip(pids, ensemble(text_fine, text_member, mix), strict=True)))
        found = evaluate_gallery(scorer, catalogue, set(ids), split="val", rerank_k=0, progress=False)["metrics"]
        grid.append({"mix": float(mix), "mean_recall": (found["itr_gallery/mean_recall"]  # in %
                                                        + found["tir_gallery/mean_recall"]) / 2})
    best = max(range(len(grid)), key=lambda j: (grid[j]["mean_recall"], -j))
    return grid, grid[best]["mix"]
