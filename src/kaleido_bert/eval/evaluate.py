"""``kaleido evaluate``: the paper's evaluation protocols over a run directory (paper §4.2–4.3).

A run directory has the layout ``kaleido demo`` writes (each part optional except the pre-trained model)::

    RUN/pretrain/                      kaleido pretrain --out RUN/pretrain          → ITR/TIR sample-100 (Table 2)
    RUN/finetune/retrieval/            kaleido finetune retrieval                   → full-gallery ITR/TIR
    RUN/finetune/{category,subcategory}[-image]/   kaleido finetune category …     → CR / SUB (Table 3)
    RUN/finetune/caption/              kaleido finetune caption                     → FC (Table 3)

With ``eval.caption_retrieval_k`` > 0, FC also captions by retrieval in the retrieval model's dual-encoder space
(``fc/nearest``, ``fc/consensus``: :mod:`kaleido_bert.eval.caption_retrieval`; no caption fine-tune needed;
skipped without Java). A bare checkpoint directory is evaluated as a pre-trained model (retrieval only). Every
metric key names its protocol (``itr_sample100/R@1``, ``cr/image+text/accuracy``, ``fc/seq2seq/bleu4`` …). Output: ``metrics.json``,
``report.md``, ``candidates.json`` (the sample-100 draw, re-usable with ``--candidates``) and the plots of
:mod:`kaleido_bert.eval.report`.

Evaluation only reads the run: the choices made on validation after training (re-ranking, the query bank's β, the
caption k) are ``kaleido calibrate``'s (:mod:`kaleido_bert.model.calibration`); a stale record, or a missing one
where the config asks for a choice, is refused before any protocol runs.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_write_json
from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import Catalogue
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.inputs.sources import open_data
from kaleido_bert.model.calibration import current_calibration
from kaleido_bert.model.loading import load_pretrained, require_head
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.runs import CLASSIFIERS, run_parts

Data = tuple[Catalogue, FeatureStore]
"""An open catalogue and its feature store (:func:`~kaleido_bert.inputs.sources.open_data`)."""


def evaluate_retrieval(checkpoint: Path, config: RunConfig, *, candidates_in: str | Path | dict | None, out: Path,
                       gallery: bool, progress: bool, data: Data | None = None) -> dict[str, Any]:
    """Sample-100 (and full-gallery) retrieval of one checkpoint; ``candidates_in``: a candidate file, an already
    loaded draw, or None (drawn from ``config.eval`` and saved to ``out/candidates.json``)."""
    from kaleido_bert.eval.query_bank import load_query_bank, query_bank_choice
    from kaleido_bert.eval.retrieval import (
        PairScorer,
        build_candidates,
        evaluate_gallery,
        evaluate_sample100,
        load_candidates,
        save_candidates,
    )
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions

    require_head(checkpoint, "heads.itm.", "ITM ranking (sample-100 retrieval)")
    catalogue, store = data or open_data(config)
    available = set(store.available_ids())
    if isinstance(candidates_in, dict):
        candidates = candidates_in
    elif candidates_in:
        candidates = load_candidates(candidates_in, catalogue, available)
    else:
        ev = config.eval
        candidates = build_candidates(catalogue, available, split=ev.split, num_queries=ev.num_queries,
                                      num_negatives=ev.num_negatives, seed=ev.seed)
    if dist.is_main():  # the draw is seeded: every rank holds the same candidates, one writes them
        save_candidates(candidates, out / "candidates.json")
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, device=dist.device())
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items), pair_score=config.eval.pair_score)
    bank = load_query_bank(checkpoint, config, encoder) if gallery else None
    result = evaluate_sample100(scorer, candidates, progress=progress, shortlist=config.eval.sample100_shortlist,
                                rerank=encoder.rerank)
    result["metrics"]["sample100/sources"] = candidates["sources"]
    if encoder.member is not None:  # the dual encoder is the WiSE-FT ensemble with the frozen member
        result["metrics"]["dual_encoder/member_mix"] = float(encoder.member.mix)
    result["candidates"] = candidates
    result["outcomes"] = {"sample100": result["outcomes"]}
    if gallery:
        found = evaluate_gallery(scorer, catalogue, available, split=config.eval.split,
                                 rerank_k=config.eval.rerank_k, progress=progress, bank=bank)
        result["metrics"].update(found["metrics"])
        result["metrics"]["gallery/reranks"] = encoder.rerank  # the checkpoint's validation choice
        choice = query_bank_choice(checkpoint, config)
        if choice is not None:
            result["metrics"]["gallery/query_bank_grid"] = ", ".join(
                "{beta:g}: {mean_recall:.1f}".format(**g) for g in choice["grid"]) or "no validation items"
        result["outcomes"]["gallery"] = found["outcomes"]
    return result


def evaluate_classifier(checkpoint: Path, config: RunConfig, *, progress: bool, data: Data | None = None
                        ) -> dict[str, Any]:
    from kaleido_bert.data.label_scores import classification_metrics
    from kaleido_bert.eval.predict import predict
    from kaleido_bert.inputs.downstream import ClassificationDataset
    from kaleido_bert.model.classification import KaleidoBertForClassification

    require_head(checkpoint, "classifier.", "classification")
    model = load_pretrained(KaleidoBertForClassification, checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    catalogue, store = data or open_data(config)
    field, source = model.config.label_field, model.config.classifier_input
    dataset = ClassificationDataset(catalogue, store, tokenizer, split=config.eval.split, field=field,
                                    label2id=dict(model.config.label2id), image_only=source == "image",
                                    max_text_len=config.model.max_text_len)
    ids, probs, labels = predict(model, dataset, partial(collate, pad_id=tokenizer.pad_token_id),
                                 batch_size=config.eval.batch_size, device=dist.device(), progress=progress)
    gold, pred = labels.numpy(), probs.argmax(-1).numpy()
    scores = classification_metrics(gold, pred, len(model.config.label2id))
    return {"field": field, "input": source, "items": len(ids), **scores,
            "outcomes": {"ids": list(ids), "gold": gold.tolist(), "pred": pred.tolist()}}


def evaluate_captions(checkpoint: Path, config: RunConfig, *, progress: bool, data: Data | None = None,
                      scorer=None) -> dict[str, Any]:
    """FC of the caption fine-tuned model (``seq2seq`` beam search and/or ``one_shot``); ``scorer``: an open
    :class:`~kaleido_bert.eval.caption_metrics.CaptionScorer` to reuse (one is opened and closed when None)."""
    from kaleido_bert.eval.caption_metrics import CaptionScorer, caption_metrics
    from kaleido_bert.eval.predict import caption_split
    from kaleido_bert.inputs.downstream import CaptionDataset
    from kaleido_bert.model.captioning import KaleidoBertForCaptioning

    require_head(checkpoint, "lm.", "captioning")
    model = load_pretrained(KaleidoBertForCaptioning, checkpoint).to(dist.device())
    tokenizer = load_tokenizer(checkpoint)
    catalogue, store = data or open_data(config)
    dataset = CaptionDataset(catalogue, store, tokenizer, split=config.eval.split,
                             max_text_len=config.model.max_text_len)
    limit = config.eval.caption_items or None
    references = {it.id: [it.description] for it in dataset.items[:limit]}
    out: dict[str, Any] = {"items": len(references), "examples": {}}
    objectives = getattr(model.config, "caption_objectives", ["seq2seq"])
    own = CaptionScorer() if scorer is None else contextlib.nullcontext(scorer)
    with own as scorer:  # METEOR's Java start-up (~8 s) is paid once
        for method, name in (("beam", "seq2seq"), ("one_shot", "one_shot")):
            if name not in objectives:
                continue
            start = time.perf_counter()
            hyps = caption_split(model, dataset, tokenizer, beam_size=config.eval.beam_size,
                                 max_len=config.eval.max_caption_len, batch_size=config.eval.batch_size,
                                 method=method, progress=progress, limit=limit)
            out[name] = caption_metrics(references, hyps, scorer=scorer)
            out[name]["seconds"] = time.perf_counter() - start
            out["examples"][name] = {k: hyps[k] for k in list(hyps)[:8]}
    out["examples"]["reference"] = {k: references[k][0] for k in list(references)[:8]}
    return out


def evaluate_run(run: str | Path, config: RunConfig, out: str | Path, *, candidates: str | Path | None = None,
                 progress: bool = True, dataset_label: str = "", gallery: bool = True,
                 baseline_seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Evaluate every part of ``run`` on ``config``'s catalogue; write metrics.json, report.md and plots.

    With ``baseline_seeds`` the frozen dual-encoder baseline (:mod:`kaleido_bert.eval.baseline`) is fitted and
    scored on the same candidates and items into ``out/baseline.json``; the report shows it beside the model
    whenever that file exists.

    Returns:
        The metrics dict (flat protocol-named keys plus ``timings`` and ``examples``).
    """
    from kaleido_bert.eval.report import write_report

    dist.init()  # under torchrun the protocols' batches are shared out over the ranks; rank 0 writes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = run_parts(run)
    data = open_data(config)  # once: every protocol (and the baseline) reads the same catalogue and store
    with dist.autocast(dist.device(), dist.autocast_dtype(config.train.precision, dist.device())):  # the run's precision
        metrics, extras = _evaluate_parts(parts, config, out, candidates=candidates, progress=progress,
                                          dataset_label=dataset_label, gallery=gallery, run=run, data=data)
    if baseline_seeds and dist.is_main():  # outside autocast: the baseline's frozen text encoder and projections run in fp32
        from kaleido_bert.eval.baseline import run_baseline

        start = time.perf_counter()
        run_baseline(config, out, seeds=tuple(baseline_seeds), data=data)
        metrics["timings"]["frozen_baseline"] = round(time.perf_counter() - start, 1)
    if dist.is_main():
        from kaleido_bert.eval.bootstrap import OUTCOMES_FILE

        atomic_write_json(out / OUTCOMES_FILE, extras.pop("outcomes"))  # per query and item: paired bootstraps
        atomic_write_json(out / "metrics.json", metrics)
        write_report(metrics, extras, config, out)
    dist.barrier()
    return metrics


