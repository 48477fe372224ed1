"""Query-bank normalisation at search time: what the offset column costs, and what its offsets cost to compute.

The service ranks a description query over images by ``cos − offset(image)`` (:mod:`kaleido_bert.eval.query_bank`):
each indexed vector carries its offset as one extra column and a query is padded with 1
(:class:`~kaleido_bert.serve.index.ProductIndex` with ``offsets``). Measured on random unit vectors of the `real`
recipe's width (512, the WiSE-FT ensemble of two 256-d spaces), with the real code paths:

* search latency and queries/s, one query at a time and in batches of 64, ``k`` = 10, for an exact and an HNSW
  index **without** offsets (plain cosine) and **with** them (the obvious alternative: the same index, plain);
  HNSW recall@10 against exact search of the same scores;
* the offsets themselves (:func:`~kaleido_bert.eval.query_bank.bank_offsets`: float32 similarities and exps
  shifted by each column's maximum, float64 sums): a bank of 5,477 training queries (the Myntra run's) against the
  gallery, in gallery vectors/s and as a fraction of the machine's measured fp32 matmul peak (the work is one
  ``(B, D) × (D, G)`` product plus a log-sum-exp), against the obvious alternative, SciPy's float64 ``logsumexp``
  of the same similarities (and their largest difference).

    python benchmarks/bench_query_bank.py [--gallery 100000] [--queries 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_peak_gflops, write_result  # noqa: E402

from kaleido_bert.eval.query_bank import bank_offsets  # noqa: E402
from kaleido_bert.serve.index import ProductIndex  # noqa: E402

DIM, BANK, BETA = 512, 5477, 20.0


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _time_search(index: ProductIndex, queries: np.ndarray, batch: int, k: int) -> dict:
    index.search(queries[:8], k)  # warm-up
    laps = []
    for lo in range(0, len(queries), batch):
        start = time.perf_counter()
        index.search(queries[lo:lo + batch], k)
        laps.append((time.perf_counter() - start) / len(queries[lo:lo + batch]))
    return {"p50_ms": 1e3 * statistics.median(laps), "queries_per_s": 1 / statistics.mean(laps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--queries", type=int, default=500, help="timed queries per configuration")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    gallery, queries, bank = _unit(args.gallery, 0), _unit(args.queries, 1), _unit(BANK, 2)

    start = time.perf_counter()
    offsets = bank_offsets(bank, gallery, BETA)
    offset_s = time.perf_counter() - start
    from scipy.special import logsumexp

    start = time.perf_counter()
    reference = np.concatenate([logsumexp(BETA * (bank @ gallery[lo:lo + 1024].T).astype(np.float64), axis=0) / BETA
                                for lo in range(0, len(gallery), 1024)])
    scipy_s = time.perf_counter() - start
    worst = float(np.abs(reference - offsets).max())
    peak = matmul_peak_gflops()
    gflops = 2 * BANK * DIM * args.gallery / offset_s / 1e9

    rows, exact_top = [], {}
    for kind in ("exact", "hnsw"):
        for with_offsets in (False, True):
            start = time.perf_counter()
            index = ProductIndex.build([f"g{i}" for i in range(args.gallery)], gallery, kind=kind,
                                       offsets=offsets if with_offsets else None)
            build_s = time.perf_counter() - start
            found = index.search(queries, args.k)
            if kind == "exact":
                exact_top[with_offsets] = found
            recall = float(np.mean([len({i for i, _ in f} & {i for i, _ in t}) / args.k
                                    for f, t in zip(found, exact_top[with_offsets], strict=True)]))
            for batch in (1, 64):
                rows.append({"kind": kind, "offsets": with_offsets, "batch": batch, "build_s": build_s,
                             "recall@10": recall, **_time_search(index, queries, batch, args.k)})
            print(rows[-2], rows[-1], flush=True)
    changed = float(np.mean([len({i for i, _ in a} & {i for i, _ in b}) / args.k
                             for a, b in zip(exact_top[True], exact_top[False], strict=True)]))
    payload = {"machine": machine(), "gallery": args.gallery, "queries": args.queries, "dim": DIM, "bank": BANK,
               "beta": BETA, "k": args.k, "offsets_seconds": offset_s, "offsets_gflops": gflops,
               "scipy_float64_seconds": scipy_s, "max_abs_difference": worst,
               "fp32_peak_gflops": peak, "top10_overlap_with_without": changed, "search": rows}
    lines = [f"# Query-bank normalisation at search time: {args.gallery:,} vectors of {DIM} dims", "",
             f"Machine: {payload['machine']}. Random unit vectors; the bank: {BANK:,} training queries, β = {BETA:g}. "
             f"The normalised and the plain top 10 share {100 * changed:.1f}% of their results on these vectors.", "",
             "## Search (`ProductIndex.search`, k = 10)", "",
             "| index | offset column | batch | build s | recall@10 vs exact (same scores) | p50 ms/query | queries/s |",
             "|---|---|---|---|---|---|---|",
             *[f"| {r['kind']} | {'yes' if r['offsets'] else 'no'} | {r['batch']} | {r['build_s']:.2f} | "
               f"{r['recall@10']:.3f} | {r['p50_ms']:.3f} | {r['queries_per_s']:,.0f} |" for r in rows], "",
             "Random unit vectors in 512 dims have no neighbourhood structure, HNSW's worst case: its recall here "
             "only shows that the offset column leaves it as it is (`bench_search.md` has HNSW on model "
             "embeddings).", "",
             "## The offsets (`bank_offsets`: one (bank × D) · (D × gallery) product and a log-sum-exp)", "",
             "| implementation | seconds | gallery vectors/s | product GFLOP/s over the whole time | of fp32 peak |",
             "|---|---|---|---|---|",
             f"| `bank_offsets` (float32, max-shifted exps, float64 sums) | {offset_s:.2f} | "
             f"{args.gallery / offset_s:,.0f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |",
             f"| SciPy `logsumexp` on float64 similarities | {scipy_s:.2f} | {args.gallery / scipy_s:,.0f} | "
             f"{2 * BANK * DIM * args.gallery / scipy_s / 1e9:.1f} | "
             f"{100 * 2 * BANK * DIM * args.gallery / scipy_s / 1e9 / peak:.0f}% |", "",
             f"Measured fp32 matmul peak: {peak:.0f} GFLOP/s. Largest difference between the two: {worst:.1e} "
             f"(cosine units). bf16 is not used here: an offset error must stay far below the gaps between "
             f"neighbouring scores.", ""]
    write_result("query_bank", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
