"""``kaleido ablate``: the paper's Table 4 (§4.4), each column a pre-train + evaluate with the same budget.

Columns, grouped as the paper, each compared with its group's first column (relative change in %, as the paper):

=====  ==============  =====================================================================================
group  column          what changes from the full model (Kaleido patches + saliency, AGM, all tasks)
=====  ==============  =====================================================================================
KPG    Scale-fixed     one grid of equal patches (the 5×5 level, 25 patches, as FashionBERT's fixed grid; the
                       coarser levels are hidden from attention) with the tasks that apply: MLM, ITM, blank
KPG    Kaleido         five levels on the whole image (saliency ``none``: a second feature store)
KPG    Kaleido+SOD     the full model
AGM    Random          random masking instead of alignment-guided
AGM    AGM             the full model
AKPM   B … B+I~V, B+V  B = AMLM + ITM; I rotation, II jigsaw, III camouflage, IV grey-to-colour, V blank-to-colour
=====  ==============  =====================================================================================

The full model is trained once and shared by its three columns. Every run uses the same sample-100 candidate file,
so retrieval differences come from the models alone. ``itc`` stays on in every column when the preset has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaleido_bert.atomic import atomic_write_json, atomic_write_text, read_json
from kaleido_bert.config import AKPM_TASKS as AKPM
from kaleido_bert.config import RunConfig
from kaleido_bert.errors import KaleidoError
from kaleido_bert.workflows.stages import extract_store

PROTOCOLS = ("retrieval", "classification", "caption")


@dataclass(frozen=True)
class Column:
    group: str
    name: str
    run: str  # the run directory slug (columns sharing a run share a slug)
    tasks: tuple[str, ...] | None = None  # pre-training tasks besides mlm/itm(/itc); None = the preset's
    overrides: dict[str, Any] = field(default_factory=dict)
    saliency: str | None = None  # None = the preset's feature store


def columns() -> list[Column]:
    """The 12 columns of Table 4, in the paper's order."""
    akpm = [Column("AKPM", "B", "b", ()), *[
        Column("AKPM", "B+I" + ("" if i == 0 else f"~{'I II III IV V'.split()[i]}"),
               "full" if i == 4 else f"b-i-{i + 1}", AKPM[:i + 1]) for i in range(5)],
        Column("AKPM", "B+V", "b-v", ("blank_to_color",))]
    return [
        Column("KPG", "Scale-fixed", "scale-fixed", ("blank_to_color",), {"patch_levels": [5]}),
        Column("KPG", "Kaleido", "no-saliency", saliency="none"),
        Column("KPG", "Kaleido+SOD", "full"),
        Column("AGM", "Random", "random-masking", overrides={"strategy": "random"}),
        Column("AGM", "AGM", "full"),
        *akpm,
    ]


def column_config(base: RunConfig, column: Column, features: str) -> RunConfig:
    extra = [t for t in base.model.tasks if t == "itc"]
    values: dict[str, object] = {"data.features": features}
    if column.tasks is not None:
        values["model.tasks"] = ["mlm", "itm", *column.tasks, *extra]
    if "patch_levels" in column.overrides:
        values["model.patch_levels"] = column.overrides["patch_levels"]
    if "strategy" in column.overrides:
        values["masking.strategy"] = column.overrides["strategy"]
    return base.with_overrides(values)


