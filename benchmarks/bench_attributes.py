"""Do the Kaleido patch features carry the attributes that tell two products apart? (paper §3.2 on the synthetic catalogue)

The cross-encoder can only learn to match "a navy shirt with a zip" against "a navy shirt with buttons" if the
features it reads distinguish them. The synthetic catalogue names every attribute it draws (``extra``: colour,
pattern, sleeves, neckline, fit, length, the small details and the trim colour), so this asks the frozen store
directly: for each attribute, a logistic regression on standardised features (``C = 0.1``, fixed for every
row, not tuned) reads one feature set and predicts the attribute of views of products it never saw
(5-fold cross-validation grouped by product over the train and validation splits; the test split is never
read). Feature sets of a store's 55 colour patches (F each):

* ``1×1``: the whole saliency box (row 0), what a single-scale image encoder sees;
* ``3×3``: the nine patches of the 3×3 grid side by side (9F), where a part is;
* ``5×5 max``: the element-wise max over the 25 finest patches (F), a detector's view of a small part.

Targets are scored by balanced accuracy against two floors: chance (1 / classes) and the **sub-category alone**
(the same classifier on its one-hot: some details are forced by the sub-category, so a feature set earns credit
only above this). Each store is extracted from the same catalogue with one setting changed, so a row compares
how much of an attribute survives each way of making the features:

* ``recipe``: the demo's features (EfficientNet-Lite0, ``roi`` over the saliency box resized to 256: an 8×8 map);
* ``roi 512``: the box resized to 512 (a 16×16 map, 4× the backbone FLOPs);
* ``crop 64``: each patch cropped and encoded on its own at the recipe's 64 px (the paper's way, at its 224 px
  in the paper).

Where both the recipe's and the cropped store are measured, their strong sets side by side (the roi 1×1 patch
and the cropped 5×5 max): whether one input can keep colour and shape. Beside them, what the pixels carry: ``pixels``, the mean RGB of each of the 55 patch boxes (165 values),
read from the images with the recipe store's boxes.

    python benchmarks/bench_attributes.py [--products 500] [--variants recipe,roi512,crop64] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

from kaleido_bert.config import load_config  # noqa: E402
from kaleido_bert.data.catalogue import load_catalogue  # noqa: E402
from kaleido_bert.data.synth import synthesize  # noqa: E402
from kaleido_bert.patches.extraction import extract_features  # noqa: E402
from kaleido_bert.patches.grid import level_slice  # noqa: E402
from kaleido_bert.patches.store import FeatureStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "attributes"
VARIANTS = {
    "recipe": {},
    "roi512": {"image_size": 512},
    "crop64": {"mode": "crop", "patch_size": 64},
}
LABELS = {"recipe": "recipe (roi 256)", "roi512": "roi 512", "crop64": "crop 64"}
SETS = ("1×1", "3×3", "5×5 max")
SINGLE = ("color", "pattern", "sleeves", "neckline", "fit", "length", "trim_color")
DETAILS = ("pocket", "buttons", "zip", "logo", "trim", "strap", "buckle")
FOLDS = 5
C = 0.1
RESAMPLES = 1000


def targets(items: list) -> dict[str, list]:
    """Per attribute, each view's value (``None`` where the attribute does not apply to its sub-category)."""
    out: dict[str, list] = {name: [] for name in (*SINGLE, *DETAILS)}
    for it in items:
        extra = it.extra
        for name in SINGLE:
            out[name].append(extra.get(name))
        for d in DETAILS:
            out[d].append(d in extra.get("details", ()))
    return out


def feature_sets(store: FeatureStore, ids: list[str]) -> dict[str, np.ndarray]:
    colour = np.stack([store[i]["colour"].numpy() for i in ids])  # (N, 55, F)
    return {"1×1": colour[:, 0], "3×3": colour[:, level_slice(3)].reshape(len(ids), -1),
            "5×5 max": colour[:, level_slice(5)].max(axis=1)}


def patch_colours(cat, store: FeatureStore, items: list) -> np.ndarray:
    """Mean RGB (0–1) of each of the 55 patch boxes in each view's image: ``(N, 165)``."""
    from PIL import Image

    out = []
    for it in items:
        pixels = np.asarray(Image.open(cat.image_path(it)).convert("RGB"), dtype=np.float32) / 255
        boxes = store[it.id]["boxes"].numpy().round().astype(int)
        out.append(np.concatenate([pixels[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)].mean(axis=(0, 1))
                                   for x1, y1, x2, y2 in boxes]))
    return np.stack(out)


