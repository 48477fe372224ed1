"""``kaleido card RUN``: each checkpoint's model card with the metrics of the run's last evaluation (beyond the paper).

Reads ``RUN/report/metrics.json`` (``kaleido evaluate``) and, when present, ``RUN/report/baseline.json`` (the frozen
baseline with its chance levels, :mod:`kaleido_bert.eval.baseline`), picks each part's own rows and rewrites the
``README.md`` of each checkpoint of :func:`~kaleido_bert.runs.run_parts` (:func:`kaleido_bert.model_card.write_card`).
Evaluation itself never writes into a model directory; this is the separate step that does, and it writes the card
alone. Which rows belong to which part (the protocols of :mod:`kaleido_bert.eval.evaluate`):

==========================  ==========================================================================
part                        rows
==========================  ==========================================================================
pretrain                    sample-100 R@1/5/10 and SumR of the pre-trained ITM; without a retrieval part
                            also the full gallery and captions by retrieval (its dual encoder searched)
retrieval                   sample-100 of the fine-tuned ITM, the full gallery (dual encoder, ITM
                            re-rank), captions by retrieval in its ITC space
category[-image] …          CR / SUB accuracy (%) and macro-F1 (a fraction) of that input
caption                     BLEU-4, METEOR, ROUGE-L, CIDEr, SumCAP of beam search and the one-shot baseline
==========================  ==========================================================================

A row's baseline is the frozen baseline's mean and std over seeds on the same protocol (the sample-100 and gallery
rows of its dual encoder, its classifiers, its nearest-description captions); chance is the report's (a random
ranking of the candidates or the gallery, the training majority class, a random training description). A checkpoint
that the last evaluation did not measure (a newer step, a part added later) is "not evaluated yet".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kaleido_bert.atomic import read_json
from kaleido_bert.checkpoint import load_train_state, read_model_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.baseline_report import load_baseline
from kaleido_bert.eval.metrics import expected_rank_chance
from kaleido_bert.eval.report import CAPTION_KEYS, CAPTION_NAMES, EXAMPLE_COLUMNS
from kaleido_bert.model_card import Evaluation, MetricRow, checkpoint_part, write_card
from kaleido_bert.runs import CLASSIFIERS, run_config_file, run_parts

METRICS_FILE = "metrics.json"
KS = (1, 5, 10)
RETRIEVAL_TASK = ("image-text-retrieval", "Image-text retrieval")
CAPTION_TASK = ("image-to-text", "Fashion captioning")
CAPTION_TYPES = {"bleu4": "bleu", "meteor": "meteor", "rouge_l": "rouge", "cider": "cider", "sum_cap": "sum_cap"}
"""The hub metric id of each caption metric key."""
BASELINE_NOTE = ("Frozen baseline (mean ± std over seeds {seeds}): the feature store's frozen image features and "
                 "the frozen text initialisation ({text}) mean-pooled, with two linear maps trained by InfoNCE; "
                 "logistic regression for the classifiers; captions = the nearest training description. Chance: a "
                 "random ranking, the training majority class, a random training description.")


def _row(metrics: dict[str, Any], key: str, name: str, metric_type: str, task: tuple[str, str], *,
         baseline: dict[str, Any] | None, base_key: str | None = None, chance: float | None = None,
         digits: int = 2) -> MetricRow | None:
    """The row of ``key`` (None when the report lacks it), with the baseline of ``base_key`` (default ``key``)."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    base_key = base_key or key
    mean = (baseline or {}).get("mean", {}).get(base_key)
    chance = (baseline or {}).get("chance", {}).get(base_key, chance)
    return MetricRow(name=name, value=float(value), metric_type=metric_type, task_type=task[0], task_name=task[1],
                     baseline=mean, baseline_std=(baseline or {}).get("std", {}).get(base_key) if mean is not None
                     else None, chance=chance, digits=digits)


