"""Photos against thumbnails: does matching the photos' resolution to the training images' help (``features.max_side``)?

The Myntra training data is 90% 60×80 thumbnails; the benchmark's test photos are 240×320 (paper §3.2's patches of
an image, but a different source). This measures, on the **non-test** photos only (the test split is never read),
what frozen probes trained on the store's features score on photos whose features were extracted at their own size
(``max_side`` 1024, the default) or downscaled to the thumbnails' longer side (``max_side`` 80), two settings:

* ``thumbnails only``: probes trained on the train split's thumbnails, scored on all non-test photos (a catalogue
  whose training images are all of another kind than its queries);
* ``thumbnails + photos``: 2-fold over the non-test photos, probes trained on the thumbnails and one half of the
  photos, scored on the other half (as the benchmark trains: some photos among the training images).

The probes are the frozen baseline's (:mod:`kaleido_bert.model.linear_probe`): mean-pooled patch features and the
frozen MiniLM text, standardised on their training rows; logistic regression (C = 1) for CR / SUB, the InfoNCE
projections (3 seeds) for retrieval among the scored photos (mean of R@1/5/10, ties at their expected rank).
Each difference has a paired bootstrap 95% interval over the photos (2,000 resamples).

Needs ``bench_quality.py --stages data`` (the thumbnails' store) first; extracts the photos twice (~1 min each).

    python benchmarks/bench_resolution.py [--render-only]
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

from kaleido_bert.config import load_config  # noqa: E402
from kaleido_bert.data.catalogue import label_map, load_catalogue  # noqa: E402
from kaleido_bert.data.label_scores import classification_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".cache" / "quality"
OUT = ROOT / "benchmarks" / ".cache" / "resolution"
SIDES = {"native": 1024, "thumbnail-sized": 80}
RESAMPLES = 2000


def photo_stores() -> dict[str, Path]:
    """The non-test photos as a catalogue, extracted at each of :data:`SIDES` (resumable)."""
    from kaleido_bert.data.importers import import_csv
    from kaleido_bert.patches.extraction import extract_features

    combined = WORK / "combined.csv"
    if not (WORK / "features" / "manifest.json").is_file():
        raise SystemExit("run `python benchmarks/bench_quality.py --stages data` first (the thumbnails' store)")
    with open(combined, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["item"].startswith("photos-") and r["split"] != "test"]
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "catalogue" / "catalogue.jsonl").is_file():
        with open(OUT / "photos.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        import_csv(OUT / "photos.csv", images=OUT, out=OUT / "catalogue", id_col="item", product_col="product",
                   split_col="split", on_error="skip", progress=False)
    stores = {}
    for name, side in SIDES.items():
        config = load_config("real", [f"features.max_side={side}"]).features
        summary = extract_features(OUT / "catalogue", OUT / f"features-{side}", config, num_workers=2, progress=False)
        print(f"[resolution] {name}: {summary['done']} photos ({summary['processed']} extracted now)", flush=True)
        stores[name] = OUT / f"features-{side}"
    return stores


def interval(delta: np.ndarray, boot: np.ndarray) -> list[float]:
    """Mean and paired bootstrap 95% interval of per-photo differences, in points."""
    lo, hi = np.percentile(delta[boot].mean(1) * 100, [2.5, 97.5])
    return [round(100 * float(delta.mean()), 2), round(float(lo), 2), round(float(hi), 2)]


def mean_recall(sim: np.ndarray) -> np.ndarray:
    """Per query (row) of a square similarity matrix whose diagonal holds the match: mean of R@1/5/10 ``(Q,)``."""
    diag = np.diag(sim)[:, None]
    ranks = (sim > diag).sum(1) + 0.5 * ((sim == diag).sum(1) - 1)  # ties at their expected rank
    return np.stack([ranks < k for k in (1, 5, 10)], 1).mean(1)


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    from kaleido_bert.data.tokenizer import resolve_bert_dir
    from kaleido_bert.model.linear_probe import image_features, standardiser, text_features, train_projection
    from kaleido_bert.patches.store import FeatureStore

    torch.set_num_threads(2)
    stores = {name: FeatureStore(path) for name, path in photo_stores().items()}
    catalogue = load_catalogue(WORK / "catalogue")
    store = FeatureStore(WORK / "features")
    thumbs = [it for it in catalogue.items if it.split == "train" and it.id.startswith("thumbs-") and it.id in store]
    photos = load_catalogue(OUT / "catalogue").items
    ids = [it.id for it in photos]
    bert = resolve_bert_dir("minilm")
    x_thumbs = image_features(store, [it.id for it in thumbs], "mean")
    x_photos = {name: image_features(s, ids, "mean") for name, s in stores.items()}
    t_thumbs = text_features([it.description for it in thumbs], bert, max_len=64)
    t_photos = text_features([it.description for it in photos], bert, max_len=64)
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(ids), (RESAMPLES, len(ids)))
    half = rng.permutation(len(ids)) % 2
    settings = {"thumbnails only": [(np.zeros(0, int), np.arange(len(ids)))],
                "thumbnails + photos": [(np.flatnonzero(half != k), np.flatnonzero(half == k)) for k in (0, 1)]}
    results: dict[str, dict] = {}
    for setting, folds in settings.items():
        correct: dict[tuple[str, str], np.ndarray] = {}
        recalls: dict[tuple[str, str], np.ndarray] = {}
        for name in SIDES:
            for train_rows, test_rows in folds:
                x_tr = np.concatenate([x_thumbs, x_photos[name][train_rows]])
                t_tr = np.concatenate([t_thumbs, t_photos[train_rows]])
                (mu, sd), (tmu, tsd) = standardiser(x_tr), standardiser(t_tr)
                x_tr, t_tr = (x_tr - mu) / sd, (t_tr - tmu) / tsd
                x_te, t_te = (x_photos[name][test_rows] - mu) / sd, (t_photos[test_rows] - tmu) / tsd
                labelled = thumbs + [photos[i] for i in train_rows]
                for field, short in (("category", "CR"), ("subcategory", "SUB")):
                    label2id = label_map(catalogue.labels, field)
                    y = np.array([label2id[getattr(it, field)] for it in labelled])
                    gold = np.array([label2id[getattr(photos[i], field)] for i in test_rows])
                    for source in ("image", "image + text"):
                        f_tr = x_tr if source == "image" else np.concatenate([x_tr, t_tr], 1)
                        f_te = x_te if source == "image" else np.concatenate([x_te, t_te], 1)
                        pred = LogisticRegression(C=1.0, max_iter=300).fit(f_tr, y).predict(f_te)
                        key = (name, f"{short} ACC, {source}")
                        correct.setdefault(key, np.zeros(len(ids)))[test_rows] = pred == gold
                        f1 = classification_metrics(gold, pred, len(label2id))["macro_f1"]
                        results.setdefault(setting, {}).setdefault(f"{short} macro-F1, {source}", {}).setdefault(
                            name, []).append(round(100 * f1, 2))
                for seed in (0, 1, 2):
                    model, _ = train_projection(x_tr, t_tr, seed=seed)
                    with torch.no_grad():
                        img = model.embed(torch.from_numpy(x_te).float(), "image").numpy()
                        txt = model.embed(torch.from_numpy(t_te).float(), "text").numpy()
                    for direction, sim in (("ITR", img @ txt.T), ("TIR", txt @ img.T)):
                        key = (name, f"{direction} mean recall (gallery of the scored photos)")
                        recalls.setdefault(key, np.zeros(len(ids)))[test_rows] += mean_recall(sim) / 3
            print(f"[resolution] {setting}: {name} done", flush=True)
        for outcomes in (correct, recalls):
            for metric in dict.fromkeys(m for _, m in outcomes):
                a, b = outcomes[("native", metric)], outcomes[("thumbnail-sized", metric)]
                results[setting][metric] = {"native": round(100 * float(a.mean()), 2),
                                            "thumbnail-sized": round(100 * float(b.mean()), 2),
                                            "delta": interval(b - a, boot)}
    payload = {"machine": machine(), "photos": len(ids), "thumbnails": len(thumbs), "results": results}
    write_result("resolution", payload, render(payload))


def render(payload: dict) -> str:
    """The markdown of a result: per setting, accuracies and recalls with intervals, then the macro-F1s."""
    results = payload["results"]
    lines = ["# Photos against thumbnails: features at the photos' own size or the thumbnails' (`features.max_side`)",
             "", f"{payload['photos']} non-test Myntra photos (240×320), scored by frozen probes trained on "
             f"{payload['thumbnails']:,} "
             "train-split thumbnails (60×80), alone or with the other half of the photos (2-fold); the photos' "
             "features extracted at max_side 1024 (their own size) or 80 (the thumbnails' longer side). Δ = "
             "thumbnail-sized − native, in points, with a paired bootstrap 95% interval over the photos "
             f"({RESAMPLES:,} resamples). Macro-F1 is per fold over the label map (no interval). No test photo is read.",
             ""]
    for setting, metrics in results.items():
        lines += [f"## Trained on {setting}", "", "| metric | native | thumbnail-sized | Δ [95% interval] |",
                  "|---|---|---|---|"]
        for metric, row in sorted(metrics.items(), key=lambda kv: "delta" not in kv[1]):
            if "delta" in row:
                d = row["delta"]
                lines.append(f"| {metric} | {row['native']:.1f} | {row['thumbnail-sized']:.1f} | "
                             f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] |")
            else:
                lines.append(f"| {metric} | {' / '.join(f'{v:.1f}' for v in row['native'])} | "
                             f"{' / '.join(f'{v:.1f}' for v in row['thumbnail-sized'])} | – |")
        lines.append("")
    lines.append("Reproduce: `python benchmarks/bench_quality.py --stages data`, then "
                 "`python benchmarks/bench_resolution.py` (`--render-only` rewrites this file from the JSON).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--render-only" in sys.argv[1:]:
        data = json.loads((RESULTS / "resolution.json").read_text())
        write_result("resolution", data, render(data))
    else:
        main()
