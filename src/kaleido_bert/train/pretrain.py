"""Pre-training Kaleido-BERT (paper §3.5–3.6): catalogue + feature store + alignments → the seven tasks.

:func:`pretrain` wires the pieces and hands them to the one training loop (:func:`kaleido_bert.train.loop.train`):
the catalogue's ``train`` and ``val`` splits become :class:`~kaleido_bert.inputs.pretraining.PretrainDataset`\\ s (masking
guided by the alignments when given), the model is :class:`~kaleido_bert.model.heads.KaleidoBertForPreTraining`
(initialised from a BERT checkpoint when ``model.init`` is set), and :func:`~kaleido_bert.model.heads.pretraining_loss_counts` tells the loop how
many units (masked tokens, masked patches, pairs) each task's loss averages over, so that losses are exact
global-batch means under gradient accumulation and DDP.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_write_json
from kaleido_bert.checkpoint import load_bert_weights
from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.pretraining import PretrainDataset, collate
from kaleido_bert.model.encoder import KaleidoBertConfig, masked_mean
from kaleido_bert.model.heads import KaleidoBertForPreTraining, pretraining_loss_counts
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.train.loop import train


def pretraining_model_config(config: RunConfig) -> KaleidoBertConfig:
    """The model's ``config.json``: the ``model`` section plus the heads' training settings, which the checkpoint
    keeps so that ``from_pretrained`` restores them (``masking.itm_negatives``)."""
    return KaleidoBertConfig.from_model_config(config.model, itm_negatives=config.masking.itm_negatives)


def build_model(config: RunConfig) -> tuple[KaleidoBertForPreTraining, dict[str, list[str]] | None]:
    """The pre-training model, seeded by ``train.seed``, with BERT weights when ``model.init`` is set.

    Returns:
        The model and :func:`~kaleido_bert.checkpoint.load_bert_weights`'s report (None for random init).
    """
    torch.manual_seed(config.train.seed)
    model = KaleidoBertForPreTraining(pretraining_model_config(config))
    report = load_bert_weights(model.bert, config.model.init) if config.model.init else None
    return model, report


def new_parameters(model: KaleidoBertForPreTraining, init_report: dict[str, list[str]] | None,
                   config: RunConfig) -> set[str]:
    """Names of the parameters that learn at ``train.new_lr_scale`` × the lr: with ``model.init``, those the
    checkpoint did not provide (:func:`~kaleido_bert.checkpoint.load_bert_weights`' ``loaded``), except the ITC
    head when ``train.probe_init`` starts it from the probe; none without an initialisation."""
    if init_report is None:
        return set()
    loaded = {f"bert.{name}" for name in init_report["loaded"]}
    probed = ("heads.itc.",) if config.train.probe_init else ()
    return {name for name, _ in model.named_parameters()
            if name not in loaded and not (probed and name.startswith(probed))}


def build_datasets(config: RunConfig, tokenizer: Any) -> tuple[PretrainDataset, PretrainDataset]:
    """Train and val :class:`PretrainDataset` from ``data.catalogue``, ``data.features``, ``data.alignments``.

    Raises:
        KaleidoError: an unset or missing catalogue or store, a store built with another feature size or from
            another catalogue (or another version of it).
    """
    data = config.data
    if not data.catalogue or not data.features:
        raise KaleidoError("pretrain needs data.catalogue and data.features: build them with "
                           "`kaleido data synth` (or an importer) and `kaleido patches`, then pass "
                           "--set data.catalogue=DIR --set data.features=STORE")
    catalogue = load_catalogue(data.catalogue)
    store = FeatureStore(data.features, expect={"feature_size": config.model.patch_feature_size})
    store.require_catalogue(catalogue)
    alignments = None
    if data.alignments:
        from kaleido_bert.align.alignment import load_alignments

        alignments = load_alignments(data.alignments, max_text_len=config.model.max_text_len)
    make = partial(PretrainDataset, catalogue, store, tokenizer, alignments=alignments,
                   masking=config.masking, max_text_len=config.model.max_text_len, seed=config.train.seed)
    return make(split="train"), make(split="val")


def pretrain(config: RunConfig, out_dir: str | Path, *, resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Pre-train on a catalogue's feature store; write checkpoints, ``run.yaml``, metrics and loss curves.

    Args:
        config: the run config (``data.catalogue`` and ``data.features`` must be set).
        out_dir: output directory (checkpoints ``step-XXXXXX/``, ``metrics.csv``, ``loss_curves.png``,
            ``data_counts.json``, ``summary.json``).
        resume: continue exactly from the latest checkpoint in ``out_dir``.
        progress: progress bar and log lines.

    Returns:
        The training summary (final/best validation losses per task, steps, seconds, pairs/s) plus the
        dataset counts and the BERT-initialisation report.

    Raises:
        KaleidoError: bad data paths, a store from another feature size, a tokenizer whose vocabulary size
            differs from ``model.vocab_size``, and everything :func:`~kaleido_bert.train.loop.train` refuses.
    """
    out_dir = Path(out_dir)
    if not config.model.tasks:
        raise KaleidoError("model.tasks is empty: pre-training needs at least one task (e.g. ['mlm', 'itm'])")
    tokenizer = load_tokenizer(config.data.tokenizer)
    if len(tokenizer) != config.model.vocab_size:
        raise KaleidoError(f"the tokenizer has {len(tokenizer)} tokens but "
                           f"model.vocab_size={config.model.vocab_size}: set model.vocab_size to match, or "
                           "point data.tokenizer at the vocabulary the model uses")
    train_set, val_set = build_datasets(config, tokenizer)
    config = config.with_train_items(len(train_set))  # train.epochs → train.max_steps
    counts = {"train": train_set.counts(), "val": val_set.counts()}
    model, init_report = build_model(config)
    mined = model.config.itm_negatives == "mined" and "itm" in config.model.tasks
    inputs = probe_inputs(model, train_set, config, progress=progress) if config.train.probe_init or mined else None
    probe = shortlists = None
    if config.train.probe_init and not resume:  # a resumed run loads its own weights
        probe = probe_init(model, train_set, config, inputs=inputs, progress=progress)
    if mined:
        shortlists = set_itm_shortlists(model, train_set, val_set, config, inputs, progress=progress)
    # Every process of a DDP run writes the same bytes atomically, so no rank has to be singled out here.
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "data_counts.json", counts)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    summary = train(model, train_set, val_set, collate_fn, config, out_dir, resume=resume,
                    tokenizer=tokenizer, progress=progress, loss_counts=pretraining_loss_counts,
                    new_parameters=new_parameters(model, init_report, config))
    summary["data_counts"] = counts
    if init_report is not None:
        summary["init"] = {k: len(v) for k, v in init_report.items()}
    if probe is not None:
        summary["probe_init"] = probe
    if shortlists is not None:
        summary["itm_shortlists"] = shortlists
    if dist.is_main():
        atomic_write_json(out_dir / "summary.json", summary)  # the loop's summary with what pre-training added
    return summary


