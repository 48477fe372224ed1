"""Fine-tuning a pre-trained Kaleido-BERT on the downstream tasks (paper §4.2; ``kaleido finetune``).

=============  ==========================================  =================================================
task           model                                       data
=============  ==========================================  =================================================
category       :class:`~kaleido_bert.model.classification.KaleidoBertForClassification`   one image (+ its description)
subcategory    same, over the sub-category label map       same
caption        :class:`~kaleido_bert.model.captioning.KaleidoBertForCaptioning`       image → description (image only)
retrieval      :class:`~kaleido_bert.model.heads.KaleidoBertForPreTraining` with ITM + ITC only   clean matching pairs
=============  ==========================================  =================================================

Each starts from a pre-training checkpoint (the ``bert.*`` weights; the caption LM head from the MLM head; the
retrieval heads from ITM/ITC when present), trains with the one loop of :mod:`kaleido_bert.train.loop` under the
``finetune`` section (lr 2e-5 by default, as the released scripts), and writes the same checkpoint layout as
pre-training, so every run resumes. The paper evaluates retrieval without fine-tuning; ``retrieval`` is our
addition for full-gallery search (beyond the paper).

Classifiers read ``finetune.head`` (``pooled``, the released code, or ``wide``: see
:mod:`kaleido_bert.model.classification`; with ``finetune.sentence`` the wide head also reads the frozen sentence
embedding of the text initialisation) and, with ``finetune.probe``, start from a linear probe of the frozen
encoder (LP-FT, Kumar et al. 2022; :mod:`kaleido_bert.train.probe`; its C chosen on validation among
``finetune.probe_c``), fitted once per run and recorded in ``probe.json`` and the summary's ``probe``; after the
fine-tune the probe start is kept instead when it scores higher on validation (:func:`keep_the_better`, the
summary's ``kept``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_write_json, read_json
from kaleido_bert.checkpoint import check_model_config, read_model_config
from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import LABEL_FIELDS
from kaleido_bert.data.tokenizer import load_tokenizer, resolve_bert_dir
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.pretraining import PretrainDataset, collate
from kaleido_bert.inputs.sources import open_data
from kaleido_bert.model.loading import load_pretrained
from kaleido_bert.runs import (
    FINETUNE_TASKS,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    part_name,
    resolve_checkpoint,
)
from kaleido_bert.train.loop import train
from kaleido_bert.train.probe import validation_scores

TASKS = FINETUNE_TASKS
RETRIEVAL_TASKS = ["itm", "itc"]
PROBE_RECORD = "probe.json"
"""The linear probe's record in a classifier's run directory (``finetune.probe``): accuracies and seconds."""


def finetune_config(config: RunConfig, task: str) -> RunConfig:
    """The run config with ``train`` taken from ``finetune`` (and the retrieval model's task list)."""
    f = config.finetune
    caption = task == "caption"
    steps = (f.caption_max_steps or f.max_steps) if caption else f.max_steps
    values = {"train.lr": (f.caption_lr or f.lr) if caption else f.lr, "train.max_steps": steps,
              "train.batch_size": f.batch_size, "train.warmup_ratio": f.warmup_ratio,
              "train.eval_every": f.eval_every, "train.save_every": steps}
    if task == "retrieval":
        values["model.tasks"] = list(RETRIEVAL_TASKS)
    return config.with_overrides(values)


def class_weights(labels: list[int], num_labels: int, kind: str) -> torch.Tensor:
    """Per-class loss weights ``(C,)``: ``balanced`` = n / (C_seen · n_c), ``sqrt`` = its square root, normalised
    to mean 1 over the training items; classes absent from training get weight 0 (they never appear as labels)."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_labels).double()
    seen = counts > 0
    weights = torch.zeros(num_labels, dtype=torch.float64)
    weights[seen] = counts.sum() / (int(seen.sum()) * counts[seen])
    if kind == "sqrt":
        weights = weights.sqrt()
    weights *= counts.sum() / (weights * counts).sum()
    return weights.float()


def build_task(task: str, config: RunConfig, checkpoint: Path, tokenizer, *, image_only: bool = False
               ) -> tuple[Any, Any, Any, Any, Any]:
    """Model, train set, val set, collate function and loss-count function of one task."""
    catalogue, store = open_data(config)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    max_len = config.model.max_text_len
    if task in LABEL_FIELDS:
        from kaleido_bert.data.catalogue import label_map
        from kaleido_bert.inputs.downstream import ClassificationDataset
        from kaleido_bert.model.classification import KaleidoBertForClassification

        label2id = label_map(catalogue.labels, task)
        head = {"classifier_head": "wide"} if config.finetune.head == "wide" else {}  # pooled: config.json as ever
        if config.finetune.frozen_member:
            head["classifier_frozen_member"] = True
        # the frozen text initialisation (kept in config.json to rebuild it); an image-only input has no text
        sentence_dir = resolve_bert_dir(config.model.init) if config.finetune.sentence and not image_only else None
        if sentence_dir is not None:
            from transformers import BertConfig

            head["classifier_sentence"] = BertConfig.from_pretrained(str(sentence_dir)).to_dict()
        make = partial(ClassificationDataset, catalogue, store, tokenizer, field=task, label2id=label2id,
                       image_only=image_only, max_text_len=max_len)
        train_set = make(split="train")
        weighting = config.finetune.class_weights_for(task)
        if weighting != "none":  # the loss weights go into config.json, so the saved classifier keeps them
            head["classifier_class_weights"] = class_weights([label2id[getattr(it, task)] for it in train_set.items],
                                                             len(label2id), weighting).tolist()
        model = load_pretrained(KaleidoBertForClassification, checkpoint, num_labels=len(label2id),
                                label2id=label2id, id2label={i: n for n, i in label2id.items()}, label_field=task,
                                classifier_input="image" if image_only else "image+text", **head)
        if sentence_dir is not None:
            model.load_sentence(sentence_dir)
        return model, train_set, make(split="val"), collate_fn, None
    if task == "caption":
        from kaleido_bert.inputs.downstream import CaptionDataset
        from kaleido_bert.model.captioning import KaleidoBertForCaptioning, caption_loss_counts

        model = KaleidoBertForCaptioning.from_pretraining(
            checkpoint, caption_objectives=list(config.finetune.caption_objectives),
            mask_token_id=tokenizer.mask_token_id)
        make = partial(CaptionDataset, catalogue, store, tokenizer, max_text_len=max_len)
        return model, make(split="train"), make(split="val"), collate_fn, caption_loss_counts
    if task == "retrieval":
        from kaleido_bert.model.heads import KaleidoBertForPreTraining, pretraining_loss_counts

        # the heads' settings through config.json: the run's ITM negatives
        model = load_pretrained(KaleidoBertForPreTraining, checkpoint, tasks=list(RETRIEVAL_TASKS),
                                itm_negatives=config.masking.itm_negatives)
        make = partial(PretrainDataset, catalogue, store, tokenizer, masking=config.masking, max_text_len=max_len,
                       seed=config.train.seed, corrupt=False)
        return model, make(split="train"), make(split="val"), collate_fn, pretraining_loss_counts
    raise KaleidoError(f"unknown fine-tuning task {task!r}: choose one of {', '.join(TASKS)}")


def finetune(task: str, config: RunConfig, checkpoint: str | Path, out_dir: str | Path, *,
             image_only: bool = False, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``task`` from a pre-training checkpoint (or run directory) into ``out_dir``.

    Args:
        task: ``category``, ``subcategory``, ``caption`` or ``retrieval``.
        config: the run config (``data`` names the catalogue and store, ``finetune`` the optimisation).
        checkpoint: a checkpoint directory or a run directory (its ``latest``).
        out_dir: checkpoints, metrics, loss curves (the layout of pre-training).
        image_only: classification from the image alone (a lone ``[CLS]``), not image + description.
        resume: continue from the latest checkpoint in ``out_dir``.

    Raises:
        KaleidoError: an unknown task, a checkpoint from another model config, missing data, labels unknown to
            the label map, and whatever the training loop refuses.
    """
    if task not in TASKS:
        raise KaleidoError(f"unknown fine-tuning task {task!r}: choose one of {', '.join(TASKS)}")
    if image_only and task not in LABEL_FIELDS:
        raise KaleidoError("--image-only applies to category and subcategory")
    checkpoint = resolve_checkpoint(checkpoint)
    pretrained_tasks = _checkpoint_tasks(checkpoint)
    check_model_config(checkpoint, dataclasses.replace(config.model, tasks=pretrained_tasks))
    tokenizer = load_tokenizer(checkpoint)
    model, train_set, val_set, collate_fn, counts = build_task(task, finetune_config(config, task), checkpoint,
                                                               tokenizer, image_only=image_only)
    run = finetune_config(config.with_train_items(len(train_set)), task)  # finetune.epochs → steps
    if task != "retrieval":  # the resume check compares the model section with config.json
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, tasks=pretrained_tasks))
    probe = None
    if task in LABEL_FIELDS and resume:
        _check_head(Path(out_dir), config.finetune.head)
    start = None
    if task in LABEL_FIELDS and config.finetune.probe:
        fresh = not (resume or list_checkpoints(out_dir))  # the loop refuses an out_dir with checkpoints
        probe = probe_head(model, train_set, val_set, collate_fn, config, Path(out_dir), fresh=fresh,
                           progress=progress)
        if fresh and val_set is not None and len(val_set):  # the probe start, to keep if fine-tuning loses to it
            start = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                     validation_scores(model, val_set, collate_fn, batch_size=config.eval.batch_size,
                                       device=dist.device(), num_workers=config.data.num_workers))
    summary = train(model, train_set, val_set, collate_fn, run, out_dir, resume=resume, tokenizer=tokenizer,
                    progress=progress, loss_counts=counts, part=part_name(task, image_only))
    summary.update(task=task, input="image" if image_only else "image+text", init=str(checkpoint))
    if probe is not None:
        summary["probe"] = probe
    if start is not None:
        summary["kept"] = keep_the_better(model, *start, val_set, collate_fn, run, Path(out_dir), tokenizer)
        if dist.is_main():
            atomic_write_json(Path(out_dir) / "summary.json", summary)
    return summary