# Table 4 of the paper (Fashion-Gen), per column: ITR R@1/5/10, TIR R@1/5/10, SumR, CR ACC/F, SUB ACC/F, SumCLS,
# BLEU-4, METEOR, ROUGE-L, CIDEr.
PAPER_TABLE4 = {
    "Scale-fixed": (24.71, 50.05, 58.93, 30.17, 52.29, 60.82, 276.97, 93.44, .701, 86.89, .630, 313.43, 4.9, 11.0, 29.8, 30.9),
    "Kaleido": (26.73, 54.55, 65.44, 32.19, 58.40, 66.49, 303.80, 93.45, .705, 87.61, .634, 314.96, 5.2, 11.7, 31.5, 31.3),
    "Kaleido+SOD": (27.99, 60.09, 68.37, 33.88, 60.60, 68.59, 319.52, 95.07, .714, 88.07, .636, 318.14, 5.7, 12.8, 32.9, 32.6),
    "Random": (26.55, 55.13, 64.92, 32.14, 56.99, 63.77, 299.50, 92.71, .711, 87.20, .633, 314.31, 5.3, 11.3, 30.3, 31.7),
    "AGM": (27.99, 60.09, 68.37, 33.88, 60.60, 68.59, 319.52, 95.07, .714, 88.07, .636, 318.14, 5.7, 12.8, 32.9, 32.6),
    "B": (25.37, 54.97, 62.13, 31.09, 57.35, 64.79, 295.70, 90.94, .690, 81.66, .558, 297.40, 4.9, 11.6, 30.4, 31.0),
    "B+I": (25.07, 55.14, 62.90, 30.98, 57.44, 65.65, 297.18, 90.82, .692, 81.25, .575, 298.77, 5.2, 11.6, 30.7, 31.5),
    "B+I~II": (26.03, 56.31, 63.37, 32.22, 58.73, 64.16, 300.82, 91.40, .721, 84.44, .596, 307.54, 5.2, 11.8, 30.8, 31.4),
    "B+I~III": (26.88, 58.34, 67.79, 33.17, 58.55, 67.92, 312.65, 93.91, .713, 86.49, .636, 315.30, 5.1, 12.6, 31.9, 32.0),
    "B+I~IV": (26.20, 59.13, 67.99, 33.80, 60.57, 68.41, 316.10, 94.05, .710, 88.53, .633, 316.88, 5.6, 12.8, 32.7, 32.3),
    "B+I~V": (27.99, 60.09, 68.37, 33.88, 60.60, 68.09, 319.02, 95.07, .714, 88.07, .636, 318.14, 5.7, 12.8, 32.9, 32.6),
    "B+V": (24.62, 53.78, 60.88, 30.77, 55.95, 61.70, 287.70, 88.87, .701, 81.64, .596, 300.21, 5.3, 11.4, 30.6, 31.3),
}
ROWS = [("1. ITR Rank@1", "itr_sample100/R@1"), ("1. ITR Rank@5", "itr_sample100/R@5"),
        ("1. ITR Rank@10", "itr_sample100/R@10"), ("2. TIR Rank@1", "tir_sample100/R@1"),
        ("2. TIR Rank@5", "tir_sample100/R@5"), ("2. TIR Rank@10", "tir_sample100/R@10"),
        ("**SumR**", "sample100/SumR"), ("3. CR ACC", "cr/image+text/accuracy"),
        ("3. CR macro-F", "cr/image+text/macro_f1"), ("4. SUB ACC", "sub/image+text/accuracy"),
        ("4. SUB macro-F", "sub/image+text/macro_f1"), ("**SumCLS**", "cls/image+text/SumCLS"),
        ("5. BLEU-4", "fc/seq2seq/bleu4"), ("5. METEOR", "fc/seq2seq/meteor"), ("5. ROUGE-L", "fc/seq2seq/rouge_l"),
        ("5. CIDEr", "fc/seq2seq/cider")]


def _cell(value: float | None, base: float | None, first: bool, digits: int) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if not first and base:
        text += f" ({100 * (value - base) / abs(base):+.1f}%)"
    return text


