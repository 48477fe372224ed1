"""The frozen baseline's column in ``report.md``: chance, baseline (mean ± std over seeds) and the model (beyond the paper).

:func:`baseline_section` renders the rows of the baseline comparison table from the model's ``metrics.json`` and the
baseline's ``baseline.json`` (:mod:`kaleido_bert.eval.baseline`), all in %, between HTML-comment markers, so
:func:`update_report` can put the section into an existing report (``kaleido baseline RUN``) or replace it.
Where both per-unit outcome files exist (the model's ``outcomes.json``, the baseline's ``baseline-outcomes.json``:
its seeds' mean ``P(rank ≤ K)`` per query and its classifiers' predictions) each row also gets model − baseline
with a paired bootstrap 95% interval over the same test queries and items (:func:`baseline_intervals`), so a row
the model wins or loses by less than the test set can tell apart says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kaleido_bert.atomic import atomic_write_text, read_json
from kaleido_bert.errors import KaleidoError

BASELINE_FILE = "baseline.json"
BASELINE_OUTCOMES_FILE = "baseline-outcomes.json"

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


def shown_key(metrics: dict[str, Any], model_keys: tuple[str, ...]) -> str | None:
    """The first of a row's model keys that ``metrics`` holds; the re-ranked gallery only when the model re-ranks
    (``gallery/reranks``, its validation choice; absent = it does)."""
    if not metrics.get("gallery/reranks", True):
        model_keys = tuple(k for k in model_keys if "_gallery_rerank/" not in k)
    return next((k for k in model_keys if k in metrics), None)


def comparison_rows(metrics: dict[str, Any], baseline: dict[str, Any]) -> list[tuple[str, Any, Any, Any, Any]]:
    """``(label, chance, baseline mean, baseline std, model)`` per row, all in % (None where absent)."""
    rows = []
    for label, model_keys, key in ROWS:
        scale = 100.0 if key.endswith("macro_f1") else 1.0
        shown = shown_key(metrics, model_keys)
        model = None if shown is None else metrics[shown]
        if model is None and key not in baseline.get("mean", {}):
            continue
        if model is None and model_keys[0].startswith(OPTIONAL):
            continue
        chance = baseline.get("chance", {}).get(key)
        rows.append((label, None if chance is None else chance * scale,
                     None if key not in baseline["mean"] else baseline["mean"][key] * scale,
                     baseline.get("std", {}).get(key, 0.0) * scale, None if model is None else model * scale))
    return rows


def baseline_intervals(out: str | Path, metrics: dict[str, Any], *, resamples: int = 2000
                       ) -> dict[str, dict[str, float]]:
    """Model − baseline per row label of :data:`ROWS`, with its paired bootstrap 95% interval
    (:func:`~kaleido_bert.eval.bootstrap.paired_bootstrap`, macro-F1 in points), for the rows whose model metric
    (the one :func:`comparison_rows` shows) both outcome files in ``out`` cover; ``{}`` without them. Rows over
    different test items (another candidate draw or split) are left out rather than paired wrongly."""
    from kaleido_bert.eval.bootstrap import OUTCOMES_FILE, available_metrics, load_outcomes, paired_bootstrap

    out = Path(out)
    if not (out / OUTCOMES_FILE).is_file() or not (out / BASELINE_OUTCOMES_FILE).is_file():
        return {}
    model, base = (load_outcomes(out / name) for name in (OUTCOMES_FILE, BASELINE_OUTCOMES_FILE))
    have_model, have_base = set(available_metrics(model)), set(available_metrics(base))
    found = {}
    for label, model_keys, key in ROWS:
        shown = shown_key(metrics, model_keys)
        if shown is None or shown not in have_model or key not in have_base:
            continue
        scale = 100.0 if key.endswith("macro_f1") else 1.0
        try:
            result = paired_bootstrap(base, model, key, metric_b=shown, resamples=resamples)
        except KaleidoError:  # another candidate draw or test split: not the same units or items
            continue
        found[label] = {name: result[name] * scale for name in ("diff", "low", "high")}
    return found


def baseline_section(metrics: dict[str, Any], baseline: dict[str, Any],
                     intervals: dict[str, dict[str, float]] | None = None) -> list[str]:
    """The report's "frozen baseline" column beside the model's, between :data:`BEGIN` / :data:`END` markers;
    with ``intervals`` (:func:`baseline_intervals`) a column of model − baseline and its 95% interval."""
    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.1f}"

    seeds = baseline.get("seeds", [])
    lines = [BEGIN, "## Against a frozen dual-encoder baseline", "",
             f"Frozen image features (`{baseline.get('image_pool')}` pool, chosen on validation) and the frozen text "
             f"checkpoint ({baseline.get('text_model_from')}) mean-pooled, two linear maps trained with InfoNCE; "
             "logistic regression for CR/SUB; captions = the nearest training description. Same test items and "
             f"candidate lists as the model; mean ± std over seeds {seeds}. All values in %. Chance: a random "
             "ranking, the training majority class, a random training description. The model's full-gallery rows "
             "are after ITM re-ranking when the run has it and chose it on validation.", ""]
    if intervals:
        lines += [f"kaleido − baseline: {INTERVAL_NOTE}", "",
                  "| metric | chance | frozen baseline | kaleido-bert | kaleido − baseline [95% interval] |",
                  "|---|---|---|---|---|"]
    else:
        lines += ["| metric | chance | frozen baseline | kaleido-bert |", "|---|---|---|---|"]
    for label, chance, mean, std, model in comparison_rows(metrics, baseline):
        base = "–" if mean is None else f"{mean:.1f} ± {std:.1f}"
        won = model is not None and mean is not None and model > mean
        row = f"| {label} | {fmt(chance)} | {base} | {('**' + fmt(model) + '**') if won else fmt(model)} |"
        if intervals:
            row += f" {format_interval(intervals.get(label))} |"
        lines.append(row)
    return [*lines, "", *query_bank_note(metrics, baseline), END, ""]


def query_bank_note(metrics: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """When the model's full gallery is normalised by a bank of training queries (``eval.query_bank_betas``), the
    baseline given the same normalisation, as a diagnostic beside the table (the table keeps the plain baseline):
    how much of the model's gallery rows the normalisation alone would give the baseline. ``[]`` otherwise."""
    mean, std = baseline.get("mean", {}), baseline.get("std", {})
    keys = [f"query_bank/{d}_gallery/mean_recall" for d in ("itr", "tir")]
    if not metrics.get("gallery/query_bank_beta") or not all(k in mean for k in keys):
        return []
    betas = [float(m["query_bank/beta"]) for m in baseline.get("per_seed", []) if "query_bank/beta" in m]
    shown = [shown_key(metrics, (f"{d}_gallery_rerank/mean_recall", f"{d}_gallery/mean_recall")) for d in ("itr", "tir")]
    model = [None if k is None else metrics[k] for k in shown]
    parts = [f"{d} {mean[k]:.1f} ± {std.get(k, 0.0):.1f} (kaleido-bert {m:.1f})" for d, k, m
             in zip(("ITR", "TIR"), keys, model, strict=True) if m is not None]
    return [f"Diagnostic, not a row of the table: the model's full gallery is normalised by a bank of its training "
            f"queries (inverted softmax, β = {metrics['gallery/query_bank_beta']:g}, chosen on validation). The "
            f"frozen baseline given the same normalisation with its own training queries (β chosen on its "
            f"validation for each seed: {', '.join(f'{b:g}' for b in betas)}) reaches full-gallery mean recall "
            f"{'; '.join(parts)}.", ""]


