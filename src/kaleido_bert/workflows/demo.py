"""``kaleido demo``: the whole pipeline on the built-in synthetic catalogue, stage by stage (SPEC §2, demo flow).

Every stage writes into ``OUT/<stage>`` and is skipped when its output is already complete, so a re-run after an
interruption picks up where it stopped (training stages resume from their last checkpoint). Stages: synthetic
catalogue → Kaleido patches and features → alignment captioner and token↔patch alignments → pre-training (loss
curves) → fine-tuning (retrieval, category and sub-category from image+text and from the image alone, captioning)
→ evaluation (``OUT/report``: the paper's Tables 2–3 beside ours) → the product index of the search service
(``OUT/index``). The wall time of each stage and the command that serves the demo model are printed at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import LABEL_FIELDS
from kaleido_bert.runs import training_state


def _stage(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    print(f"\n[demo] === {name} ===", flush=True)
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    return result


def run_demo(config: RunConfig, out: str | Path, *, catalogue: str | Path | None = None,
             dataset_label: str = "synthetic demo catalogue") -> dict[str, Any]:
    """Run every stage with ``config`` (the ``demo`` preset by default) into ``out``.

    Args:
        config: the run config.
        out: output root (``catalogue/`` unless given, ``features/``, ``captioner/``, ``alignments/``,
            ``pretrain/``, ``finetune/<task>/``, ``report/``).
        catalogue: run the pipeline on this catalogue (e.g. an imported one) instead of the synthetic one.
        dataset_label: the dataset's name in the report's column headers.
    """
    from kaleido_bert.align.alignment import draw_attention, extract_alignments
    from kaleido_bert.align.captioner import train_captioner
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.check import check_catalogue
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.patches.figure import draw_store_grids
    from kaleido_bert.patches.store import FeatureStore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "run.yaml")
    timings: dict[str, float] = {}
    own = catalogue is not None
    catalogue, features = (Path(catalogue) if own else out / "catalogue"), out / "features"
    captioner, alignments = out / "captioner", out / "alignments"

    def make_catalogue() -> None:
        if not own and not (catalogue / "catalogue.jsonl").is_file():
            synthesize(catalogue, products=config.data.synthetic_products, seed=config.data.synthetic_seed,
                       val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
        print(check_catalogue(catalogue, progress=False).format())

    def make_features() -> None:
        summary = extract_features(catalogue, features, config.features, seed=config.train.seed,
                                   num_workers=config.data.num_workers)
        print(json.dumps(summary))
        cat = load_catalogue(catalogue)
        ids = [it.id for it in cat.items[:3]]
        print("[demo] Kaleido grids (paper Fig. 3):",
              draw_store_grids(cat, FeatureStore(features), ids, out / "kaleido-patches.png"))

    def make_alignments() -> None:
        if not (captioner / "model.safetensors").is_file():
            history = train_captioner(catalogue, features, captioner)
            print(json.dumps({k: v for k, v in history.items() if not isinstance(v, list)}))
        report = extract_alignments(catalogue, features, captioner, alignments)
        print(json.dumps(report, indent=2))
        ids = [it.id for it in load_catalogue(catalogue).split("test")[:3]]
        print("[demo] attention maps (paper Fig. 4):",
              draw_attention(catalogue, features, captioner, ids, out / "alignment-attention.png"))

    run = config.with_overrides({"data.catalogue": str(catalogue), "data.features": str(features),
                                 "data.alignments": str(alignments / "alignments.jsonl")})

    def make_pretrained() -> None:
        from kaleido_bert.train.pretrain import pretrain

        state = training_state(out / "pretrain", run.train.max_steps)
        if state != "done":
            summary = pretrain(run, out / "pretrain", resume=state == "resume")
            print(json.dumps({k: v for k, v in summary.items() if k not in ("data_counts", "init")}, indent=2))
        print("[demo] loss curves (paper Fig. 6):", out / "pretrain" / "loss_curves.png")

    def make_finetuned() -> None:
        from kaleido_bert.train.finetune import finetune, finetune_config

        jobs = [("retrieval", False), ("caption", False)]
        jobs += [(task, source == "image") for task in LABEL_FIELDS for source in run.finetune.inputs]
        for task, image_only in jobs:
            name = task + ("-image" if image_only else "")
            target = out / "finetune" / name
            state = training_state(target, finetune_config(run, task).train.max_steps)
            print(f"[demo] fine-tune {name}: {state}", flush=True)
            if state != "done":
                start = time.perf_counter()
                summary = finetune(task, run, out / "pretrain", target, image_only=image_only,
                                   resume=state == "resume")
                timings[f"finetune {name}"] = time.perf_counter() - start
                print(json.dumps({k: v for k, v in summary.items() if k in ("steps", "seconds", "pairs_per_s", "final")}))

    def make_report() -> dict[str, Any]:
        from kaleido_bert.eval.evaluate import evaluate_run
        from kaleido_bert.eval.report import print_tables

        metrics = evaluate_run(out, run, out / "report", dataset_label=dataset_label)
        print("\n" + print_tables(metrics))
        print(f"\n[demo] report: {out / 'report' / 'report.md'}")
        return metrics

    _stage("catalogue", timings, make_catalogue)
    _stage("patches", timings, make_features)
    _stage("align", timings, make_alignments)
    _stage("pretrain", timings, make_pretrained)
    def make_index() -> None:
        from kaleido_bert.serve.catalogue_index import index_catalogue

        if not (out / "index" / "index.json").is_file():
            index_catalogue(out, out / "index", catalogue=catalogue, features=features)

    _stage("finetune", timings, make_finetuned)
    metrics = _stage("evaluate", timings, make_report)
    _stage("index", timings, make_index)
    print("\n[demo] stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"[demo] serve the demo model (search page at http://127.0.0.1:8000/):\n"
          f"    kaleido serve {out} --index {out / 'index'} --catalogue {catalogue} --features {features}")
    return {"out": str(out), "timings": timings, "metrics": metrics}