def _sample100_rows(metrics: dict[str, Any], baseline: dict[str, Any] | None, prefix: str, label: str) -> list:
    width = int(metrics.get("sample100/candidates_per_query") or 101)
    rows = [_row(metrics, f"{d}_{prefix}/R@{k}", f"{d.upper()} R@{k}, sample-100 ({label})", f"recall_at_{k}",
                 RETRIEVAL_TASK, baseline=baseline, base_key=f"{d}_sample100/R@{k}",
                 chance=100 * expected_rank_chance(width, k)) for d in ("itr", "tir") for k in KS]
    rows.append(_row(metrics, f"{prefix}/SumR", f"SumR, sample-100 ({label})", "sum_r", RETRIEVAL_TASK,
                     baseline=baseline, base_key="sample100/SumR", chance=metrics.get("sample100/chance_SumR")))
    return rows


def _gallery_rows(metrics: dict[str, Any], baseline: dict[str, Any] | None) -> list:
    rows = []
    for direction, size_key in (("itr", "gallery/products"), ("tir", "gallery/images")):
        size = int(metrics.get(size_key) or 0)
        chance = {f"R@{k}": 100 * expected_rank_chance(size, k) for k in KS} if size else {}
        if chance:
            chance["mean_recall"] = sum(chance.values()) / len(chance)
        for suffix, label in (("gallery", "dual encoder"), ("gallery_rerank", "dual encoder + ITM re-rank")):
            for name in (*[f"R@{k}" for k in KS], "mean_recall"):
                metric_type = name.replace("R@", "recall_at_")
                rows.append(_row(metrics, f"{direction}_{suffix}/{name}",
                                 f"{direction.upper()} {name.replace('_', ' ')}, full gallery ({label})", metric_type,
                                 RETRIEVAL_TASK, baseline=baseline, base_key=f"{direction}_gallery/{name}",
                                 chance=chance.get(name)))
    return rows


def _caption_rows(metrics: dict[str, Any], baseline: dict[str, Any] | None, modes: tuple[str, ...]) -> list:
    labels = dict(EXAMPLE_COLUMNS)
    return [_row(metrics, f"fc/{mode}/{key}", f"{name}, {labels[mode]}", CAPTION_TYPES[key], CAPTION_TASK,
                 baseline=baseline, base_key=f"fc/nearest/{key}")
            for mode in modes for key, name in (*zip(CAPTION_KEYS, CAPTION_NAMES, strict=True), ("sum_cap", "SumCAP"))]


def _classifier_rows(metrics: dict[str, Any], baseline: dict[str, Any] | None, part: str) -> list:
    (field, source), = [key for key, name in CLASSIFIERS.items() if name == part]
    short, inputs = ("cr" if field == "category" else "sub"), ("image only" if source == "image" else "image + text")
    task = ("image-classification", f"{field.capitalize()} classification ({inputs})")
    return [_row(metrics, f"{short}/{source}/accuracy", f"{short.upper()} accuracy % ({inputs})", "accuracy", task,
                 baseline=baseline),
            _row(metrics, f"{short}/{source}/macro_f1", f"{short.upper()} macro-F1 ({inputs})", "f1", task,
                 baseline=baseline, digits=3)]


def part_rows(part: str, metrics: dict[str, Any], baseline: dict[str, Any] | None) -> list[MetricRow]:
    """The rows of ``metrics`` (``metrics.json``) that measure the part ``part``, in the report's order."""
    searched = "retrieval" if "retrieval" in metrics.get("checkpoints", {}) else "pretrain"  # its dual encoder
    rows: list[MetricRow | None] = []
    if part == "pretrain":
        rows += _sample100_rows(metrics, baseline, "sample100", "pre-trained ITM")
    elif part == "retrieval":
        rows += _sample100_rows(metrics, baseline, "sample100_finetuned", "retrieval fine-tuned ITM")
    elif part in CLASSIFIERS.values():
        rows += _classifier_rows(metrics, baseline, part)
    elif part == "caption":
        rows += _caption_rows(metrics, baseline, ("seq2seq", "one_shot"))
    if part == searched:
        rows += _gallery_rows(metrics, baseline) + _caption_rows(metrics, baseline, ("nearest", "consensus"))
    return [row for row in rows if row is not None]


