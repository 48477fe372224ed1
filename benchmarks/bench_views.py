"""Scaled training views on the held-out photos: the frozen baseline trained with and without them.

``kaleido data views CAT --max-side 80`` (:mod:`kaleido_bert.data.views`) gives each training photo a second row,
the photo downscaled to the thumbnails' size. The decision to offer it was made on the non-test photos
(``results/resolution.md``, "both views trained"); this benchmark reports its effect on the quality benchmark's
**test** split once, for the frozen dual-encoder baseline of ``kaleido baseline`` (3 projection seeds), on the
same test items and candidates with and without the views. Each difference has a paired bootstrap 95% interval
over the test queries and items (the seeds' mean outcome per query, as ``quality.md``).

Needs ``bench_quality.py --stages data`` first; copies its catalogue, adds the views and extracts the copy's own
store (every image, so the benchmark's store stays as it is).

    python benchmarks/bench_views.py [--max-side 80] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / ".cache" / "quality"
WORK = ROOT / "benchmarks" / ".cache" / "views"
SEEDS = (0, 1, 2)
LABELS = {
    "sample100/SumR": "sample-100 SumR (baseline's own ITC scores)",
    "itr_gallery/mean_recall": "full gallery mean recall, ITR",
    "tir_gallery/mean_recall": "full gallery mean recall, TIR",
    "cr/image+text/accuracy": "CR ACC, image + text", "cr/image+text/macro_f1": "CR macro-F1, image + text",
    "cr/image/accuracy": "CR ACC, image only", "cr/image/macro_f1": "CR macro-F1, image only",
    "sub/image+text/accuracy": "SUB ACC, image + text", "sub/image+text/macro_f1": "SUB macro-F1, image + text",
    "sub/image/accuracy": "SUB ACC, image only", "sub/image/macro_f1": "SUB macro-F1, image only",
}


def prepare(max_side: int) -> dict:
    """A copy of the benchmark's catalogue (images hard-linked) with the views added, and its own store (resumes)."""
    from kaleido_bert.config import load_config
    from kaleido_bert.data.views import add_views
    from kaleido_bert.patches.extraction import extract_features

    if not (QUALITY / "features" / "manifest.json").is_file():
        raise SystemExit("run `python benchmarks/bench_quality.py --stages data` first")
    catalogue, features = WORK / "catalogue", WORK / "features"
    if not (catalogue / "catalogue.jsonl").is_file():
        shutil.rmtree(catalogue, ignore_errors=True)
        shutil.copytree(QUALITY / "catalogue", catalogue, copy_function=os.link)
    views = add_views(catalogue, max_side, progress=False)
    start = time.perf_counter()
    config = load_config("real")
    summary = extract_features(catalogue, features, config.features, seed=config.train.seed,
                               num_workers=config.data.num_workers, progress=False)
    return {"views": views, "extracted": summary["processed"], "seconds": round(time.perf_counter() - start, 1)}


def baseline(arm: str, catalogue: Path, features: Path, candidates: Path | None) -> dict:
    from kaleido_bert.config import load_config
    from kaleido_bert.eval.baseline import run_baseline

    out = WORK / arm
    if (out / "baseline.json").is_file():
        return json.loads((out / "baseline.json").read_text())
    config = load_config("real", [f"data.catalogue={catalogue}", f"data.features={features}"])
    return run_baseline(config, out, seeds=SEEDS, candidates=candidates)


def _spread(std: float) -> str:
    """The seeds' spread where there is one (the classifiers are deterministic: std 0 up to rounding)."""
    return f" ± {std:.1f}" if std >= 0.05 else ""


def render(payload: dict) -> str:
    rows = ["| held-out test photos (%) | without views | with views | Δ [95% interval] |", "|---|---|---|---|"]
    for metric, label in LABELS.items():
        d = payload["diffs"].get(metric)
        if d is None:
            continue
        scale = 100.0 if metric.endswith("macro_f1") else 1.0  # macro-F1 is a fraction; shown in %, as quality.md
        a, b = (scale * payload[arm]["mean"][metric] for arm in ("without", "with"))
        sa, sb = (scale * payload[arm]["std"][metric] for arm in ("without", "with"))
        low, diff, high = (scale * d[k] for k in ("low", "diff", "high"))
        rows.append(f"| {label} | {a:.1f}{_spread(sa)} | {b:.1f}{_spread(sb)} | {diff:+.1f} [{low:+.1f}, {high:+.1f}] |")
    cap = "fc/nearest/sum_cap"
    if cap in payload["without"]["mean"]:
        rows.append(f"| captions SumCAP, nearest training description | {payload['without']['mean'][cap]:.1f} ± "
                    f"{payload['without']['std'][cap]:.1f} | {payload['with']['mean'][cap]:.1f} ± "
                    f"{payload['with']['std'][cap]:.1f} | – |")
    v = payload["prepare"]["views"]
    return "\n".join([
        "# Scaled training views: the frozen baseline with and without them, on the held-out test photos", "",
        f"The quality benchmark's catalogue (`quality.md`: 573 held-out full-size photos as the test split) with "
        f"`kaleido data views --max-side {v['max_side']}`: {v['views']} training photos get a second row, the photo "
        f"downscaled to the thumbnails' size ({v['too_small']} training images are not larger and get none). "
        "The frozen dual-encoder baseline (`kaleido baseline`, 3 projection seeds, mean ± std) is trained on each "
        "catalogue and scored on the same test items and sample-100 candidates; Δ is with − without, with a "
        "paired bootstrap 95% interval (2,000 resamples) over the test queries and items (the seeds' mean "
        "outcome per query). Macro-F1 in the Δ column averages over the classes present in each resample.", "",
        "The views were chosen on the non-test photos (`resolution.md`); this is the one reading of the test split "
        "for them.", "",
        *rows, "",
        f"Wall time: views and their features {payload['prepare']['seconds']} s; baseline "
        f"{payload['without']['seconds']} s without, {payload['with']['seconds']} s with the views "
        f"({payload['machine'].get('cpu', '')}).", "",
        "Reproduce: `python benchmarks/bench_quality.py --stages data`, then `python benchmarks/bench_views.py`.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-side", type=int, default=80)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        payload = json.loads((RESULTS / "views.json").read_text())
        write_result("views", payload, render(payload))
        return
    from kaleido_bert.eval.bootstrap import available_metrics, load_outcomes, paired_bootstrap

    WORK.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args.max_side)
    print(json.dumps(prepared), flush=True)
    without = baseline("without", QUALITY / "catalogue", QUALITY / "features", None)
    with_views = baseline("with", WORK / "catalogue", WORK / "features", WORK / "without" / "candidates.json")
    a = load_outcomes(WORK / "without" / "baseline-outcomes.json")
    b = load_outcomes(WORK / "with" / "baseline-outcomes.json")
    diffs = {m: paired_bootstrap(a, b, m) for m in available_metrics(a) if m in LABELS}
    keep = ("mean", "std", "seconds", "image_pool")
    payload = {"machine": machine(), "prepare": prepared, "diffs": diffs,
               "without": {k: without[k] for k in keep}, "with": {k: with_views[k] for k in keep}}
    write_result("views", payload, render(payload))


if __name__ == "__main__":
    main()
