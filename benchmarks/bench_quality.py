"""Quality on real products: the `real` recipe against the frozen dual-encoder baseline (issue 13, item 3).

Data: the two Myntra samples of ``../shared/data`` (1,109 full-size photos, 5,598 thumbnails; disjoint ids). Half
of the photos' products (a seeded hash order) are the **test** split; every other product (the thumbnails and the
other photos) is train or validation (10% of them). Splits are by product id, so a product that has an image in
the test split has none in training. Settings are chosen on the validation split only; the test split is read
once, by the final evaluation.

Stages (each skipped when its output is complete, so the script resumes): ``data`` (combined CSV → catalogue →
feature store with the preset's backbone), ``pretrain`` / ``finetune`` (the recipe), ``evaluate`` (the model's
protocols on the test split), ``baseline`` (3 seeds, the same candidates) and the report,
``benchmarks/results/quality.md``.

    python benchmarks/bench_quality.py [--work DIR] [--set train.max_steps=…] [--stages data,...]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("data", "pretrain", "finetune", "evaluate", "baseline", "report")


def split_of(product_id: str, photo: bool, seed: int = 0) -> str:
    """Test = half of the photo products; validation = 10% of the rest; both by a seeded hash order."""
    h = int(hashlib.sha1(f"{seed}:{product_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if photo and h < 0.5:
        return "test"
    g = int(hashlib.sha1(f"val{seed}:{product_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if g < 0.1 else "train"


def write_combined_csv(out: Path) -> dict[str, int]:
    """One CSV over both samples with absolute image paths, a product column and a split column."""
    rows, split_by_product = [], {}
    for folder, photo in (("myntra-photos", True), ("myntra-thumbs", False)):
        with open(SHARED / folder / "styles.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                pid = row["id"]
                split = split_of(pid, photo)
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
    info["features"] = extract_features(catalogue, features, config.features, seed=config.train.seed,
                                        num_workers=config.data.num_workers, progress=False)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "quality"))
    parser.add_argument("--config", default="real")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args(argv)
    from kaleido_bert.config import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.overrides)
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