def saliency_fit(store: FeatureStore, items: list) -> dict:
    """Where the saliency box falls: its IoU with the drawn object's box, the share of the object inside it, and
    how big a small attribute is against it (median and quartiles)."""
    iou, covered, small = [], [], []
    for it in items:
        sx1, sy1, sx2, sy2 = store[it.id]["saliency"].tolist()
        ox1, oy1, ox2, oy2 = it.extra["object_box"]
        inter = max(0.0, min(sx2, ox2) - max(sx1, ox1)) * max(0.0, min(sy2, oy2) - max(sy1, oy1))
        box, obj = (sx2 - sx1) * (sy2 - sy1), (ox2 - ox1) * (oy2 - oy1)
        iou.append(inter / (box + obj - inter))
        covered.append(inter / obj)
        small += [(x2 - x1) / (sx2 - sx1) for x1, _, x2, _ in (a["box"] for a in it.extra["attributes"]
                                                               if a["scale"] == "small")]
    q = lambda v: [round(float(x), 3) for x in np.percentile(v, [25, 50, 75])]  # noqa: E731
    return {"iou": q(iou), "object_covered": q(covered), "small_width_share": q(small)}


def cross_validated(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions of a standardised logistic regression, folds grouped by product."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pred = np.empty(len(y), dtype=object)
    for train, held in GroupKFold(n_splits=FOLDS).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))
        model.fit(x[train], y[train])
        pred[held] = model.predict(x[held])
    return pred