def card_evaluation(part: str, checkpoint: Path, metrics: dict[str, Any], baseline: dict[str, Any] | None,
                    report: Path, *, key: str | None = None, split: str = "test") -> Evaluation:
    """The :class:`~kaleido_bert.model_card.Evaluation` of one checkpoint: its rows when the report measured
    this very checkpoint (``metrics["checkpoints"][key]`` names its directory), else none and a note why."""
    dataset = str(metrics.get("dataset") or "the catalogue")
    evaluated = metrics.get("checkpoints", {}).get(key or part)
    if evaluated is None:
        return Evaluation([], dataset, split, str(report), [f"The last evaluation (`{report}`) did not include it."])
    if Path(evaluated).name != checkpoint.name:
        return Evaluation([], dataset, split, str(report),
                          [f"The last evaluation (`{report}`) measured `{evaluated}`, not this checkpoint."])
    notes = []
    if baseline is not None:
        notes.append(BASELINE_NOTE.format(seeds=baseline.get("seeds", "?"),
                                          text=baseline.get("text_model_from", "model.init")))
    else:
        notes.append("The report has no frozen baseline (`kaleido baseline RUN` adds it).")
    mix = metrics.get("dual_encoder/member_mix")
    if mix is not None and part in ("pretrain", "retrieval"):
        notes.append(f"Its dual encoder is the WiSE-FT ensemble of the model (weight {mix:g}) and its frozen "
                     "linear-probe member.")
    return Evaluation(part_rows(part, metrics, baseline), dataset, split, str(report), notes)


def read_metrics(report: Path) -> dict[str, Any] | None:
    """``report/metrics.json`` as a dict, None when the run has no report.

    Raises:
        KaleidoError: the file exists but is not a JSON object (names it).
    """
    path = report / METRICS_FILE
    if not path.is_file():
        return None
    return read_json(path, dict, what="a metrics report (a JSON object)", fix="re-run `kaleido evaluate`")


def _eval_split(run: str | Path) -> str:
    """``eval.split`` of the run config describing ``run`` (``test`` when none says otherwise)."""
    path = run_config_file(run)
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, yaml.YAMLError):
        found = None
    return str(((found or {}).get("eval") or {}).get("split") or "test")


def write_run_cards(run: str | Path, report: str | Path | None = None) -> dict[str, tuple[Path, int]]:
    """(Re)write the model card of every checkpoint of ``run`` (pre-trained and each fine-tuned part) with the
    metrics of its last evaluation (``report``, default ``RUN/report``); only ``README.md`` files are written.

    Returns:
        part name → (card path, number of metric rows on it; 0 = not evaluated yet).

    Raises:
        KaleidoError: ``run`` holds no pre-trained model, a checkpoint's ``config.json`` is unreadable, or the
            report's ``metrics.json`` is not a metrics report (one line).
    """
    parts = run_parts(run)
    report = Path(report) if report is not None else Path(run) / "report"
    metrics = read_metrics(report)
    baseline = load_baseline(report) if metrics is not None else None
    split = (baseline or {}).get("split") or _eval_split(run)
    written = {}
    for key, checkpoint in parts.items():
        try:
            training = load_train_state(checkpoint)
        except KaleidoError:  # an unreadable training state: the card says the machine is unknown
            training = {}
        part = training.get("part") or checkpoint_part(read_model_config(checkpoint), key)
        evaluation = (None if metrics is None else
                      card_evaluation(part, checkpoint, metrics, baseline, report, key=key, split=split))
        written[part] = (write_card(checkpoint, training=training, part=part, evaluation=evaluation),
                         len(evaluation.rows) if evaluation else 0)
    return written