def set_itm_shortlists(model: KaleidoBertForPreTraining, train_set: PretrainDataset, val_set: PretrainDataset,
                       config: RunConfig, train_inputs: tuple[Any, Any], *,
                       progress: bool = True) -> dict[str, dict[str, float]]:
    """Give both splits' datasets the probe shortlists and ITC logits their ITM pairs are drawn and scored with
    (:mod:`kaleido_bert.train.shortlists`), ``eval.rerank_k`` deep (at least 1): what search hands the
    cross-encoder. The training split's come from probes cross-fitted over product folds, the validation split's
    from the probe of every training pair. Returns their reports."""
    from kaleido_bert.train.shortlists import probe_shortlists

    k, seed = max(1, config.eval.rerank_k), config.train.seed
    reports = {}
    found = probe_shortlists(train_inputs, train_set.item_product, k, seed=seed)
    train_set.set_shortlists(found)
    reports["train"] = found.report
    if len(val_set):
        found = probe_shortlists(train_inputs, train_set.item_product, k, seed=seed,
                                 apply_to=(probe_inputs(model, val_set, config, progress=False), val_set.item_product))
        val_set.set_shortlists(found)
        reports["val"] = found.report
    if progress:
        for split, r in reports.items():
            print(f"[pretrain] ITM pairs from the probe's top {r['k']} on {split} ({r['fit']}): {r['images']} images × "
                  f"{r['descriptions']} descriptions, the positive's mean rank {r['positive_mean_rank']} "
                  f"({r['seconds']} s)", flush=True)
    return reports


def probe_inputs(model: KaleidoBertForPreTraining, dataset: PretrainDataset, config: RunConfig, *,
                 progress: bool = True) -> tuple[Any, Any]:
    """What the linear probe reads for a split: each product's text ``(products, D)`` (the model's own text-only
    pass, its initialisation such as MiniLM, mean-pooled over real tokens) and each image's mean clean colour
    feature over the attended patches ``(N, F)``, both numpy float32."""
    import numpy as np
    from tqdm import tqdm

    from kaleido_bert.model.linear_probe import image_features

    was_training = model.training
    model.eval()
    tokens, lengths, size = dataset.tokens, torch.from_numpy(dataset.lengths), config.eval.batch_size
    parts = []
    for lo in tqdm(range(0, len(tokens), size), desc="probe: text states", unit="batch", disable=not progress,
                   leave=False):
        width = int(lengths[lo:lo + size].max())
        mask = (torch.arange(width)[None] < lengths[lo:lo + size, None]).long()
        with torch.no_grad():  # the pooling ContrastiveHead.text_embedding reads
            hidden = model.bert(text_ids=tokens[lo:lo + size, :width], text_mask=mask).hidden  # (B, T, D)
        parts.append(masked_mean(hidden, mask[..., None]).float().numpy())
    model.train(was_training)
    keep = model.bert.patch_embeddings.keep.numpy().astype(bool)
    images = image_features(dataset.store, [it.id for it in dataset.items], "mean", keep=keep)
    return np.concatenate(parts), images


def probe_init(model: KaleidoBertForPreTraining, train_set: PretrainDataset, config: RunConfig, *,
               inputs: tuple[Any, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit the linear probe on the training pairs and start the ITC head from it (``train.probe_init``).

    ``inputs``: the training split's :func:`probe_inputs`, when already computed.

    Raises:
        KaleidoError: ITC is off, or its pooling is not ``mean``.
    """
    from kaleido_bert.model.linear_probe import init_itc_from_probe

    if not hasattr(model.heads, "itc") or model.config.itc_pool != "mean":
        raise KaleidoError("train.probe_init starts the ITC head from a linear probe: it needs itc in model.tasks "
                           "and model.itc_pool=mean")
    start = time.perf_counter()
    text, images = inputs or probe_inputs(model, train_set, config, progress=progress)
    report = init_itc_from_probe(model.heads.itc, text[train_set.item_product], images, seed=config.train.seed)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[pretrain] ITC started from the linear probe: InfoNCE {report['loss_before']:.3f} → "
          f"{report['loss_after']:.3f} on {report['pairs']} training pairs ({report['seconds']} s)", flush=True)
    return report
