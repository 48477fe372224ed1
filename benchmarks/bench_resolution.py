"""Photos against thumbnails: does matching the photos' resolution to the training images' help (``features.max_side``)?

The Myntra training data is 90% 60×80 thumbnails; the benchmark's test photos are 240×320 (paper §3.2's patches of
an image, but a different source). This measures, on the **non-test** photos only (the test split is never read),
what frozen probes trained on the store's features score on photos whose features were extracted at their own size
(``max_side`` 1024, the default) or downscaled to the thumbnails' longer side (``max_side`` 80), or both views
(:data:`ARMS`), in two settings:

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
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

from kaleido_bert.config import load_config  # noqa: E402
from kaleido_bert.data.catalogue import label_map, load_catalogue  # noqa: E402
from kaleido_bert.data.label_scores import classification_metrics  # noqa: E402
from kaleido_bert.eval.metrics import rank_hits  # noqa: E402

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
    """Per query (row) of a square similarity matrix whose diagonal holds the match: the mean of P(rank ≤ K) over
    K = 1, 5, 10 ``(Q,)`` (the evaluation's :func:`~kaleido_bert.eval.metrics.rank_hits`, ties at their expected
    rank)."""
    per_query: list[np.ndarray] = []
    rank_hits(sim, np.eye(len(sim), dtype=bool), (1, 5, 10), per_query_out=per_query)
    return per_query[0].mean(1)


ARMS = {  # arm → (views of the training photos, views of a scored photo, averaged)
    "native": (("native",), ("native",)),
    "thumbnail-sized": (("thumbnail-sized",), ("thumbnail-sized",)),
    "both views scored": (("native",), ("native", "thumbnail-sized")),
    "both views trained": (("native", "thumbnail-sized"), ("native",)),
    "both trained and scored": (("native", "thumbnail-sized"), ("native", "thumbnail-sized")),
}
"""Arms of the measurement. A photo scored in two views gets the mean of the two views' class probabilities or
image embeddings; a training photo in two views is two training rows. Without training photos (``thumbnails
only``) the last two arms are the first and third, and are left out."""


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
    fields = {"category": "CR", "subcategory": "SUB"}
    results: dict[str, dict] = {}
    for setting, folds in settings.items():
        arms = [a for a in ARMS if setting != "thumbnails only" or len(ARMS[a][0]) == 1]
        predictions: dict[tuple[str, str], np.ndarray] = {}  # (arm, "SUB, image") → (N,) predicted label
        recalls: dict[tuple[str, str], np.ndarray] = {}  # (arm, "ITR") → (N,) mean of R@1/5/10 over 3 seeds
        for arm in arms:
            train_views, scored_views = ARMS[arm]
            for train_rows, test_rows in folds:
                x_tr = np.concatenate([x_thumbs, *(x_photos[v][train_rows] for v in train_views)])
                t_tr = np.concatenate([t_thumbs, *(t_photos[train_rows] for _ in train_views)])
                labelled = thumbs + [photos[i] for i in train_rows] * len(train_views)
                (mu, sd), (tmu, tsd) = standardiser(x_tr), standardiser(t_tr)
                x_tr, t_tr = (x_tr - mu) / sd, (t_tr - tmu) / tsd
                x_te = [(x_photos[v][test_rows] - mu) / sd for v in scored_views]
                t_te = (t_photos[test_rows] - tmu) / tsd
                for field, short in fields.items():
                    label2id = label_map(catalogue.labels, field)
                    y = np.array([label2id[getattr(it, field)] for it in labelled])
                    for source in ("image", "image + text"):
                        clf = LogisticRegression(C=1.0, max_iter=300).fit(inputs(source, x_tr, t_tr), y)
                        probs = np.mean([clf.predict_proba(inputs(source, x, t_te)) for x in x_te], 0)
                        key = (arm, f"{short}, {source}")
                        predictions.setdefault(key, np.zeros(len(ids), int))[test_rows] = clf.classes_[probs.argmax(1)]
                for seed in (0, 1, 2):
                    model, _ = train_projection(x_tr, t_tr, seed=seed)
                    with torch.no_grad():
                        img = np.mean([model.embed(torch.from_numpy(x).float(), "image").numpy() for x in x_te], 0)
                        txt = model.embed(torch.from_numpy(t_te).float(), "text").numpy()
                    for direction, sim in (("ITR", img @ txt.T), ("TIR", txt @ img.T)):
                        recalls.setdefault((arm, direction), np.zeros(len(ids)))[test_rows] += mean_recall(sim) / 3
            print(f"[resolution] {setting}: {arm} done", flush=True)
        rows: dict[str, dict] = {}
        for field, short in fields.items():
            label2id = label_map(catalogue.labels, field)
            gold = np.array([label2id[getattr(it, field)] for it in photos])
            for source in ("image", "image + text"):
                base = predictions[("native", f"{short}, {source}")] == gold
                for arm in arms:
                    pred = predictions[(arm, f"{short}, {source}")]
                    rows.setdefault(f"{short} ACC, {source}", {})[arm] = cell(pred == gold, base, boot)
                    rows.setdefault(f"{short} macro-F1, {source}", {})[arm] = {
                        "value": round(classification_metrics(gold, pred, len(label2id))["macro_f1"] * 100, 2)}
        for direction in ("ITR", "TIR"):
            for arm in arms:
                rows.setdefault(f"{direction} mean recall", {})[arm] = cell(
                    recalls[(arm, direction)], recalls[("native", direction)], boot)
        results[setting] = rows
    payload = {"machine": machine(), "photos": len(ids), "thumbnails": len(thumbs), "arms": list(ARMS),
               "results": results}
    write_result("resolution", payload, render(payload))


def inputs(source: str, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """A classifier's input rows: the image features, or the image and text features side by side."""
    return image if source == "image" else np.concatenate([image, text], 1)


