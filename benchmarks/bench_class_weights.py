"""Which classifier loss weighting (``finetune.class_weights``) the `real` recipe uses, chosen by cross-validation.

A catalogue's coarse categories are few and very uneven (Myntra: 2,876 training apparel items, 10 sporting goods,
20 free items), and its validation split holds one or two items of the rare ones, so the validation split alone
cannot tell the weightings apart (every setting is within one item on it). This script pools the training and
validation splits of a quality run's work directory (``bench_quality.py --work``), splits them into ``--folds``
folds by product (sklearn's ``StratifiedGroupKFold``: a product's photo and thumbnail stay in one fold), and
scores every setting of the linear probe that the recipe's fine-tuning starts from
(:func:`kaleido_bert.train.probe.fit_linear` on the pre-trained encoder's frozen head inputs, as ``fit_probe``):
each weighting (``none``, ``sqrt``, ``balanced``, :func:`kaleido_bert.train.finetune.class_weights`) × the probe
C grid × the head weight α against the frozen member × the member's C, on the out-of-fold predictions of all
pooled items (accuracy + macro-F1 over the label map, as the probe chooses). The test split is never read.

Per weighting it reports the best setting and the mean over the grid, so the choice does not rest on one lucky
setting. The head inputs are cached in ``WORK/class_weights/TASK.npz``.

    python benchmarks/bench_class_weights.py --work benchmarks/.cache/quality-photoval [--tasks category,category-image]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from kaleido_bert.config.loading import load_config  # noqa: E402
from kaleido_bert.config.recipe import CLASS_WEIGHTS  # noqa: E402
from kaleido_bert.data.label_scores import classification_metrics  # noqa: E402
from kaleido_bert.data.tokenizer import load_tokenizer  # noqa: E402
from kaleido_bert.runs import resolve_checkpoint  # noqa: E402
from kaleido_bert.train.finetune import build_task, class_weights, finetune_config  # noqa: E402
from kaleido_bert.train.probe import fit_linear, head_features, log_probs  # noqa: E402


def head_inputs(work: Path, job: str) -> dict[str, np.ndarray]:
    """The pre-trained encoder's frozen head inputs of the train and val splits of one classifier job, cached."""
    cache = work / "class_weights" / f"{job}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    task, image_only = job.removesuffix("-image"), job.endswith("-image")
    config = load_config(work / "run" / "run.yaml", ["finetune.class_weights=none"])
    checkpoint = resolve_checkpoint(work / "run" / "pretrain")
    model, train_set, val_set, collate_fn, _ = build_task(task, finetune_config(config, task), checkpoint,
                                                         load_tokenizer(checkpoint), image_only=image_only)
    out: dict[str, np.ndarray] = {"start": np.array(model.frozen_start if model.frozen_member else 0),
                                  "num_labels": np.array(model.config.num_labels)}
    for name, dataset in (("train", train_set), ("val", val_set)):
        x, y = head_features(model, dataset, collate_fn, batch_size=config.eval.batch_size,
                             device=torch.device("cpu"), desc=f"{job} {name}")
        out |= {f"{name}_x": x, f"{name}_y": y, f"{name}_group": np.array([it.product_id for it in dataset.items])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def cross_validate(data: dict[str, np.ndarray], c_values: list[float], mixes: list[float], folds: int,
                   seed: int) -> list[dict]:
    """Out-of-fold accuracy, macro-F1 and errors of every (weighting, C, α, member C) on train ∪ val."""
    from sklearn.model_selection import StratifiedGroupKFold

    x = np.concatenate([data["train_x"], data["val_x"]])
    y = np.concatenate([data["train_y"], data["val_y"]])
    groups = np.concatenate([data["train_group"], data["val_group"]])
    start, num_labels = int(data["start"]), int(data["num_labels"])
    splits = list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups))
    rows = []
    for kind in CLASS_WEIGHTS:
        heads = {c: np.zeros((len(y), num_labels)) for c in c_values}
        members = {c: np.zeros((len(y), num_labels)) for c in c_values}
        for fit_rows, held in splits:
            weight = None if kind == "none" else class_weights(y[fit_rows].tolist(), num_labels, kind)
            for c in c_values:
                heads[c][held] = log_probs(x[held], fit_linear(x[fit_rows], y[fit_rows], num_labels,
                                                               class_weight=weight, c=c))
                if start:
                    members[c][held] = log_probs(x[held, start:], fit_linear(
                        x[fit_rows, start:], y[fit_rows], num_labels, class_weight=weight, c=c))
        settings = [(c, 1.0, None) for c in c_values]
        settings += [(c, m, mc) for m in mixes if m < 1 and start for c in c_values for mc in c_values]
        for c, mix, member_c in settings:
            logp = heads[c] if member_c is None else mix * heads[c] + (1 - mix) * members[member_c]
            predicted = logp.argmax(1)
            scores = classification_metrics(y, predicted, num_labels)
            rows.append({"weights": kind, "c": c, "mix": mix, "member_c": member_c, "accuracy": scores["accuracy"],
                         "macro_f1": scores["macro_f1"], "errors": int((predicted != y).sum()), "items": len(y)})
        print(f"[class weights] {kind}: {len(settings)} settings scored", flush=True)
    return rows