def format_table(results: dict[str, dict[str, Any]], cols: list[Column], values=None) -> list[str]:
    """Markdown Table 4: metric rows × columns, each with its relative change to its group's first column."""
    head = ["Metric"] + [f"{c.group}: {c.name}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, (label, key) in enumerate(ROWS):
        row, base = [label], {}
        for c in cols:
            value = values(c, r) if values else results.get(c.run, {}).get(key)
            first = c.group not in base
            base.setdefault(c.group, value)
            row.append(_cell(value, base[c.group], first, 3 if "macro" in label else 2))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ablate(config: RunConfig, out: str | Path, *, protocols: tuple[str, ...] = PROTOCOLS, only: list[str] | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Run every column's pre-training and evaluation into ``out/<run>/`` and write ``out/ablation.md``.

    Args:
        config: the preset; ``data.catalogue``, ``data.features`` (the saliency store) and ``data.alignments`` set.
        out: output root; finished parts are skipped on a re-run, unfinished ones resume.
        protocols: which of retrieval, classification (image+text CR and SUB), caption to run.
        only: column names to run (default all).
    """
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.workflows.stages import calibrate_stage, finetune_jobs, finetune_stage, pretrain_stage

    bad = sorted(set(protocols) - set(PROTOCOLS))
    if bad:
        raise KaleidoError(f"unknown ablation protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
    if not (config.data.catalogue and config.data.features):
        raise KaleidoError("ablate needs data.catalogue and data.features (and data.alignments for AGM)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = [c for c in columns() if not only or c.name in only or c.run in only]
    if not cols:
        raise KaleidoError(f"no ablation column matches {only}; columns: {', '.join(c.name for c in columns())}")
    results: dict[str, dict[str, Any]] = {}
    candidates = out / "candidates.json"
    for column in cols:
        if column.run in results:
            continue
        features = config.data.features
        if column.saliency is not None:
            features = str(_feature_store(config, out / f"features-saliency-{column.saliency}", column.saliency))
        run = column_config(config, column, features)
        root = out / column.run
        print(f"[ablate] {column.group} {column.name} → {root}", flush=True)
        pretrain_stage(run, root, progress=progress)
        for task, image_only in finetune_jobs(run, retrieval=False, caption="caption" in protocols,
                                              classifiers="classification" in protocols):
            if not image_only:  # Table 4 reports the paper's image + text classifiers
                finetune_stage(run, root, task, image_only, progress=progress)
        calibrate_stage(run, root, progress=progress)
        metrics = evaluate_run(root, run, root / "report", candidates=candidates if candidates.is_file() else None,
                               progress=progress, dataset_label=f"ablation {column.name}", gallery=False)
        if not candidates.is_file():
            candidates.write_bytes((root / "report" / "candidates.json").read_bytes())
        results[column.run] = metrics
    names = {c.name for c in cols}
    paper_cols = [c for c in columns() if c.name in names]
    lines = ["# Ablation (paper Table 4)", "",
             f"Dataset: {config.data.catalogue}; preset `{config.name}`: {config.train.max_steps} pre-training steps, "
             f"{config.finetune.max_steps} fine-tuning steps per task; every column pre-trained and evaluated with the "
             "same budget and the same sample-100 candidates. In brackets: the change relative to the group's first "
             "column, as the paper.", "", "## Ours", "", *format_table(results, cols), "",
             "## Paper (Fashion-Gen)", "",
             *format_table({}, paper_cols, values=lambda c, r: PAPER_TABLE4[c.name][r]), ""]
    atomic_write_text(out / "ablation.md", "\n".join(lines))
    atomic_write_json(out / "ablation.json", {"columns": [c.__dict__ | {"tasks": c.tasks} for c in cols],
                                              "results": results})
    print("\n".join(lines))
    return {"results": results, "table": out / "ablation.md"}


def _feature_store(config: RunConfig, target: Path, saliency: str) -> Path:
    """A feature store of the catalogue with another saliency method (built once, resumed if interrupted)."""
    manifest = target / "manifest.json"
    if manifest.is_file() and read_json(manifest, dict).get("complete"):
        return target
    extract_store(config.with_overrides({"features.saliency": saliency}), config.data.catalogue, target)
    return target