def balanced(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Balanced accuracy (%) with a 95% bootstrap interval over products."""
    from sklearn.metrics import balanced_accuracy_score

    value = 100 * balanced_accuracy_score(y, pred)
    products = np.unique(groups)
    rows = {p: np.flatnonzero(groups == p) for p in products}
    draws = []
    for _ in range(RESAMPLES):
        pick = np.concatenate([rows[p] for p in rng.choice(products, len(products))])
        if len(set(y[pick])) > 1:
            draws.append(100 * balanced_accuracy_score(y[pick], pred[pick]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return round(value, 1), round(float(lo), 1), round(float(hi), 1)


def run(products: int, variants: list[str]) -> dict:
    cfg = load_config("demo")
    catalogue_dir = CACHE / f"catalogue-{products}"
    if not (catalogue_dir / "catalogue.jsonl").is_file():
        synthesize(catalogue_dir, products=products, seed=cfg.data.synthetic_seed, val_fraction=cfg.data.val_fraction,
                   test_fraction=cfg.data.test_fraction)
    cat = load_catalogue(catalogue_dir)
    items = [it for it in cat.items if it.split != "test"]
    ids = [it.id for it in items]
    groups = np.array([it.product_id for it in items])
    subs = np.array([it.subcategory for it in items])
    labelled = {}  # attribute → (views it applies to, their values as labels), where it has two values or more
    for name, values in targets(items).items():
        keep = np.array([v is not None for v in values])
        y = np.array([str(v) for v in values])[keep]
        if len(set(y)) > 1:
            labelled[name] = (keep, y)
    rng = np.random.default_rng(0)

    def score(x: np.ndarray, name: str) -> tuple[float, float, float]:
        keep, y = labelled[name]
        return balanced(y, cross_validated(x[keep], y, groups[keep]), groups[keep], rng)

    onehot = (subs[:, None] == np.unique(subs)[None]).astype(np.float32)
    result = {"products": products, "views": len(items), "folds": FOLDS, "stores": {}, "rows": {}}
    floors = {name: {"classes": len(set(y)), "views": int(keep.sum()), "chance": round(100 / len(set(y)), 1),
                     "sub-category": score(onehot, name)} for name, (keep, y) in labelled.items()}
    result["floors"] = floors
    done_file = CACHE / f"rows-{products}.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    for variant in variants:
        store_dir = CACHE / f"store-{products}-{variant}"
        if done.get(variant, {}).get("sets") == list(SETS):  # a finished variant of an interrupted run
            result["stores"][variant] = done[variant]["store"]
            for name, row in done[variant]["rows"].items():
                result["rows"].setdefault(name, {})[variant] = row
            continue
        fcfg = replace(cfg.features, **VARIANTS[variant])
        summary = extract_features(catalogue_dir, store_dir, fcfg, progress=sys.stderr.isatty())
        result["stores"][variant] = {"features": {k: getattr(fcfg, k) for k in ("backbone", "mode", "image_size",
                                                                                 "patch_size", "saliency")},
                                     "gflops_per_image": summary["gflops_per_image"]}
        sets = feature_sets(FeatureStore(store_dir), ids)
        for name in labelled:
            result["rows"].setdefault(name, {})[variant] = {set_name: score(sets[set_name], name) for set_name in SETS}
            print(f"{variant:8s} {name:11s} " + "  ".join(
                f"{s} {result['rows'][name][variant][s][0]:5.1f}" for s in SETS), flush=True)
        done[variant] = {"sets": list(SETS), "store": result["stores"][variant],
                         "rows": {name: row[variant] for name, row in result["rows"].items()}}
        done_file.write_text(json.dumps(done))
    first = FeatureStore(CACHE / f"store-{products}-{variants[0]}")
    result["saliency"] = saliency_fit(first, items)
    pixels = patch_colours(cat, first, items)
    for name in labelled:
        floors[name]["pixels"] = score(pixels, name)
    if {"recipe", "crop64"} <= set(variants):  # each mode where it is strong: shape from roi, colour from crops
        both = np.concatenate([feature_sets(FeatureStore(CACHE / f"store-{products}-recipe"), ids)["1×1"],
                               feature_sets(FeatureStore(CACHE / f"store-{products}-crop64"), ids)["5×5 max"]], axis=1)
        for name in labelled:
            floors[name]["combined"] = score(both, name)
    return result


def render(result: dict) -> str:
    variants, floors, rows = list(result["stores"]), result["floors"], result["rows"]
    fmt = lambda c: f"{c[0]} [{c[1]}, {c[2]}]"  # noqa: E731
    sal = result.get("saliency")
    lines = [
        "# Do the patch features carry the attributes that tell products apart?",
        "",
        f"The demo's synthetic catalogue ({result['products']} products, seed 0), its {result['views']} train + "
        "validation views (the test split is never read). For each attribute, a logistic regression (standardised "
        f"features, C = {C}, not tuned) on one feature set predicts the views of held-out products "
        f"({result['folds']}-fold cross-validation grouped by product). Balanced accuracy (%) with a 95% bootstrap "
        "interval over products. Feature sets of a store's 55 colour patches: `1×1` the whole saliency box; `3×3` "
        "the nine patches of the 3×3 grid side by side; `5×5 max` the element-wise max over the 25 finest patches.",
        "",
        "## Floors: what the sub-category alone and the raw pixels give",
        "",
        "*sub-category*: the same classifier on the sub-category's one-hot (some details are forced by the "
        "sub-category, so a feature set earns credit only above this); *pixels*: the mean RGB of each of the 55 "
        "patch boxes read from the image (165 values, no network).",
        "",
        "| attribute | classes | chance | sub-category | pixels |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {fl['classes']} | {fl['chance']} | {fmt(fl['sub-category'])} | {fmt(fl['pixels'])} |"
              for name, fl in floors.items()]
    for v in variants:
        f = result["stores"][v]["features"]
        how = (f"`roi`: the saliency box resized to {f['image_size']} px, encoded once (and once greyed), patches pooled from the "
               "feature map by `roi_align`" if f["mode"] == "roi" else
               f"`crop`: each of the 74 patches cropped, resized to {f['patch_size']} px and encoded on its own")
        lines += ["", f"## {LABELS[v]}", "", f"{f['backbone']}, {how}; "
                  f"{result['stores'][v]['gflops_per_image']} backbone GFLOPs per image.", "",
                  "| attribute | " + " | ".join(SETS) + " |", "|---|" + "---|" * len(SETS)]
        lines += [f"| {name} | " + " | ".join(fmt(rows[name][v][s]) for s in SETS) + " |" for name in floors]
    if all("combined" in fl for fl in floors.values()):
        lines += ["", "## Both: the roi 1×1 patch beside the cropped 5×5 max", "",
                  "The two stores' strong sets side by side (2F): does one input keep colour and shape?", "",
                  "| attribute | roi 256: 1×1 | crop 64: 5×5 max | both |", "|---|---|---|---|"]
        lines += [f"| {name} | {fmt(rows[name]['recipe']['1×1'])} | {fmt(rows[name]['crop64']['5×5 max'])} | "
                  f"{fmt(fl['combined'])} |" for name, fl in floors.items()]
    if sal:
        lines += ["", f"Where the saliency box falls (recipe store, quartiles): IoU with the drawn object's box "
                  f"{sal['iou']}, share of the object inside it {sal['object_covered']}; a small attribute's width "
                  f"as a share of the box's {sal['small_width_share']} (a 5×5 cell is 0.2)."]
    lines += ["", "Reproduce: `python benchmarks/bench_attributes.py` (`--render-only` rewrites this file from the "
              "JSON)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=500)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        result = json.loads((RESULTS / "attributes.json").read_text())
    else:
        variants = args.variants.split(",")
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose among {sorted(VARIANTS)}")
        result = run(args.products, variants)
    result.setdefault("machine", machine())
    write_result("attributes", result, render(result))


if __name__ == "__main__":
    main()
