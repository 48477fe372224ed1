"""Scale: how each stage's cost grows with the catalogue (issue: a Fashion-Gen-sized catalogue end to end).

Sections (``--sections``, all by default), each on generated data of growing size N:

* ``store``   — feature stores of N images written directly (random fp16 features, the ``demo`` preset's layout:
  74 × F=320 per image): bytes per image; then, in a fresh process per N, the pre-training data pipeline
  (``PretrainDataset`` + ``collate``, one thread, masking, negatives and alignments) reading random pairs:
  pairs/s and **peak RSS**, which must stay flat as N grows (the store is memory-mapped).
* ``train``   — the ``demo``-size model pre-trained for a few steps on the largest store: pairs/s and the
  share of each step spent waiting for data (``data_wait`` of ``metrics.csv``).
* ``extract`` — ``kaleido patches`` on a synthetic catalogue, 1 process vs 2 (``torchrun``, gloo): images/s.
* ``eval``    — ``kaleido evaluate`` (sample-100 + full gallery) of a tiny run, 1 process vs 2: queries/s.
* ``index``   — FAISS over N = 10k … 1M random unit vectors (D = 256): build items/s and single-query
  p50/p95 latency, exact vs HNSW, and HNSW's recall@10 against exact.

Writes ``results/scale.{json,md}`` and ``docs/scale.png`` (a log-log plot of each cost against N).

    python benchmarks/bench_scale.py [--sections store,train,extract,eval,index] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CACHE = Path(__file__).resolve().parent / ".cache" / "scale"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT / "src")}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} … failed:\n{result.stderr[-3000:]}")
    return result


# ---------------------------------------------------------------------------------------------- index
def bench_index(sizes: list[int], queries: int = 200, dim: int = 256) -> list[dict]:
    from kaleido_bert.serve.index import ProductIndex

    rows = []
    rng = np.random.default_rng(0)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for n in sizes:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"i{i}" for i in range(n)]
        exact_top = None
        for kind in ("exact", "hnsw"):
            start = time.perf_counter()
            index = ProductIndex.build(ids, x, kind=kind)
            build = time.perf_counter() - start
            latencies, top = [], []
            for row in q:
                t0 = time.perf_counter()
                hits = index.search(row, 10)
                latencies.append(time.perf_counter() - t0)
                top.append({h for h, _ in hits[0]})
            if kind == "exact":
                exact_top = top
            recall = float(np.mean([len(a & b) / 10 for a, b in zip(top, exact_top, strict=True)]))
            lat = sorted(latencies)
            rows.append({"n": n, "kind": kind, "build_s": build, "build_items_per_s": n / build,
                         "p50_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))],
                         "recall@10_vs_exact": recall})
            print(json.dumps(rows[-1]), flush=True)
            del index
    return rows