def summarise(job: str, rows: list[dict]) -> tuple[dict, str]:
    """Per weighting: the best setting (accuracy + macro-F1, the first on a tie) and the grid's mean."""
    lines = [f"### {job}", "", "| weighting | best setting (C, α, member C) | accuracy | macro-F1 | errors | "
             "grid mean accuracy | grid mean macro-F1 |", "|---|---|---|---|---|---|---|"]
    best_of = {}
    for kind in CLASS_WEIGHTS:
        mine = [r for r in rows if r["weights"] == kind]
        best = max(mine, key=lambda r: r["accuracy"] + r["macro_f1"])  # max keeps the first on a tie
        best_of[kind] = best
        lines.append(f"| {kind} | {best['c']}, {best['mix']}, {best['member_c']} | {100 * best['accuracy']:.2f} | "
                     f"{100 * best['macro_f1']:.1f} | {best['errors']} / {best['items']} | "
                     f"{100 * np.mean([r['accuracy'] for r in mine]):.2f} | "
                     f"{100 * np.mean([r['macro_f1'] for r in mine]):.1f} |")
    chosen = max(CLASS_WEIGHTS, key=lambda k: best_of[k]["accuracy"] + best_of[k]["macro_f1"])
    lines += ["", f"Chosen: **{chosen}**.", ""]
    return {"chosen": chosen, "best": best_of}, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench_quality.py work directory")
    parser.add_argument("--tasks", default="category,category-image", help="classifier jobs, comma-separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="class_weights")
    args = parser.parse_args()
    config = load_config(args.work / "run" / "run.yaml")
    c_values, mixes = list(config.finetune.probe_c), list(config.finetune.probe_mix)
    payload: dict = {"machine": machine(), "folds": args.folds, "seed": args.seed, "probe_c": c_values,
                     "probe_mix": mixes, "tasks": {}}
    sections = []
    for job in args.tasks.split(","):
        started = time.perf_counter()
        rows = cross_validate(head_inputs(args.work, job), c_values, mixes, args.folds, args.seed)
        summary, text = summarise(job, rows)
        payload["tasks"][job] = {**summary, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
        sections.append(text + f"({payload['tasks'][job]['seconds']} s)\n")
    markdown = "\n".join([
        "# Classifier loss weighting chosen by cross-validation on train ∪ val (never test)", "",
        f"Work directory `{args.work.name}`; {args.folds} folds by product (StratifiedGroupKFold, seed {args.seed}); "
        f"probe C grid {c_values}, head weight α grid {mixes} (as the run's config); out-of-fold predictions of the "
        "frozen pre-trained encoder's linear probe, scored as `fit_probe` chooses (accuracy + macro-F1).", "",
        *sections,
        f"Reproduce: `python benchmarks/bench_class_weights.py --work {args.work} --tasks {args.tasks}`", ""])
    write_result(args.result, json.loads(json.dumps(payload, default=float)), markdown)


if __name__ == "__main__":
    main()
