"""``kaleido demo``: the whole pipeline on the built-in synthetic catalogue, stage by stage (docs/demo.md).

Every stage writes into ``OUT/<stage>`` and is skipped when its output is already complete, so a re-run after an
interruption picks up where it stopped (training stages resume from their last checkpoint). Stages: synthetic
catalogue → Kaleido patches and features → alignment captioner and token↔patch alignments → pre-training (loss
curves) → fine-tuning (retrieval, category and sub-category from image+text and from the image alone, captioning)
→ the choices made on validation (``kaleido calibrate``: re-ranking, the query bank's β, the caption k) →
evaluation (``OUT/report``: the paper's Tables 2–3 beside ours) → the product index of the search service
(``OUT/index``) → each checkpoint's model card (``README.md``) with the report's metrics. It first names the recipe
it runs and why (:func:`demo_recipe`) and, once the catalogue is there, how long training will take on this machine
(:mod:`kaleido_bert.workflows.estimate`). At the end it prints the report's model-against-baseline table with its
paired intervals and one line saying whether the test split can tell the two apart
(:mod:`kaleido_bert.eval.baseline_verdict`), then the wall time of each stage and the command that serves the demo
model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import Catalogue
from kaleido_bert.distributed import machine_line, world_size
from kaleido_bert.errors import KaleidoError
from kaleido_bert.runs import FINETUNE, PRETRAIN, RUN_CONFIG, training_state
from kaleido_bert.workflows.stages import (
    Stages,
    align,
    calibrate_stage,
    extract_store,
    finetune_jobs,
    finetune_stage,
    pretrain_stage,
)

WRITTEN = ("features", "captioner", "alignments", PRETRAIN, FINETUNE, "report", "index")
"""The directories the demo writes under ``OUT`` (and ``catalogue/`` for the synthetic catalogue)."""


def _within(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def check_demo_paths(out: str | Path, catalogue: str | Path | None, features: str | Path | None) -> None:
    """Refuse, before anything is written, an ``--out`` that would write into the user's data.

    Refused: ``out`` equal to or inside ``catalogue`` (the ``--catalogue`` given) or inside ``features`` (a store
    ``data.features`` names), and a catalogue equal to or inside a directory the demo writes (:data:`WRITTEN`).

    Raises:
        KaleidoError: one line naming both paths.
    """
    out = Path(out)
    if catalogue is not None and _within(out, Path(catalogue)):
        raise KaleidoError(f"--out {out} is the catalogue {catalogue} or inside it: the demo would write its stages "
                           "into the catalogue; choose an --out outside it")
    if features is not None and _within(out, Path(features)):
        raise KaleidoError(f"--out {out} is the feature store {features} (data.features) or inside it: choose an "
                           "--out outside it")
    for name in WRITTEN if catalogue is not None else ():
        if _within(Path(catalogue), out / name):
            raise KaleidoError(f"the catalogue {catalogue} is {out / name} or inside it, which the demo writes: "
                               "choose another --out")


def check_batches(config: RunConfig, catalogue: Catalogue) -> None:
    """Refuse, before any stage runs, a catalogue whose train split is smaller than one batch of pre-training
    (``train.batch_size``) or, when the run fine-tunes a part, of fine-tuning (``finetune.batch_size``): the
    training loop's own rule (:func:`~kaleido_bert.train.loop.full_batches`) on the catalogue's train items.

    Raises:
        KaleidoError: one line naming both numbers and the ``--set KEY=N`` that fits.
    """
    from kaleido_bert.train.loop import full_batches

    pairs, multiple = len(catalogue.split("train")), config.train.grad_accum * world_size()
    full_batches(pairs, config.train.batch_size, multiple=multiple, key="train.batch_size")
    if finetune_jobs(config):
        full_batches(pairs, config.finetune.batch_size, multiple=multiple, key="finetune.batch_size")


def demo_recipe(config: str | None, catalogue: str | Path | None) -> tuple[str, str]:
    """The recipe ``kaleido demo`` runs and the line that names it and why: ``--config`` when given, else ``real``
    for a ``--catalogue`` of one's own and ``demo`` for the synthetic one. Returns ``(name or path, line)``."""
    if config is not None:
        return config, f"[demo] recipe: {config} (--config)"
    if catalogue is not None:
        return "real", "[demo] recipe: real (the default for your own catalogue; --config NAME to choose another)"
    return "demo", "[demo] recipe: demo (the synthetic catalogue's preset; --config NAME to choose another)"


def print_baseline_summary(report: Path, catalogue: Path, split: str) -> None:
    """Print the report's model-against-baseline table with its intervals and the verdict line
    (:func:`~kaleido_bert.eval.baseline_verdict.baseline_summary`); nothing without a baseline."""
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.baseline_verdict import baseline_summary

    found = baseline_summary(report, len(load_catalogue(catalogue).split(split)), split=split)
    if found is not None:
        section, verdict = found
        print("\n" + "\n".join(section).rstrip() + f"\n\n[demo] {verdict}")