INTERVAL_NOTE = ("paired bootstrap (2,000 resamples) over the same test queries and items, against the baseline "
                 "seeds' mean outcome per query, so the interval holds the test set's sampling and not the "
                 "baseline's seed spread; macro-F1 there averages over the classes present in each resample's "
                 "gold or predictions, not the whole label map, so its Δ can differ from the columns'.")
"""How the model − baseline intervals are made (one owner: the report and the quality benchmark print it)."""


def resolved_sign(found: dict[str, float]) -> int:
    """+1 when the interval lies above 0, −1 below, 0 when it spans 0."""
    return 1 if found["low"] > 0 else -1 if found["high"] < 0 else 0


def format_interval(found: dict[str, float] | None) -> str:
    """``+1.2 [-0.3, +2.6]``, in bold when the interval excludes 0; ``–`` without one."""
    if found is None:
        return "–"
    text = f"{found['diff']:+.1f} [{found['low']:+.1f}, {found['high']:+.1f}]"
    return f"**{text}**" if resolved_sign(found) else text


def load_baseline(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / BASELINE_FILE
    return read_json(path, dict, fix="re-run `kaleido baseline`") if path.is_file() else None


def update_report(out: str | Path) -> Path | None:
    """Put (or replace) the baseline section in ``out/report.md`` from ``metrics.json`` and ``baseline.json``."""
    out = Path(out)
    report, metrics_path, baseline = out / "report.md", out / "metrics.json", load_baseline(out)
    if baseline is None or not report.is_file() or not metrics_path.is_file():
        return None
    text = report.read_text()
    metrics = read_json(metrics_path, dict, what="a metrics report (a JSON object)", fix="re-run `kaleido evaluate`")
    section = "\n".join(baseline_section(metrics, baseline, baseline_intervals(out, metrics)))
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
