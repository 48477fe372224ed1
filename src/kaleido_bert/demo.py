"""``kaleido demo``: the whole pipeline on the built-in synthetic catalogue, stage by stage (SPEC §2, demo flow).

Every stage writes into ``OUT/<stage>`` and is skipped when its output is already complete, so a re-run after an
interruption picks up where it stopped. Stages: synthetic catalogue → Kaleido patches and features → alignment
captioner and token↔patch alignments → pre-training (seven tasks, loss curves). The wall time of each stage is printed at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kaleido_bert.config import RunConfig


def _stage(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    print(f"\n[demo] === {name} ===", flush=True)
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    return result


def run_demo(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run every stage built so far with ``config`` (the ``demo`` preset by default) into ``out``."""
    from kaleido_bert.alignment import draw_attention, extract_alignments
    from kaleido_bert.captioner import train_captioner
    from kaleido_bert.catalogue import load_catalogue
    from kaleido_bert.check import check_catalogue
    from kaleido_bert.extraction import extract_features
    from kaleido_bert.images import load_rgb
    from kaleido_bert.plots import draw_kaleido_grids
    from kaleido_bert.store import FeatureStore
    from kaleido_bert.synth import synthesize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "run.yaml")
    timings: dict[str, float] = {}
    catalogue, features = out / "catalogue", out / "features"
    captioner, alignments = out / "captioner", out / "alignments"

    def make_catalogue() -> None:
        if not (catalogue / "catalogue.jsonl").is_file():
            synthesize(catalogue, products=config.data.synthetic_products, seed=config.data.synthetic_seed)
        print(check_catalogue(catalogue, progress=False).format())

    def make_features() -> None:
        summary = extract_features(catalogue, features, config.features, seed=config.train.seed,
                                   num_workers=config.data.num_workers)
        print(json.dumps(summary))
        store, cat = FeatureStore(features), load_catalogue(catalogue)
        rows = []
        for item in cat.items[:3]:
            entry = store[item.id]
            rows.append((item.id, load_rgb(cat.image_path(item)), entry["saliency"].tolist(),
                         bool(entry["fallback"]), entry["boxes"]))
        print("[demo] Kaleido grids (paper Fig. 3):", draw_kaleido_grids(rows, out / "kaleido-patches.png"))

    def make_alignments() -> None:
        if not (captioner / "model.safetensors").is_file():
            history = train_captioner(catalogue, features, captioner)
            print(json.dumps({k: v for k, v in history.items() if not isinstance(v, list)}))
        report = extract_alignments(catalogue, features, captioner, alignments)
        print(json.dumps(report, indent=2))
        ids = [it.id for it in load_catalogue(catalogue).split("test")[:3]]
        print("[demo] attention maps (paper Fig. 4):",
              draw_attention(catalogue, features, captioner, ids, out / "alignment-attention.png"))

    def make_pretrained() -> None:
        from kaleido_bert.config import config_from_dict
        from kaleido_bert.pretrain import pretrain

        data = config.to_dict()
        data["data"].update(catalogue=str(catalogue), features=str(features),
                            alignments=str(alignments / "alignments.jsonl"))
        run = config_from_dict(data)
        resume = (out / "pretrain" / "latest").is_file()
        summary = pretrain(run, out / "pretrain", resume=resume)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("data_counts", "init")}, indent=2))
        print("[demo] loss curves (paper Fig. 6):", out / "pretrain" / "loss_curves.png")

    _stage("catalogue", timings, make_catalogue)
    _stage("patches", timings, make_features)
    _stage("align", timings, make_alignments)
    _stage("pretrain", timings, make_pretrained)
    print("\n[demo] stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return {"out": str(out), "timings": timings}