def run_demo(config: RunConfig, out: str | Path, *, catalogue: str | Path | None = None,
             dataset_label: str = "synthetic demo catalogue") -> dict[str, Any]:
    """Run every stage with ``config`` (the ``demo`` preset by default) into ``out``.

    Args:
        config: the run config.
        out: output root (``catalogue/`` unless given, ``features/``, ``captioner/``, ``alignments/``,
            ``pretrain/``, ``finetune/<task>/``, ``report/``).
        catalogue: run the pipeline on this catalogue (e.g. an imported one) instead of the synthetic one.
        dataset_label: the dataset's name in the report's column headers.

    Raises:
        KaleidoError: before anything is written, an ``out`` inside the catalogue or the feature store (or a
            catalogue inside what the demo writes: :func:`check_demo_paths`), or a catalogue whose train split is
            smaller than one batch (:func:`check_batches`; the synthetic one after it is made, before the
            patches stage).
    """
    from kaleido_bert.align.alignment import draw_attention
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.check import check_catalogue
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.figure import draw_store_grids
    from kaleido_bert.patches.store import FeatureStore

    out = Path(out)
    own = catalogue is not None
    check_demo_paths(out, catalogue, config.data.features)
    if own:
        check_batches(config, load_catalogue(catalogue))
    out.mkdir(parents=True, exist_ok=True)
    catalogue, features = (Path(catalogue) if own else out / "catalogue"), out / "features"
    captioner, alignments = out / "captioner", out / "alignments"
    run = config.with_overrides({"data.catalogue": str(catalogue), "data.features": str(features),
                                 "data.alignments": str(alignments / "alignments.jsonl")})
    run.save(out / RUN_CONFIG)  # the run describes itself: `kaleido evaluate OUT` reads it
    stages = Stages("demo")
    print(f"[demo] machine: {machine_line(config.train.precision)}", flush=True)

    def make_catalogue() -> None:
        if not own and not (catalogue / "catalogue.jsonl").is_file():
            synthesize(catalogue, products=config.data.synthetic_products, seed=config.data.synthetic_seed,
                       val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
        print(check_catalogue(catalogue, progress=False).format())
        if not own:  # a catalogue given was checked before anything ran
            check_batches(config, load_catalogue(catalogue))
        items = len(load_catalogue(catalogue).split("train"))
        if training_state(out / PRETRAIN, config.with_train_items(items).train.max_steps) != "done":
            from kaleido_bert.workflows.estimate import estimate_training  # before the first expensive stage

            print(f"[demo] {estimate_training(config, items).line()}", flush=True)

    def make_features() -> None:
        print(json.dumps(extract_store(run, catalogue, features)))
        cat = load_catalogue(catalogue)
        print("[demo] Kaleido grids (paper Fig. 3):",
              draw_store_grids(cat, FeatureStore(features), [it.id for it in cat.items[:3]],
                               out / "kaleido-patches.png"))

    def make_alignments() -> None:
        print(json.dumps(align(run, catalogue, features, captioner, alignments), indent=2))
        ids = [it.id for it in load_catalogue(catalogue).split("test")[:3]]
        print("[demo] attention maps (paper Fig. 4):",
              draw_attention(catalogue, features, captioner, ids, out / "alignment-attention.png",
                             tokenizer=run.data.tokenizer, max_text_len=run.model.max_text_len))

    def budget() -> RunConfig:
        """``run`` with its epoch budgets (``train.epochs``, ``finetune.epochs``) turned into steps."""
        if run.train.epochs <= 0 and run.finetune.epochs <= 0:
            return run
        store = FeatureStore(features)
        return run.with_train_items(sum(it.id in store for it in load_catalogue(catalogue).split("train")))

    def make_pretrained() -> None:
        summary = pretrain_stage(budget(), out)
        if summary is not None:
            print(json.dumps({k: v for k, v in summary.items() if k not in ("data_counts", "init")}, indent=2))
        print("[demo] loss curves (paper Fig. 6):", out / "pretrain" / "loss_curves.png")

    def make_finetuned() -> None:
        resolved = budget()
        for task, image_only in finetune_jobs(resolved):
            summary = finetune_stage(resolved, out, task, image_only)
            if summary is not None:
                print(json.dumps({k: v for k, v in summary.items()
                                  if k in ("steps", "seconds", "pairs_per_s", "final")}))

    def make_report() -> dict[str, Any]:
        from kaleido_bert.eval.evaluate import evaluate_run
        from kaleido_bert.eval.report import print_tables

        metrics = evaluate_run(out, run, out / "report", dataset_label=dataset_label,
                               baseline_seeds=tuple(run.eval.baseline_seeds) or None)  # the frozen baseline column
        print("\n" + print_tables(metrics))
        print(f"\n[demo] report: {out / 'report' / 'report.md'}")
        return metrics

    def make_cards() -> None:
        from kaleido_bert.eval.cards import write_run_cards

        for part, (path, rows) in write_run_cards(out).items():  # after the report and its baseline
            print(f"[demo] model card of {part}: {path} ({rows} metrics)")

    def make_index() -> None:
        from kaleido_bert.serve.catalogue_index import index_catalogue

        if not (out / "index" / "index.json").is_file():
            index_catalogue(out, out / "index", catalogue=catalogue, features=features)

    stages.run("catalogue", make_catalogue)
    stages.run("patches", make_features)
    stages.run("align", make_alignments)
    stages.run("pretrain", make_pretrained)
    stages.run("finetune", make_finetuned)
    stages.run("calibrate", lambda: calibrate_stage(run, out))
    metrics = stages.run("evaluate", make_report)
    stages.run("index", make_index)
    stages.run("card", make_cards)
    timings = stages.timings
    print_baseline_summary(out / "report", catalogue, run.eval.split)
    print("\n[demo] stage times: " + stages.summary() + f" (on {machine_line(config.train.precision)})")
    print(f"[demo] serve the demo model (search page at http://127.0.0.1:8000/):\n"
          f"    kaleido serve {out} --index {out / 'index'} --catalogue {catalogue} --features {features}")
    return {"out": str(out), "timings": timings, "metrics": metrics}
