"""Quality on real products: the `real` recipe against the frozen dual-encoder baseline.

Data: the two Myntra samples of ``../shared/data`` (1,109 full-size photos, 5,598 thumbnails; disjoint ids). Half
of the photos' products (a seeded hash order) are the **test** split; every other product (the thumbnails and the
other photos) is train or validation (10% of them; ``--val-photos F`` puts a fraction F of the other photos in
validation instead, so that the settings chosen there see the photos the test split holds). Splits are by product
id, so a product that has an image in the test split has none in training. Settings are chosen on the validation split only; the test split is read
once, by the final evaluation.

Stages (each skipped when its output is complete, so the script resumes): ``data`` (combined CSV → catalogue →
feature store with the preset's backbone), ``pretrain`` / ``finetune`` (the recipe), ``evaluate`` (the model's
protocols on the test split), ``baseline`` (3 seeds, the same candidates) and the report,
``benchmarks/results/quality.md``.

    python benchmarks/bench_quality.py [--work DIR] [--set train.max_steps=…] [--stages data,...] [--views 80]
                                       [--val-photos 0.1] [--result quality]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts (common imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402  (and the offline environment)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_WORK = ROOT / "benchmarks" / ".cache" / "quality"
STAGES = ("data", "pretrain", "finetune", "evaluate", "baseline", "report")
CONTRAST_BUDGET = {"train.epochs": 0.5, "finetune.tasks": ["subcategory"], "finetune.inputs": ["image+text"],
                   "eval.caption_retrieval_k": 0, "finetune.sentence": False, "finetune.probe_c": [1.0],
                   "train.new_lr_scale": 1.0, "finetune.probe_mix": [1.0]}
"""Table 4's contrasts at a smaller budget than the recipe's (half an epoch of pre-training, one lr for every
parameter, one classifier: the wide head without the sentence embedding at C = 1; the contrasts are of
pre-training), every arm trained and scored the same way on the main run's candidates. The recipe's later
``train.new_lr_scale`` and classifier switches (``finetune.probe_mix`` too) are pinned off, so the arms already run
stay comparable; the ``-x25`` arms put the recipe's ``new_lr_scale`` back, as a pair of their own."""
CONTRAST_QUERIES = 100
"""Sample-100 queries per direction in every arm: the first of the main run's draw (the cross-encoder scores
101 pairs per query, 46 min for all 573 on 2 CPU cores; 100 queries take about 8 min per arm)."""
CONTRAST_ARMS = {  # arm → (the ablation column it is, its run-config changes beyond CONTRAST_BUDGET)
    "full": ("B+I~V, Kaleido+SOD, random masking", {}),
    "agm": ("B+I~V, Kaleido+SOD, alignment-guided masking (the paper's generated-caption alignments)", {}),
    "agm-forced": ("B+I~V, Kaleido+SOD, alignment-guided masking (forced alignments)", {}),
    "b": ("B (AMLM + ITM)", {"model.tasks": ["mlm", "itm", "itc"]}),
    "scale-fixed": ("Scale-fixed (the 5×5 grid only)", {"model.tasks": ["mlm", "itm", "blank_to_color", "itc"],
                                                        "model.patch_levels": [5]}),
    # the recipe's learning rates, where the heads learn (at 1 every head is at chance after half an epoch)
    "full-x25": ("B+I~V, Kaleido+SOD, random masking, new_lr_scale 25", {"train.new_lr_scale": 25.0}),
    "agm-forced-x25": ("B+I~V, Kaleido+SOD, AGM (forced alignments), new_lr_scale 25", {"train.new_lr_scale": 25.0}),
}
GUIDED_ARMS = {"agm": "greedy", "agm-forced": "forced", "agm-forced-x25": "forced"}
"""Arms masked by an alignment file of the ``align`` stage, one per ``align.decode`` (every other run masks at
random)."""
CONTRASTS = (("b", "full", "B → B+I~V (all five AKPM tasks)"),
             ("full", "agm", "Random → alignment-guided masking (AGM)"),
             ("full", "agm-forced", "Random → AGM with forced alignments"),
             ("scale-fixed", "full", "Scale-fixed → Kaleido + saliency"),
             ("full-x25", "agm-forced-x25", "Random → AGM with forced alignments, new_lr_scale 25"),
             ("full", "full-x25", "new_lr_scale 1 → 25 (random masking)"))
