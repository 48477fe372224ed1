"""Does the cross-encoder earn its place? ITC alone against ITC + ITM on the same candidates, and ITM alone.

For a pre-trained run, on one split's sample-100 draw (the run's own ``report/candidates.json`` for the test split,
so the numbers pair with the report; a fresh seeded draw for validation) every candidate of every query is scored
once by each ranking:

* ``itc``: the dual encoder's cosine (the ensemble with the frozen member when the checkpoint has one);
* ``itc+itm, top 20``: the cross-encoder's log-odds added to the ITC logit on each list's top 20 by cosine (the
  recipe's ``eval.sample100_shortlist``), the rest after them in cosine order;
* ``itc+itm, all``: the same score on all 101 candidates;
* ``itm alone``: the cross-encoder's log-odds alone on all 101 (the paper's protocol: ITM ranks every candidate).

Then the full gallery of the split, searched by the dual encoder and its top ``eval.rerank_k`` re-ranked. Each
ranking is compared with ``itc`` by a paired bootstrap over the same queries
(:func:`~kaleido_bert.eval.bootstrap.paired_bootstrap`). The run's validation ITM loss and accuracy curve
(``pretrain/metrics.csv``) is copied beside them.

    python benchmarks/bench_itm.py [--run runs/demo] [--split val|test] [--name demo] [--queries 100]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)
SHORTLIST = 20


def hits(ranks: np.ndarray) -> list[list[float]]:
    """Per query, whether the positive is within each K: ``(Q, 3)`` as lists (the outcomes' format)."""
    return [[float(r <= k) for k in KS] for r in ranks]


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """The positive's (column 0) rank per row of ``(Q, C)`` scores, ties counted against it."""
    return 1 + (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def measure(run: Path, split: str, queries: int) -> dict:
    from kaleido_bert.config import load_config
    from kaleido_bert.eval.bootstrap import paired_bootstrap
    from kaleido_bert.eval.retrieval import (
        SHORTLIST_OFFSET,
        PairScorer,
        build_candidates,
        evaluate_gallery,
        load_candidates,
    )
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
    from kaleido_bert.runs import resolve_checkpoint

    config = load_config(run / "run.yaml", [f"eval.split={split}"])
    catalogue, store = open_data(config)
    available = set(store.available_ids())
    saved = run / "report" / "candidates.json"
    if split == "test" and saved.is_file():
        cands = load_candidates(saved, catalogue, available)
    else:
        cands = build_candidates(catalogue, available, split=split, num_queries=queries,
                                 num_negatives=config.eval.num_negatives, seed=config.eval.seed)
    checkpoint = resolve_checkpoint(run / "pretrain")
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size)
    descriptions = product_descriptions(catalogue.items)
    scorer = PairScorer(encoder, store, descriptions, pair_score="itm+itc")
    scale = encoder.itc_scale
    outcomes: dict[str, dict] = {}
    start = time.perf_counter()
    for direction in ("itr", "tir"):
        qs = [q for q in cands[direction] if len(q["candidates"]) == 1 + config.eval.num_negatives]
        pairs = [((q["query"], c) if direction == "itr" else (c, q["query"])) for q in qs for c in q["candidates"]]
        cosine = scorer.cosines(pairs)
        log_odds = np.empty(len(pairs))
        for lo in range(0, len(pairs), encoder.batch_size):
            chunk = pairs[lo:lo + encoder.batch_size]
            feats, pos = store_patches(store, [i for i, _ in chunk])
            log_odds[lo:lo + len(chunk)] = encoder.itm_logits([descriptions[p] for _, p in chunk], feats, pos,
                                                              log_odds=True)
        cosine, log_odds = cosine.reshape(len(qs), -1), log_odds.reshape(len(qs), -1)
        fused = scale * cosine + log_odds
        rows = np.arange(len(qs))[:, None]
        top = np.argsort(-cosine, axis=1, kind="stable")[:, :SHORTLIST]
        shortlisted = cosine - SHORTLIST_OFFSET
        shortlisted[rows, top] = fused[rows, top]
        for name, scores in (("itc", cosine), (f"itc+itm, top {SHORTLIST}", shortlisted), ("itc+itm, all", fused),
                             ("itm alone", log_odds)):
            outcomes.setdefault(name, {"sample100": {}})["sample100"][direction] = hits(ranks_of(scores))
    gallery = evaluate_gallery(scorer, catalogue, available, split=split, rerank_k=config.eval.rerank_k,
                               progress=False)
    seconds = time.perf_counter() - start
    out = {"run": str(run), "split": split, "checkpoint": checkpoint.name, "itc_scale": scale,
           "queries": {d: len(outcomes["itc"]["sample100"][d]) for d in ("itr", "tir")},
           "candidates_per_query": 1 + config.eval.num_negatives, "seconds": round(seconds, 1),
           "member_mix": None if encoder.member is None else float(encoder.member.mix),
           "rerank_choice": encoder.rerank_choice, "sample100": {}, "gallery": {}}
    chance = 100 * sum(k / (1 + config.eval.num_negatives) for k in KS) * 2
    out["sample100"]["chance"] = round(chance, 1)
    for name, data in outcomes.items():
        row = {"SumR": round(100 * sum(float(np.mean(np.asarray(data["sample100"][d]), axis=0).sum())
                                       for d in ("itr", "tir")), 1)}
        if name != "itc":
            test = paired_bootstrap(outcomes["itc"], data, "sample100/SumR")
            row.update({k: round(test[k], 1) for k in ("diff", "low", "high")})
        out["sample100"][name] = row
    found = {"gallery": gallery["outcomes"]}
    for d in ("itr", "tir"):
        test = paired_bootstrap(found, found, f"{d}_gallery/mean_recall", metric_b=f"{d}_gallery_rerank/mean_recall")
        out["gallery"][d] = {"itc": round(test["a"], 1), "itc+itm": round(test["b"], 1),
                             **{k: round(test[k], 1) for k in ("diff", "low", "high")}}
    out["validation_curve"] = validation_curve(run / "pretrain" / "metrics.csv")
    return out


def validation_curve(path: Path) -> list[dict]:
    """Step, validation ITM loss and accuracy (and ITC loss) at each evaluation of pre-training."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/itm")]
    keys = ("val/itm", "val/itm_accuracy", "val/itc")
    return [{"step": int(float(r["step"])), **{k.split("/")[1]: round(float(r[k]), 4) for k in keys if r.get(k)}}
            for r in rows]


def render(result: dict) -> str:
    s = result["sample100"]
    lines = [f"# Does the cross-encoder earn its place? ({result['run']}, {result['split']} split)", "",
             f"Checkpoint `{result['checkpoint']}`; ITC scale {result['itc_scale']:.2f}; frozen member α "
             f"{result['member_mix']}; {result['queries']['itr']} ITR + {result['queries']['tir']} TIR queries of "
             f"{result['candidates_per_query']} candidates; {result['seconds']} s.", "",
             "## Sample-100 SumR (same candidates for every ranking)", "",
             "| ranking | SumR | − ITC alone [95% paired interval] |", "|---|---|---|",
             f"| chance | {s['chance']} | |"]
    for name, row in s.items():
        if name == "chance":
            continue
        delta = "" if "diff" not in row else f"{row['diff']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}]"
        lines.append(f"| {name} | {row['SumR']} | {delta} |")
    lines += ["", "## Full gallery mean recall (R@1, 5, 10 averaged)", "",
              "| direction | ITC alone | top k re-ranked by ITC + ITM | difference [95% paired interval] |",
              "|---|---|---|---|"]
    for d, row in result["gallery"].items():
        lines.append(f"| {d.upper()} | {row['itc']} | {row['itc+itm']} | "
                     f"{row['diff']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}] |")
    choice = result.get("rerank_choice")
    if choice:
        lines += ["", f"The checkpoint's own choice on validation: {'re-rank' if choice['rerank'] else 'no re-ranking'} "
                      f"(mean recall {choice['validation']['dual_encoder']} dual encoder vs "
                      f"{choice['validation']['reranked']} re-ranked)."]
    if result["validation_curve"]:
        lines += ["", "## Validation ITM during pre-training (chance: loss 0.693, accuracy 0.5)", "",
                  "| step | ITM loss | ITM accuracy | ITC loss |", "|---|---|---|---|"]
        for r in result["validation_curve"]:
            lines.append(f"| {r['step']} | {r.get('itm', '–')} | {r.get('itm_accuracy', '–')} | {r.get('itc', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--name", default="demo", help="results/itm-NAME-SPLIT.{json,md}")
    args = parser.parse_args()
    result = measure(args.run, args.split, args.queries)
    write_result(f"itm-{args.name}-{args.split}", result, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