def keep_the_better(model, start_state: dict[str, torch.Tensor], start_scores: dict[str, float], val_set,
                    collate_fn, run: RunConfig, out_dir: Path, tokenizer) -> dict[str, Any]:
    """LP-FT, fine-tuned only where validation says it helps: the fine-tuned classifier's validation accuracy +
    macro-F1 against its probe start's; when the start scores higher, its weights replace the final
    checkpoint's (atomically; the fine-tuned ones are discarded). On a tie the fine-tuned model is kept.

    Returns:
        ``{"kept": "fine-tuned" | "probe start", "probe_start": scores, "fine_tuned": scores}``.
    """
    from kaleido_bert.checkpoint import TRAIN_STATE, save_checkpoint

    tuned = validation_scores(model, val_set, collate_fn, batch_size=run.eval.batch_size, device=dist.device(),
                              num_workers=run.data.num_workers)
    kept = "fine-tuned" if tuned["score"] >= start_scores["score"] else "probe start"
    if kept == "probe start":
        model.load_state_dict(start_state)
        if dist.is_main():
            final = latest_checkpoint(out_dir)
            state = torch.load(final / TRAIN_STATE, map_location="cpu", weights_only=False)
            save_checkpoint(out_dir, checkpoint_step(final), model=model, run_config=run, train_state=state,
                            tokenizer=tokenizer, keep_last=run.train.keep_last)
        dist.barrier()
    return {"kept": kept, "probe_start": start_scores, "fine_tuned": tuned,
            "selection": "validation accuracy + macro-F1, the fine-tuned model on a tie"}


