"""Zero-shot CR / SUB: what the catalogue's own label names score as prompts, with no classifier trained.

Runs :func:`kaleido_bert.eval.zero_shot.evaluate_run_zero_shot` on a run directory (``kaleido demo`` layout:
``run.yaml`` naming the catalogue and feature store, ``finetune/retrieval`` or ``pretrain``, optionally
``report/metrics.json`` and ``report/baseline.json``): each image of the test split is given the label whose prompt
(``"a photo of {}"`` with the label name, ``_``/``-`` as spaces, lower-cased) has the highest cosine with it in the
dual encoder's space, for the model and for the frozen baseline (3 projection seeds, mean ± std), beside chance
(the training split's majority class) and, when the run's report has them, the trained classifiers. A few
templates are scored too; one is chosen on the validation split only, and its test numbers are reported beside
the default's.

    python benchmarks/bench_zero_shot.py --run RUN_DIR [--result zero_shot] [--seeds 0 1 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

COLUMNS = ("cr/accuracy", "cr/macro_f1", "sub/accuracy", "sub/macro_f1")


def _cell(key: str, mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    digits = 1 if key.endswith("accuracy") else 3
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _row(name: str, mean: dict[str, float], std: dict[str, float] | None = None) -> str:
    return f"| {name} | " + " | ".join(_cell(k, mean.get(k), None if std is None else std.get(k))
                                       for k in COLUMNS) + " |"


def render(result: dict[str, Any]) -> str:
    """The markdown of one run's result."""
    model, base = result["model"], result.get("baseline")
    default = result["templates"][0]
    items = result["items"]
    split = result["split"]
    lines = [f"# Zero-shot classification by label text: `{Path(result['run']).name}`", "",
             f"The {split} split's {items[split]:,} images (with features) classified into the catalogue's "
             f"{result['labels']['cr']} categories (CR) and {result['labels']['sub']} sub-categories (SUB) by label "
             f"text alone: no classifier trained. Model: the dual encoder of `{result['checkpoint']}`. Accuracy in "
             "percent, macro-F1 over the whole label map (the trained classifiers' rule). Templates are chosen on "
             f"the validation split ({items.get('val', 0):,} images), never on {split}.", "",
             f"| {split} | CR ACC | CR macro-F1 | SUB ACC | SUB macro-F1 |", "|---|---|---|---|---|",
             _row(f"model, zero-shot, `{default}`", model["test"][default])]
    if model["template"] != default:
        chosen = model["template"]
        lines.append(_row(f"model, zero-shot, `{chosen}` (chosen on val)", model["test"][chosen]))
    if base:
        seeds = len(base["seeds"])
        name = f"frozen baseline ({base['pool']} pool), zero-shot, {seeds} seeds"
        lines.append(_row(f"{name}, `{default}`", base["test"][default]["mean"], base["test"][default]["std"]))
        if base["template"] != default:
            chosen = base["test"][base["template"]]
            lines.append(_row(f"{name}, `{base['template']}` (chosen on val)", chosen["mean"], chosen["std"]))
    lines.append(_row("chance (the training split's majority class)", result["chance"]))
    for source, label in (("image", "image only"), ("image+text", "image + text")):
        if source in result["trained"]:
            lines.append(_row(f"trained classifier, {label} (`report/metrics.json`)", result["trained"][source]))
    lines += ["", "## Templates (CR ACC / SUB ACC)", "",
              "| template | model val | model " + split + " |" + (" baseline val | baseline " + split + " |"
                                                                if base else ""),
              "|---|---|---|" + ("---|---|" if base else "")]

    def pair(m: dict[str, float] | None) -> str:
        return "–" if not m else f"{m['cr/accuracy']:.1f} / {m['sub/accuracy']:.1f}"

    for t in result["templates"]:
        row = f"| `{t}` | {pair(model['val'].get(t))} | {pair(model['test'][t])} |"
        if base:
            row += f" {pair(base['val'].get(t))} | {pair(base['test'][t]['mean'])} |"
        lines.append(row)
    notes = [f"Baseline image pool: {base['pool']} ({base['pool_from']}); text model: {base['text_model']}."
             if base else "No frozen baseline (--no-baseline).",
             f"Seconds: {result['seconds']:.0f}."]
    if not result["trained"]:
        notes.append("The run's report has no trained classifiers' scores (run `kaleido evaluate RUN` for them).")
    return "\n".join([*lines, "", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True,
                        help="run directory (run.yaml, catalogue, features, pretrain or finetune/retrieval)")
    parser.add_argument("--result", default="zero_shot", help="results/NAME.md and .json (default: zero_shot)")
    parser.add_argument("--split", default="test", help="the evaluated split (templates are chosen on val)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the frozen baseline's seeds")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen baseline")
    parser.add_argument("--device", default=None, help="where the model runs (default: cuda when available)")
    args = parser.parse_args()

    from kaleido_bert import distributed as dist
    from kaleido_bert.eval.zero_shot import evaluate_run_zero_shot

    result = evaluate_run_zero_shot(args.run, split=args.split, seeds=tuple(args.seeds),
                                    baseline=not args.no_baseline, device=args.device or str(dist.device()),
                                    progress=True)
    write_result(args.result, result, render(result), precision="fp32")  # the embeddings run in fp32


if __name__ == "__main__":
    main()