def cell(outcome: np.ndarray, base: np.ndarray, boot: np.ndarray) -> dict:
    """An arm's per-photo outcomes ``(N,)``: its mean and its paired difference to the native arm, in points."""
    outcome, base = outcome.astype(np.float64), base.astype(np.float64)
    return {"value": round(100 * float(outcome.mean()), 2), "delta": interval(outcome - base, boot)}


def render(payload: dict) -> str:
    """The markdown of a result: per setting, one row per metric and one column per arm."""
    lines = ["# Photos against thumbnails: the photos' own size, the thumbnails' (`features.max_side`), or both",
             "", f"{payload['photos']} non-test Myntra photos (240×320), scored by frozen probes trained on "
             f"{payload['thumbnails']:,} train-split thumbnails (60×80), alone or with the other half of the photos "
             "(2-fold); a photo's features extracted at max_side 1024 (its own size, *native*) or 80 (the thumbnails' "
             "longer side, *thumbnail-sized*). Two views scored: the mean of their class probabilities or image "
             "embeddings; two views trained: each training photo is two rows. Each cell: the value, then Δ to "
             f"*native* with a paired bootstrap 95% interval over the photos ({RESAMPLES:,} resamples); macro-F1 "
             "(over the label map, both folds' predictions pooled) has no interval. Recall: mean of R@1/5/10 in a "
             "gallery of the scored photos, 3 projection seeds. No test photo is read.", ""]
    for setting, rows in payload["results"].items():
        arms = list(next(iter(rows.values())))
        lines += [f"## Trained on {setting}", "", "| metric | " + " | ".join(arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for metric, cells in rows.items():
            texts = []
            for arm in arms:
                c = cells[arm]
                d = c.get("delta")
                texts.append(f"{c['value']:.1f}" if d is None or arm == "native" else
                             f"{c['value']:.1f} ({d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}])")
            lines.append(f"| {metric} | " + " | ".join(texts) + " |")
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