CONTRAST_METRICS = ("sample100/SumR", "itr_gallery/mean_recall", "tir_gallery/mean_recall",
                    "sub/image+text/accuracy", "sub/image+text/macro_f1")


VAL_FRACTION = 0.1
"""The fraction of the non-test products in validation (of the non-test photos: ``--val-photos``)."""


def split_of(product_id: str, photo: bool, seed: int = 0, val_photos: float = VAL_FRACTION) -> str:
    """Test = half of the photo products; validation = 10% of the thumbnails and ``val_photos`` of the other
    photos; both by a seeded hash order (the test split does not depend on ``val_photos``)."""
    h = int(hashlib.sha1(f"{seed}:{product_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if photo and h < 0.5:
        return "test"
    g = int(hashlib.sha1(f"val{seed}:{product_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if g < (val_photos if photo else VAL_FRACTION) else "train"


def write_combined_csv(out: Path) -> dict[str, int]:
    """One CSV over both samples with absolute image paths, a product column and a split column."""
    rows, split_by_product = [], {}
    for folder, photo in (("myntra-photos", True), ("myntra-thumbs", False)):
        with open(SHARED / folder / "styles.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                pid = row["id"]
                split = split_of(pid, photo, val_photos=VAL_PHOTOS[0])
                # a product id seen in both samples keeps the first split it got (test wins: photos come first)
                split = split_by_product.setdefault(pid, split)
                rows.append({**row, "item": f"{folder.split('-')[1]}-{pid}", "product": pid, "split": split,
                             "image": str((SHARED / folder / row["image"]).resolve())})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    return counts


def stage_data(work: Path, config) -> dict:
    from kaleido_bert.data.importers import import_csv
    from kaleido_bert.patches.extraction import extract_features

    catalogue, features = work / "catalogue", work / "features"
    info: dict = {}
    if not (catalogue / "catalogue.jsonl").is_file():
        info["csv_splits"] = write_combined_csv(work / "combined.csv")
        report = import_csv(work / "combined.csv", images=work, out=catalogue, id_col="item", product_col="product",
                            split_col="split", on_error="skip", progress=False)
        print(report.summary(), flush=True)
    if VIEWS:  # scaled training views (`kaleido data views`); the store grows by their rows
        from kaleido_bert.data.views import add_views

        info["views"] = add_views(catalogue, VIEWS[0], progress=False)
    start = time.perf_counter()
    info["features"] = extract_features(catalogue, features, config.features, seed=config.train.seed,
                                        num_workers=config.data.num_workers, progress=False)
    if info["features"]["processed"]:  # the extraction's cost, reported apart from the recipe's
        (work / "features_summary.json").write_text(json.dumps(
            {**info["features"], "stage_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return info


def _run(work: Path, config, *, guided: str | None = None):
    """The recipe's run config on the benchmark's catalogue: masking at random (the main run has no alignment
    stage), or alignment-guided by the ``align`` stage's ``guided`` alignments (an ``align.decode`` value)."""
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.patches.store import FeatureStore

    alignments = work / "align" / guided / "alignments.jsonl" if guided else None
    if alignments is not None and not alignments.is_file():
        raise SystemExit(f"alignment-guided masking reads {alignments}: run `--stages align` first")
    run = config.with_overrides({"data.catalogue": str(work / "catalogue"), "data.features": str(work / "features"),
                                 "data.alignments": str(alignments) if alignments else None,
                                 "masking.strategy": "alignment" if guided else "random"})
    store = FeatureStore(work / "features")
    return run.with_train_items(sum(it.id in store for it in load_catalogue(work / "catalogue").split("train")))


def stage_align(work: Path, config) -> dict:
    """The Attention-based Alignment Generator (paper §3.3) on the benchmark's catalogue, for the AGM arms: the
    Show-Attend-Tell captioner (``config.align``; trained once, resumes) and its alignments decoded both ways
    (``align/greedy``, the paper's generated captions, and ``align/forced``), each with its report."""
    from kaleido_bert.config import ALIGN_DECODES
    from kaleido_bert.workflows.stages import align

    run, out, info = _run(work, config), work / "align", {}
    for decode in ALIGN_DECODES:  # the first trains the captioner (unless done); every one decodes with it
        start = time.perf_counter()
        report = align(run.with_overrides({"align.decode": decode}), work / "catalogue", work / "features",
                       out / "captioner", out / decode)
        info[decode] = {"seconds": round(time.perf_counter() - start, 1), "sharpness": report["sharpness"],
                        **{k: v for k, v in report.items() if not isinstance(v, (list, dict))}}
    return info


def stage_pretrain(work: Path, config) -> dict:
    from kaleido_bert.workflows.stages import pretrain_stage

    run = _run(work, config)
    (work / "run").mkdir(parents=True, exist_ok=True)
    run.save(work / "run" / "run.yaml")  # the run describes itself (`kaleido evaluate RUN` reads it)
    summary = pretrain_stage(run, work / "run", progress=False) or {}
    return {k: v for k, v in summary.items()
            if k in ("steps", "seconds", "pairs_per_s", "final_val", "best_val", "itc_member")}


def stage_finetune(work: Path, config) -> dict:
    from kaleido_bert.workflows.stages import finetune_jobs, finetune_stage

    run, out = _run(work, config), {}
    (work / "run").mkdir(parents=True, exist_ok=True)
    run.save(work / "run" / "run.yaml")  # the fine-tuning settings too, when only this stage is re-run
    # no retrieval fine-tune: the full gallery ranks with the ITC projections trained during pre-training, and the
    # sample-100 protocol is the pre-trained ITM (the paper's), so a second 20k-pair ranking is not paid for
    for task, image_only in finetune_jobs(run, retrieval=False):
        start = time.perf_counter()
        summary = finetune_stage(run, work / "run", task, image_only, progress=False) or {}
        out[task + ("-image" if image_only else "")] = {
            "seconds": round(time.perf_counter() - start, 1),
            **{k: v for k, v in summary.items() if k in ("steps", "final_val", "best_val")}}
    return out


def stage_evaluate(work: Path, config) -> dict:
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.workflows.stages import calibrate_stage

    calibrate_stage(_run(work, config), work / "run", progress=False)  # the validation choices evaluation reads
    metrics = evaluate_run(work / "run", _run(work, config), work / "run" / "report", progress=False,
                           dataset_label="held-out Myntra photos", baseline_seeds=(0, 1, 2))
    return {"timings": metrics.get("timings")}


def stage_baseline(work: Path, config) -> dict:
    """The baseline alone (already part of ``evaluate``; re-run it after changing only the baseline)."""
    from kaleido_bert.eval.baseline import run_baseline
    from kaleido_bert.eval.baseline_report import update_report

    result = run_baseline(_run(work, config), work / "run" / "report", seeds=(0, 1, 2))
    update_report(work / "run" / "report")
    return {"seconds": result["seconds"], "image_pool": result["image_pool"]}


def stage_contrasts(work: Path, config) -> dict:
    """Pre-train, fine-tune and evaluate every arm of :data:`CONTRAST_ARMS` (resumable), then the paired
    bootstrap of each contrast into ``contrasts.json``."""
    from kaleido_bert.atomic import atomic_write_json
    from kaleido_bert.eval.bootstrap import load_outcomes, paired_bootstrap
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.workflows.stages import finetune_jobs, finetune_stage, pretrain_stage

    candidates = work / "contrasts" / "candidates.json"  # drawn once: every arm, then and later, shares it
    if not candidates.is_file():
        main_draw = work / "run" / "report" / "candidates.json"
        if not main_draw.is_file():
            raise SystemExit("run the evaluate stage first: the contrasts use its candidates")
        draw = json.loads(main_draw.read_text())
        for direction in ("itr", "tir"):
            draw[direction] = draw[direction][:CONTRAST_QUERIES]
        candidates.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(candidates, draw)
    previous = json.loads((work / "contrasts.json").read_text()) if (work / "contrasts.json").is_file() else {}
    timings: dict[str, float] = dict(previous.get("seconds", {}))
    for arm in CONTRAST_RUN_ARMS or list(CONTRAST_ARMS):
        changes = CONTRAST_ARMS[arm][1]
        root = work / "contrasts" / arm
        done = (root / "report" / "outcomes.json").is_file()
        run = _run(work, config.with_overrides({**CONTRAST_BUDGET, **changes}), guided=GUIDED_ARMS.get(arm))
        root.mkdir(parents=True, exist_ok=True)
        run.save(root / "run.yaml")
        start = time.perf_counter()
        pretrain_stage(run, root, progress=False)
        for task, image_only in finetune_jobs(run, retrieval=False, caption=False):
            finetune_stage(run, root, task, image_only, progress=False)
        if not done:
            evaluate_run(root, run, root / "report", candidates=candidates, progress=False,
                         dataset_label=f"held-out Myntra photos, arm {arm}")
            timings[arm] = round(time.perf_counter() - start, 1)
        elif arm not in timings:  # finished by a run that stopped before recording it: summed from its files
            timings[arm] = _arm_seconds(root)
        print(f"[quality] contrast arm {arm}: {timings[arm]} s", flush=True)
    results, missing = [], []
    for a, b, label in CONTRASTS:
        if not all((work / "contrasts" / x / "report" / "outcomes.json").is_file() for x in (a, b)):
            missing.append(label)
            continue
        oa, ob = (load_outcomes(work / "contrasts" / x / "report") for x in (a, b))
        for metric in CONTRAST_METRICS:
            results.append({"contrast": label, "from": a, "to": b, "metric": metric,
                            **paired_bootstrap(oa, ob, metric, resamples=2000, seed=0)})
    out = {"budget": CONTRAST_BUDGET, "arms": {k: v[0] for k, v in CONTRAST_ARMS.items()}, "seconds": timings,
           "results": results, "not_run": missing}
    atomic_write_json(work / "contrasts.json", out)
    return {"seconds": timings}


def _member_report(root: Path) -> dict | None:
    """The dual encoder's frozen member report in a run's pre-trained checkpoint (None without one)."""
    from kaleido_bert.model.itc_member import read_member_config
    from kaleido_bert.runs import latest_checkpoint

    checkpoint = latest_checkpoint(root / "pretrain")
    return None if checkpoint is None else read_member_config(checkpoint)


def _member_choice(work: Path, run) -> str:
    """The recipe line's words on the frozen member (train.probe_mix), as validation chose it."""
    found = _member_report(work / "run")
    if not run.train.itc_member or found is None:
        return ""
    grid = ", ".join(f"{g['mix']:g}: {g['mean_recall']:.1f}" for g in found["grid"])
    return (f"; the dual encoder's weight α against its frozen linear-probe member (WiSE-FT, train.probe_mix) = "
            f"{found['mix']:g}, chosen on validation full-gallery mean recall ({grid}; {found['seconds']:.0f} s)")


def _arm_seconds(root: Path) -> float:
    """An arm's wall time from what its stages recorded: pre-training (and its frozen member), each classifier's
    probe and fine-tune, and the evaluation's protocols."""
    seconds = json.loads((root / "pretrain" / "summary.json").read_text())["seconds"]
    seconds += (_member_report(root) or {}).get("seconds", 0.0)
    for part in sorted((root / "finetune").glob("*/summary.json")):
        seconds += json.loads(part.read_text())["seconds"]
        probe = part.parent / "probe.json"
        seconds += json.loads(probe.read_text())["seconds"] if probe.is_file() else 0.0
    seconds += sum(json.loads((root / "report" / "metrics.json").read_text()).get("timings", {}).values())
    return round(seconds, 1)


def _contrast_lines(work: Path) -> list[str]:
    """The Table 4 section of quality.md from ``contrasts.json`` (empty when the stage has not run)."""
    path = work / "contrasts.json"
    if not path.is_file():
        return ["## Table 4 contrasts", "", "Not run (`--stages contrasts`).", ""]
    data = json.loads(path.read_text())
    budget = ", ".join(f"{k}={v}" for k, v in data["budget"].items())
    lines = ["## Table 4 contrasts on real data (paired bootstrap, 2,000 resamples, 95% intervals)", "",
             f"Each arm is the recipe with the column's change, at a smaller budget than the main run ({budget}); "
             f"all arms are scored on the first {CONTRAST_QUERIES} queries per direction of the main run's "
             "sample-100 draw and the same test items, so the "
             "bootstrap resamples the same queries and items for both arms of a contrast. Δ = to − from, in "
             "points (macro-F1 in %). Macro-F1 here averages over the classes present in the test gold or "
             "predictions (a resample has no fixed label set), not over the whole label map as the table above, "
             "so its level is higher.", "",
             "| contrast | metric | from | to | Δ | 95% interval | direction holds? |", "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        scale = 100.0 if r["metric"].endswith("macro_f1") else 1.0
        holds = "yes" if r["low"] > 0 else "no (below)" if r["high"] < 0 else "not resolved (interval spans 0)"
        lines.append(f"| {r['contrast']} | {r['metric']} | {r['a'] * scale:.1f} | {r['b'] * scale:.1f} | "
                     f"{r['diff'] * scale:+.1f} | [{r['low'] * scale:+.1f}, {r['high'] * scale:+.1f}] | {holds} |")
    lines += ["", *[f"Not run: {label} (`--stages contrasts` trains and scores its arms)."
                    for label in data.get("not_run", [])],
              "Arm wall times (s): " + ", ".join(f"{k} {v}" for k, v in data["seconds"].items()), ""]
    return lines


def _alignment_lines(work: Path) -> list[str]:
    """The alignment generator's statistics on the real titles, greedy beside forced (empty before ``align``)."""
    from kaleido_bert.config import ALIGN_DECODES

    reports = {d: work / "align" / d / "alignment_report.json" for d in ALIGN_DECODES}
    if not all(path.is_file() for path in reports.values()):
        return []
    data = {d: json.loads(path.read_text()) for d, path in reports.items()}
    levels = [str(k) for k in data[ALIGN_DECODES[0]]["levels"]]
    lines = ["## The alignment generator on real titles (the AGM arms' alignments)", "",
             "One Show-Attend-Tell captioner trained on the train split's titles (early-stopped on validation), "
             "decoded over all 6,707 items two ways: `greedy` aligns the words of its generated caption that the "
             "title also has (the paper), `forced` feeds the real title by teacher forcing and aligns each of its "
             "content words with the attention used to predict it (`align.decode=forced`). Sharpness: the mean "
             "attention mass of the chosen patch at each level, beside a uniform map's 1/k².", "",
             "| decode | items aligned | aligned words / item | decoded words / item | "
             + " | ".join(f"mass {k}×{k} (uniform {1 / int(k) ** 2:.3f})" for k in levels) + " |",
             "|---|---|---|---|" + "---|" * len(levels)]
    for decode, r in data.items():
        mass = " | ".join(f"{r['sharpness'][k]['best_patch_mass']:.3f}" for k in levels)
        lines.append(f"| {decode} | {100 * r['coverage']:.1f}% | {r['alignments_per_item']:.2f} | "
                     f"{r['caption_words_per_item']:.1f} | {mass} |")
    return [*lines, ""]


def stage_report(work: Path, config) -> dict:
    from kaleido_bert.atomic import atomic_write_text
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.baseline_report import (
        INTERVAL_NOTE,
        baseline_intervals,
        comparison_rows,
        format_interval,
        load_baseline,
        query_bank_note,
        resolved_sign,
    )

    report = work / "run" / "report"
    catalogue = load_catalogue(work / "catalogue")  # once, for the notes on validation and views
    metrics = json.loads((report / "metrics.json").read_text())
    baseline = load_baseline(report)
    run = _run(work, config)
    timings = json.loads((work / "timings.json").read_text())
    stats = json.loads((work / "catalogue" / "stats.json").read_text())
    rows = comparison_rows(metrics, baseline)
    intervals = baseline_intervals(report, metrics)

    def fmt(v) -> str:
        return "–" if v is None else f"{v:.1f}"

    shortlist = (f" on each sample-100 list's top {run.eval.sample100_shortlist} by the dual encoder (the rest in its "
                 "order, eval.sample100_shortlist)") if run.eval.sample100_shortlist else ""

    lines = ["# Quality on held-out real products: the `real` recipe vs a frozen dual-encoder baseline", "",
             f"Catalogue: the Myntra samples of `../shared/data` ({stats['products']:,} products, "
             f"{stats['categories']} categories, {stats['subcategories']} sub-categories); splits by product "
             f"{stats['splits']}: test = half of the 1,109 full-size photos, train/val = the 5,598 thumbnails and the "
             f"other photos{_val_note(catalogue)}. No test product has an image in train or val. Test metrics are read once, "
             f"after training; no setting was chosen on them.{_views_note(catalogue)}", "",
             f"Recipe: config `{config.name}` with `{' '.join(CLI_OVERRIDES) or 'no overrides'}`: the ITC head "
             f"started from the linear probe (train.probe_init={run.train.probe_init}, model.itc_pool="
             f"{run.model.itc_pool}), pre-training {run.train.max_steps} steps × {run.train.batch_size} pairs "
             f"(train.epochs={run.train.epochs}, lr {run.train.lr:g}; the patch embedding and the new heads at "
             f"{run.train.new_lr_scale:g}× that, train.new_lr_scale){_member_choice(work, run)}, "
             f"classifiers {run.finetune.head} head "
             f"(sentence={run.finetune.sentence}, loss weights {_weights_note(run)}) with probe={run.finetune.probe} (C among {run.finetune.probe_c}, head "
             f"weight α among {run.finetune.probe_mix} against a frozen member, finetune.probe_mix, "
             f"chosen on validation: {_probe_choices(work)}) then {run.finetune.max_steps} steps × "
             f"{run.finetune.batch_size} "
             f"(finetune.epochs={run.finetune.epochs}, lr {run.finetune.lr:g}); fine-tuned parts "
             f"{run.finetune.tasks}; pair score `{run.eval.pair_score}`"
             f"{shortlist}{_query_bank_note(metrics)}; captions by retrieval "
             f"({_caption_k_note(metrics, run)}); masking random (no alignment stage); "
             f"eval.num_queries={run.eval.num_queries}, caption items={run.eval.caption_items}.", "",
             f"Baseline: image pool `{baseline['image_pool']}` (chosen on validation: "
             f"{ {k: round(v, 1) for k, v in baseline['pool_selection']['mean_recall'].items()} }), text "
             f"{baseline['text_model_from']}; mean ± std over seeds {baseline['seeds']} (classifiers are "
             "deterministic, so their spread is 0).", "",
             f"kaleido − baseline: {INTERVAL_NOTE}", "",
             "| held-out real products (%) | chance | frozen baseline | kaleido-bert (`real`) | "
             "recipe above baseline? | kaleido − baseline [95% interval] |", "|---|---|---|---|---|---|"]
    wins = []
    for label, chance, mean, std, model in rows:
        win = None if model is None or mean is None else model > mean
        wins.append((label, win))
        base = "–" if mean is None else f"{mean:.1f} ± {std:.1f}"
        lines.append(f"| {label} | {fmt(chance)} | {base} | {fmt(model)} | "
                     f"{'–' if win is None else 'yes' if win else '**no**'} | {format_interval(intervals.get(label))} |")
    losing = [label for label, win in wins if win is False]
    level = [label for label, chance, mean, std, model in rows if model is not None and mean is not None
             and abs(model - mean) < 1e-9]
    below = [label for label in losing if label not in level]
    decided = [label for label, win in wins if win is not None]
    resolved_below = [label for label in losing if label in intervals and resolved_sign(intervals[label]) < 0]
    resolved_above = [label for label, win in wins if win and label in intervals and resolved_sign(intervals[label]) > 0]
    feats = _features_summary(work)
    feature_line = (f"Feature extraction (reported apart, not part of the recipe's budget): {feats['done']:,} images "
                    f"in {feats['seconds']:.0f} s ({feats['images_per_s']:.2f} images/s, EfficientNet-Lite0 roi)."
                    if feats else "Feature extraction: not measured in this run.")
    lines += ["", ("**The recipe beats the frozen baseline on every row at this budget.**" if not losing else
                   f"**The recipe does not beat the frozen baseline on every row at this budget**: it is not above "
                   f"on {len(losing)} of {len(decided)} rows (level: {'; '.join(level) or 'none'}; below: "
                   f"{'; '.join(below) or 'none'})."),
              "", *query_bank_note(metrics, baseline),
              f"Paired intervals: the recipe is resolved above the baseline on {len(resolved_above)} of "
              f"{len(intervals)} rows with an interval ({'; '.join(resolved_above) or 'none'}) and resolved below on "
              f"{len(resolved_below)} ({'; '.join(resolved_below) or 'none'}); the others' intervals span 0.", "",
              "## Wall time per stage (2 shared CPU cores)", "",
              feature_line, "",
              "| stage | seconds |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in timings.items()],
              *[f"| evaluate: {k} | {v} |" for k, v in metrics.get("timings", {}).items()], "",
              *_contrast_lines(work),
              *_alignment_lines(work),
              f"Reproduce: `{_command(work)}` (stages resume; `--set` overrides the budget; "
              "`--stages contrasts,report` adds Table 4's contrasts).", ""]
    atomic_write_text(RESULTS / f"{RESULT[0]}.md", "\n".join(lines))
    return {"losing_rows": losing}


CLI_OVERRIDES: list[str] = []
RESULT: list[str] = ["quality"]
"""``--result NAME``: the report is ``benchmarks/results/NAME.md``."""
VAL_PHOTOS: list[float] = [VAL_FRACTION]
"""``--val-photos F``: the fraction of the non-test photo products in validation."""
VIEWS: list[int] = []
"""``--views N``: the data stage gives each training photo a view downscaled to N px (`kaleido data views`)."""

CONTRAST_RUN_ARMS: list[str] = []
"""The arms ``--arms`` names (empty: all of :data:`CONTRAST_ARMS`)."""


def _command(work: Path) -> str:
    """The command line that makes this report: the options this invocation was given."""
    parts = ["python benchmarks/bench_quality.py"]
    if work.resolve() != DEFAULT_WORK.resolve():
        parts.append(f"--work {work}")
    parts += [*(f"--views {n}" for n in VIEWS), *CLI_OVERRIDES]
    if VAL_PHOTOS[0] != VAL_FRACTION:
        parts.append(f"--val-photos {VAL_PHOTOS[0]:g}")
    if RESULT[0] != "quality":
        parts.append(f"--result {RESULT[0]}")
    return " ".join(parts)


def _val_note(catalogue) -> str:
    """How many validation items are photos (the test split's kind), from the catalogue."""
    from kaleido_bert.data.catalogue import is_view

    val = [it for it in catalogue.split("val") if not is_view(it)]
    photos = sum(it.id.startswith("photos-") for it in val)
    return f" (validation: {photos:,} photos and {len(val) - photos:,} thumbnails)"


def _query_bank_note(metrics: dict) -> str:
    """The full gallery's query-bank normalisation (``eval.query_bank_betas``), as validation chose it."""
    if "gallery/query_bank_grid" not in metrics:
        return ""
    return (f"; full-gallery scores normalised by a bank of training queries (inverted softmax, "
            f"β = {metrics['gallery/query_bank_beta']:g}, chosen on validation mean recall among β = "
            f"{metrics['gallery/query_bank_grid']}; 0 = off)")


def _caption_k_note(metrics: dict, run) -> str:
    """The consensus k of the captions, and the validation grid it was chosen from (``eval.caption_retrieval_grid``)."""
    k = metrics.get("fc/consensus/k", run.eval.caption_retrieval_k)
    if "fc/consensus/k_grid" in metrics:
        return f"k={k}, chosen on validation SumCAP among k = {metrics['fc/consensus/k_grid']}"
    return f"k={k}"


def _views_note(catalogue) -> str:
    from kaleido_bert.data.catalogue import is_view

    views = [it for it in catalogue.items if is_view(it)]
    if not views:
        return ""
    sides = sorted({it.extra["max_side"] for it in views})
    return (f" Scaled training views (`kaleido data views --max-side {', '.join(map(str, sides))}`): {len(views):,} "
            "training photos have a second row, the photo downscaled to the thumbnails' size; recipe and baseline "
            "both train on them.")


def _weights_note(run) -> str:
    """The classifiers' loss weighting per label field (finetune.class_weights; bench_class_weights.py chooses)."""
    from kaleido_bert.data.catalogue import LABEL_FIELDS

    return ", ".join(f"{field} {run.finetune.class_weights_for(field)}" for field in LABEL_FIELDS)


def _probe_choices(work: Path) -> str:
    """Each classifier's probe C and its validation accuracy / macro-F1 (%), from ``probe.json``."""
    found = []
    for record in sorted((work / "run" / "finetune").glob("*/probe.json")):
        probe = json.loads(record.read_text())
        if "c" in probe:
            member = (f", α={probe['mix']:g}" + (f" with member C={probe['frozen_c']:g}" if probe.get("frozen_c") else "")
                      if "mix" in probe else "")
            found.append(f"{record.parent.name} C={probe['c']:g}{member} ({100 * probe['val_accuracy']:.1f} / "
                         f"{100 * probe['val_macro_f1']:.1f})")
    return "; ".join(found) or "not recorded"


def _features_summary(work: Path) -> dict | None:
    path = work / "features_summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(DEFAULT_WORK))
    parser.add_argument("--config", default="real")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--views", type=int, default=0, metavar="N",
                        help="data stage: add scaled training views of N px (`kaleido data views`; 0: none)")
    parser.add_argument("--val-photos", type=float, default=VAL_FRACTION, metavar="F",
                        help="data stage: the fraction of the non-test photos in validation (thumbnails: 10%%)")
    parser.add_argument("--result", default="quality", help="the report's name under benchmarks/results/")
    parser.add_argument("--arms", default="", help="contrast arms to train and score (default: all); contrasts "
                                                   "whose two arms are not both scored are listed as not run")
    args = parser.parse_args(argv)
    unknown = [a for a in filter(None, args.arms.split(",")) if a not in CONTRAST_ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}: choose among {', '.join(CONTRAST_ARMS)}")
    CONTRAST_RUN_ARMS.extend(filter(None, args.arms.split(",")))
    from kaleido_bert.config import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.overrides)
    CLI_OVERRIDES.extend(f"--set {o}" for o in args.overrides)
    VIEWS.extend([args.views] if args.views else [])
    if not 0 <= args.val_photos < 1:
        parser.error(f"--val-photos must be in [0, 1), got {args.val_photos}")
    VAL_PHOTOS[:] = [args.val_photos]
    RESULT[:] = [args.result]
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in args.stages.split(","):
        start = time.perf_counter()
        print(f"[quality] === {stage} === {time.strftime('%H:%M:%S')}", flush=True)
        result = globals()[f"stage_{stage}"](work, config)
        timings[stage] = round(time.perf_counter() - start, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
        print(f"[quality] {stage}: {timings[stage]} s {json.dumps(result, default=str)[:2000]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