def _evaluate_parts(parts: dict[str, Path], config: RunConfig, out: Path, *, candidates, progress: bool,
                    dataset_label: str, gallery: bool, run, data: Data) -> tuple[dict[str, Any], dict[str, Any]]:
    from kaleido_bert.eval.caption_metrics import JAVA_HINT, CaptionScorer
    from kaleido_bert.eval.metrics import sum_cls

    metrics: dict[str, Any] = {"run": str(run), "dataset": dataset_label or str(config.data.catalogue),
                               "checkpoints": {k: str(v) for k, v in parts.items()}, "timings": {}}
    extras: dict[str, Any] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        result = fn()
        metrics["timings"][name] = round(time.perf_counter() - start, 1)
        return result

    searched = parts.get("retrieval", parts["pretrain"])  # the model whose dual encoder ranks the full gallery
    for checkpoint in dict.fromkeys((parts["pretrain"], searched)):  # the validation choices, only read here
        current_calibration(checkpoint, config, run=run)
    retrieval = timed("sample100", lambda: evaluate_retrieval(
        parts["pretrain"], config, candidates_in=candidates, out=out, gallery=gallery and "retrieval" not in parts,
        progress=progress, data=data))
    metrics.update(retrieval["metrics"])
    extras["ranked"] = retrieval["ranked"]
    extras["outcomes"] = dict(retrieval["outcomes"])
    if "retrieval" in parts:
        tuned = timed("retrieval_finetuned", lambda: evaluate_retrieval(
            parts["retrieval"], config, candidates_in=retrieval["candidates"], out=out, gallery=True,
            progress=progress, data=data))
        metrics.update({k.replace("sample100", "sample100_finetuned", 1) if "sample100" in k else k: v
                        for k, v in tuned["metrics"].items() if not k.startswith("sample100/sources")})
        if "gallery" in tuned["outcomes"]:  # the fine-tuned model's full gallery replaces the pre-trained one's
            extras["outcomes"]["gallery"] = tuned["outcomes"]["gallery"]
    classes: dict[tuple[str, str], dict[str, Any]] = {}
    for (field, source), name in CLASSIFIERS.items():
        if name in parts:
            result = timed(name, lambda p=parts[name]: evaluate_classifier(p, config, progress=progress, data=data))
            short = "cr" if field == "category" else "sub"
            extras["outcomes"].setdefault("classifiers", {})[f"{short}/{source}"] = result.pop("outcomes")
            classes[(field, source)] = result
            metrics[f"{short}/{source}/accuracy"] = 100 * result["accuracy"]
            metrics[f"{short}/{source}/macro_f1"] = result["macro_f1"]
    for source in ("image+text", "image"):
        if ("category", source) in classes and ("subcategory", source) in classes:
            metrics[f"cls/{source}/SumCLS"] = sum_cls(classes[("category", source)], classes[("subcategory", source)])
    k = config.eval.caption_retrieval_k
    retrieve = k > 0 and shutil.which("java") is not None  # without Java skipped, as the frozen baseline's captions
    if k > 0 and not retrieve:
        metrics["fc/retrieval_skipped"] = JAVA_HINT
    if "caption" in parts or retrieve:
        from kaleido_bert.eval.caption_retrieval import (
            caption_choice,
            caption_gallery,
            chosen_k,
            evaluate_caption_retrieval,
        )

        def add(captions: dict[str, Any]) -> None:
            extras.setdefault("captions", {}).update(captions.pop("examples"))
            for name, values in captions.items():
                if isinstance(values, dict):
                    for key, value in values.items():
                        metrics[f"fc/{name}/{key}"] = value
            metrics["fc/items"] = captions["items"]

        with CaptionScorer() as scorer:  # one METEOR JVM for every FC method
            if "caption" in parts:
                add(timed("caption", lambda: evaluate_captions(parts["caption"], config, progress=progress,
                                                               data=data, scorer=scorer)))
            if retrieve:  # the retrieval model's dual-encoder space: no caption fine-tune needed
                model = searched
                described = timed("caption_gallery", lambda: caption_gallery(model, config, data=data,
                                                                             progress=progress))  # embedded once
                choice = caption_choice(model, config)
                k = chosen_k(choice, config)
                add(timed("caption_retrieval", lambda: evaluate_caption_retrieval(
                    model, config, k=k, scorer=scorer, progress=progress, data=data, gallery=described)))
                if choice is not None:
                    metrics["fc/consensus/k_grid"] = ", ".join(
                        f"{g['k']}: {g['sum_cap']:.1f}" for g in choice["grid"]) or "no validation items"
    return metrics, extras
