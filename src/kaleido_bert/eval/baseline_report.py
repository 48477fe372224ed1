"""The frozen baseline's column in ``report.md``: chance, baseline (mean ± std over seeds) and the model (issue 13).

:func:`baseline_section` renders the rows of issue 13's table from the model's ``metrics.json`` and the
baseline's ``baseline.json`` (:mod:`kaleido_bert.eval.baseline`), all in %, between HTML-comment markers, so
:func:`update_report` can put the section into an existing report (``kaleido baseline RUN``) or replace it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaleido_bert.atomic import atomic_write_text

BASELINE_FILE = "baseline.json"

BEGIN, END = "<!-- frozen-baseline -->", "<!-- /frozen-baseline -->"
ROWS = (  # label, model key(s) in order of preference, baseline key (macro-F1 fractions are shown in %)
    ("sample-100 SumR, pre-trained ITM", ("sample100/SumR",), "sample100/SumR"),
    ("sample-100 SumR, retrieval fine-tuned ITM", ("sample100_finetuned/SumR",), "sample100/SumR"),
    ("full gallery mean recall, ITR", ("itr_gallery_rerank/mean_recall", "itr_gallery/mean_recall"),
     "itr_gallery/mean_recall"),
    ("full gallery mean recall, TIR", ("tir_gallery_rerank/mean_recall", "tir_gallery/mean_recall"),
     "tir_gallery/mean_recall"),
    ("CR ACC, image + text", ("cr/image+text/accuracy",), "cr/image+text/accuracy"),
    ("CR macro-F1, image + text", ("cr/image+text/macro_f1",), "cr/image+text/macro_f1"),
    ("CR ACC, image only", ("cr/image/accuracy",), "cr/image/accuracy"),
    ("CR macro-F1, image only", ("cr/image/macro_f1",), "cr/image/macro_f1"),
    ("SUB ACC, image + text", ("sub/image+text/accuracy",), "sub/image+text/accuracy"),
    ("SUB macro-F1, image + text", ("sub/image+text/macro_f1",), "sub/image+text/macro_f1"),
    ("SUB ACC, image only", ("sub/image/accuracy",), "sub/image/accuracy"),
    ("SUB macro-F1, image only", ("sub/image/macro_f1",), "sub/image/macro_f1"),
    ("captions SumCAP (model: beam; baseline: nearest training description)", ("fc/seq2seq/sum_cap",),
     "fc/nearest/sum_cap"),
    ("captions SumCAP, nearest training description (model: in its ITC space)", ("fc/nearest/sum_cap",),
     "fc/nearest/sum_cap"),
    ("captions SumCAP (model: consensus of the k nearest in its ITC space; baseline: nearest)",
     ("fc/consensus/sum_cap",), "fc/nearest/sum_cap"),
)
OPTIONAL = ("sample100_finetuned/", "fc/nearest/", "fc/consensus/")
"""Model keys of rows shown only when the model has them (a fine-tuned retrieval part, retrieval captions)."""


def comparison_rows(metrics: dict[str, Any], baseline: dict[str, Any]) -> list[tuple[str, Any, Any, Any, Any]]:
    """``(label, chance, baseline mean, baseline std, model)`` per row, all in % (None where absent)."""
    rows = []
    for label, model_keys, key in ROWS:
        scale = 100.0 if key.endswith("macro_f1") else 1.0
        model = next((metrics[k] for k in model_keys if k in metrics), None)
        if model is None and key not in baseline.get("mean", {}):
            continue
        if model is None and model_keys[0].startswith(OPTIONAL):
            continue
        chance = baseline.get("chance", {}).get(key)
        rows.append((label, None if chance is None else chance * scale,
                     None if key not in baseline["mean"] else baseline["mean"][key] * scale,
                     baseline.get("std", {}).get(key, 0.0) * scale, None if model is None else model * scale))
    return rows


def baseline_section(metrics: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """The report's "frozen baseline" column beside the model's, between :data:`BEGIN` / :data:`END` markers."""
    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.1f}"

    seeds = baseline.get("seeds", [])
    lines = [BEGIN, "## Against a frozen dual-encoder baseline", "",
             f"Frozen image features (`{baseline.get('image_pool')}` pool, chosen on validation) and the frozen text "
             f"checkpoint ({baseline.get('text_model_from')}) mean-pooled, two linear maps trained with InfoNCE; "
             "logistic regression for CR/SUB; captions = the nearest training description. Same test items and "
             f"candidate lists as the model; mean ± std over seeds {seeds}. All values in %. Chance: a random "
             "ranking, the training majority class, a random training description. The model's full-gallery rows "
             "are after ITM re-ranking when the run has it.", "",
             "| metric | chance | frozen baseline | kaleido-bert |", "|---|---|---|---|"]
    for label, chance, mean, std, model in comparison_rows(metrics, baseline):
        base = "–" if mean is None else f"{mean:.1f} ± {std:.1f}"
        won = model is not None and mean is not None and model > mean
        lines.append(f"| {label} | {fmt(chance)} | {base} | {('**' + fmt(model) + '**') if won else fmt(model)} |")
    return [*lines, "", END, ""]


def load_baseline(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / BASELINE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def update_report(out: str | Path) -> Path | None:
    """Put (or replace) the baseline section in ``out/report.md`` from ``metrics.json`` and ``baseline.json``."""
    out = Path(out)
    report, metrics_path, baseline = out / "report.md", out / "metrics.json", load_baseline(out)
    if baseline is None or not report.is_file() or not metrics_path.is_file():
        return None
    text = report.read_text()
    section = "\n".join(baseline_section(json.loads(metrics_path.read_text()), baseline))
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    elif "## Table 2" in text:
        head, rest = text.split("## Table 2", 1)
        text = head + section + "\n## Table 2" + rest
    else:
        text = text + "\n" + section
    atomic_write_text(report, text)
    return report
