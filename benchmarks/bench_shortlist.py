"""Sample-100 with a dual-encoder shortlist: how much of the cross-encoder's work it saves, and what it changes.

``eval.sample100_shortlist = k`` scores only each query's top k candidates (of 101) by the dual encoder's cosine
with the cross-encoder and ranks the rest after them in cosine order (:func:`kaleido_bert.eval.retrieval.
shortlist_scores`, the re-ranking ALBEF and BLIP use). This benchmark scores every candidate of a **validation**
draw once (the paper's protocol), derives every k's ranking from those scores, checks that the real shortlist path
gives the derived k's numbers, and times both paths. No test item is read.

Needs a pre-trained run with an ITC head, by default the quality benchmark's (``bench_quality.py --views 80
--work benchmarks/.cache/quality-views --stages data,pretrain``).

    python benchmarks/bench_shortlist.py [--run DIR] [--queries 100] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / ".cache" / "quality-views" / "run"
KS = (5, 10, 20, 40)


def ranks_with_shortlist(full: np.ndarray, cosine: np.ndarray, k: int) -> np.ndarray:
    """The positive's (column 0) rank per query when only each row's top ``k`` by cosine keep their full score."""
    from kaleido_bert.eval.retrieval import SHORTLIST_OFFSET

    rows = np.arange(full.shape[0])[:, None]
    top = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    scores = cosine - SHORTLIST_OFFSET
    scores[rows, top] = full[rows, top]
    return 1 + (scores[:, 1:] > scores[:, :1]).sum(axis=1)


def measure(run: Path, queries: int) -> dict:
    from kaleido_bert.config import load_config
    from kaleido_bert.eval.metrics import sum_r
    from kaleido_bert.eval.retrieval import PairScorer, build_candidates, evaluate_sample100
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.runs import resolve_checkpoint

    config = load_config(run / "run.yaml", ["eval.split=val"])
    catalogue, store = open_data(config)
    cands = build_candidates(catalogue, set(store.available_ids()), split="val", num_queries=queries,
                             num_negatives=config.eval.num_negatives, seed=config.eval.seed)
    encoder = DualEncoder.from_checkpoint(resolve_checkpoint(run / "pretrain"), batch_size=config.eval.batch_size)
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items), pair_score=config.eval.pair_score)
    ranks: dict[str, dict[str, list[int]]] = {}
    seconds = {"full": 0.0, "shortlist-20": 0.0}
    for direction in ("itr", "tir"):
        qs = [q for q in cands[direction] if len(q["candidates"]) == 1 + config.eval.num_negatives]
        pairs = [((q["query"], c) if direction == "itr" else (c, q["query"])) for q in qs for c in q["candidates"]]
        start = time.perf_counter()
        full = scorer.itm_logits(pairs, desc=f"{direction} full", progress=True).reshape(len(qs), -1)
        seconds["full"] += time.perf_counter() - start
        cosine = scorer.cosines(pairs).reshape(len(qs), -1)
        ranks[direction] = {"full": (1 + (full[:, 1:] > full[:, :1]).sum(axis=1)).tolist(),
                            **{f"shortlist-{k}": ranks_with_shortlist(full, cosine, k).tolist() for k in KS},
                            "cosine": (1 + (cosine[:, 1:] > cosine[:, :1]).sum(axis=1)).tolist()}
        cands[direction] = qs
    start = time.perf_counter()
    real = evaluate_sample100(scorer, cands, progress=True, shortlist=20)["metrics"]
    seconds["shortlist-20"] = time.perf_counter() - start  # cosines, embeddings and 20 pair scores per query

    def hits(r: list[int]) -> dict[int, float]:
        return {k: float(np.mean(np.asarray(r) <= k)) for k in (1, 5, 10)}

    methods = ["full", *(f"shortlist-{k}" for k in KS), "cosine"]
    sumr = {m: sum_r(hits(ranks["itr"][m]), hits(ranks["tir"][m])) for m in methods}
    recall = {m: {d: {str(k): v for k, v in hits(ranks[d][m]).items()} for d in ("itr", "tir")} for m in methods}
    if abs(real["sample100/SumR"] - sumr["shortlist-20"]) > 1e-6:
        raise SystemExit(f"the shortlist path gave SumR {real['sample100/SumR']:.3f}, the derived ranks "
                         f"{sumr['shortlist-20']:.3f}")
    changed = {m: sum(int((a <= 10) != (b <= 10)) for d in ("itr", "tir")
                      for a, b in zip(ranks[d]["full"], ranks[d][m], strict=True)) for m in methods}
    return {"machine": machine(), "run": str(run), "queries": {d: len(cands[d]) for d in ("itr", "tir")},
            "pair_score": config.eval.pair_score, "sumr": sumr, "changed_at_10": changed,
            "recall": recall,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def render(p: dict) -> str:
    n = sum(p["queries"].values())
    rows = ["| ranking | cross-encoded pairs per query | ITR R@1 / 5 / 10 | TIR R@1 / 5 / 10 | SumR | queries whose "
            "hit@10 differs from full |", "|---|---|---|---|---|---|"]
    for m, width in [("full", 101), *((f"shortlist-{k}", k) for k in KS), ("cosine", 0)]:
        r = p["recall"][m]
        cells = [" / ".join(f"{100 * r[d][k]:.1f}" for k in ("1", "5", "10"))
                 for d in ("itr", "tir")]
        label = ({"full": "every candidate (the paper's protocol)", "cosine": "the dual encoder alone"}[m]
                 if width in (101, 0) else f"top {width} by the dual encoder, then the pair score")
        rows.append(f"| {label} | {width} | {cells[0]} | {cells[1]} | {p['sumr'][m]:.1f} | "
                    f"{p['changed_at_10'][m]} of {n} |")
    s = p["seconds"]
    return "\n".join([
        "# Sample-100 with a dual-encoder shortlist (validation split)", "",
        f"Run `{Path(p['run']).name}` ({p['run']}), pair score `{p['pair_score']}`; {p['queries']['itr']} ITR and "
        f"{p['queries']['tir']} TIR validation queries, 101 candidates each. Every candidate was scored once by the "
        "cross-encoder; each shortlist's ranking is derived from those scores (only its top k by cosine keep them, "
        "the rest follow in cosine order), and the real `eval.sample100_shortlist = 20` path was checked to give the "
        "same SumR. No test item is read.", "", *rows, "",
        f"Wall time: every candidate {s['full']} s; the shortlist path at k = 20 (embeddings, cosines, 20 pair "
        f"scores per query) {s['shortlist-20']} s. Machine: {p['machine']}.", "",
        "Reproduce: `python benchmarks/bench_shortlist.py` (`--render-only` rewrites this file from the JSON).", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(RUN))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    if args.render_only:
        write_result("shortlist", payload := json.loads((RESULTS / "shortlist.json").read_text()), render(payload))
        return 0
    payload = measure(Path(args.run), args.queries)
    write_result("shortlist", payload, render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