def probe_head(model, train_set, val_set, collate_fn, config: RunConfig, out_dir: Path, *, fresh: bool,
               progress: bool = True) -> dict[str, Any] | None:
    """LP-FT's linear probe of a classifier's head (``finetune.probe``), fitted once per run into ``out_dir``.

    A ``fresh`` run fits it (:func:`kaleido_bert.train.probe.fit_probe`, batches of ``eval.batch_size``, the
    fine-tuning class weights) and records it in ``out_dir/probe.json``; any other (one that resumes, or one that
    the loop will refuse because ``out_dir`` already holds checkpoints) fits nothing (the checkpoint holds the
    head) and returns the record, if any. Under ``torchrun`` every rank fits the same probe on the same data.
    """
    from kaleido_bert.train.probe import fit_probe

    record = out_dir / PROBE_RECORD
    if not fresh:
        return read_json(record, dict) if record.is_file() else None
    probe = fit_probe(model, train_set, val_set, collate_fn, batch_size=config.eval.batch_size,
                      device=dist.device(), class_weight=model.class_weight, c_values=config.finetune.probe_c,
                      mixes=config.finetune.probe_mix,
                      progress=progress and dist.is_main(), num_workers=config.data.num_workers)
    if progress and dist.is_main():
        member = f", head weight α {probe['mix']} (member C {probe['frozen_c']})" if "mix" in probe else ""
        tqdm.write(f"[probe] {probe['items']} items, C {probe['c']}{member}, train accuracy {probe['train_accuracy']}, "
                   f"val accuracy {probe['val_accuracy']}, {probe['seconds']} s")
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, probe)
    return probe


def _check_head(out_dir: Path, head: str) -> None:
    """Refuse, in one line, to resume a classifier run with another ``finetune.head`` than it was trained with."""
    latest = latest_checkpoint(out_dir)
    found = read_model_config(latest).get("classifier_head", "pooled") if latest else head
    if found != head:
        raise KaleidoError(f"checkpoint {latest} has the {found} classifier head but the run config has "
                           f"finetune.head={head}: resume with the same head, or use another --out")


def _checkpoint_tasks(checkpoint: Path) -> list[str]:
    return list(read_model_config(checkpoint).get("tasks", []))
