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


# ---------------------------------------------------------------------------------------------- store + data
def scale_catalogue(root: Path, n: int) -> Path:
    """A catalogue of ``n`` images: the rows of a 300-product synthetic catalogue repeated under new ids and
    product ids (the images are shared files; splits by product as usual)."""
    from kaleido_bert.data.catalogue import Item, assign_splits, load_catalogue, write_catalogue
    from kaleido_bert.data.synth import synthesize

    base = CACHE / "base"
    if not (base / "catalogue.jsonl").is_file():
        synthesize(base, products=300, seed=0, image_size=64, progress=False, overwrite=True)
    out = root / f"catalogue-{n}"
    if (out / "catalogue.jsonl").is_file():
        return out
    rows = load_catalogue(base).items
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    for it in rows:
        target = out / it.image
        if not target.exists():
            os.link(base / it.image, target)
    picked = [(rows[i % len(rows)], i // len(rows)) for i in range(n)]
    splits = assign_splits([f"{it.product_id}-r{c}" for it, c in picked], val_fraction=0.05, test_fraction=0.05)
    items = [Item(id=f"{it.id}-r{c}", product_id=f"{it.product_id}-r{c}", image=it.image, title=it.title,
                  description=it.description, category=it.category, subcategory=it.subcategory,
                  split=splits[f"{it.product_id}-r{c}"]) for it, c in picked]
    write_catalogue(out, items)
    return out


def random_store(catalogue: Path, target: Path, feature_size: int) -> float:
    """A complete store of random fp16 features for every row of ``catalogue``; returns the write seconds."""
    import torch

    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.patches.store_writer import StoreWriter

    if (target / "manifest.json").is_file() and json.loads((target / "manifest.json").read_text())["complete"]:
        return float("nan")
    cat = load_catalogue(catalogue)
    start = time.perf_counter()
    writer = StoreWriter(target, {"feature_size": feature_size, "backbone": "random", "mode": "bench",
                                  "catalogue": str(catalogue), "catalogue_hash": cat.hash()},
                         [it.id for it in cat.items], image_hashes=[it.sha256 for it in cat.items])
    rng = np.random.default_rng(1)
    feats = torch.from_numpy(rng.standard_normal((64, 74, feature_size), dtype=np.float32))
    positions = torch.from_numpy(rng.random((55, 5), dtype=np.float32))
    boxes = torch.zeros(55, 4)
    for k, i in enumerate(writer.pending()):
        writer.write(i, features=feats[k % 64], boxes=boxes, positions=positions, saliency=(0.0, 0.0, 1.0, 1.0),
                     fallback=False, size=(64, 64))
        if k % 2000 == 1999:
            writer.flush()
    writer.flush()
    return time.perf_counter() - start


def data_child(catalogue: str, store: str, batches: int) -> dict:
    """In a fresh process: build the pre-training dataset over the whole catalogue, read ``batches`` random
    batches of 32 (cold page cache), report pairs/s, construction time and peak RSS."""
    import torch

    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from kaleido_bert.config import MaskingConfig
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.inputs.pretraining import PretrainDataset, collate
    from kaleido_bert.inputs.rows import read_ahead
    from kaleido_bert.patches.store import FeatureStore

    for path in Path(store).iterdir():  # cold: evict the store from the page cache
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    start = time.perf_counter()
    cat, tokenizer = load_catalogue(catalogue), load_tokenizer()
    dataset = PretrainDataset(cat, FeatureStore(store), tokenizer,
                              masking=MaskingConfig(itm_negative_ratio=0.5, itm_hard_ratio=0.5), seed=0)
    built = time.perf_counter() - start
    order = np.random.default_rng(0).permutation(len(dataset)).tolist()
    chosen = [order[i * 32:(i + 1) * 32] for i in range(min(batches, len(order) // 32))]
    loader = DataLoader(dataset, batch_sampler=read_ahead(chosen, getattr(dataset, "prefetch", None)),
                        num_workers=0, collate_fn=lambda s: collate(s, pad_id=tokenizer.pad_token_id))
    start = time.perf_counter()
    pairs = sum(len(b["ids"]) for b in loader)
    seconds = time.perf_counter() - start
    return {"items": len(dataset), "build_s": built, "pairs_per_s": pairs / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_store(sizes: list[int], feature_size: int, batches: int) -> list[dict]:
    rows = []
    for n in sizes:
        cat = scale_catalogue(CACHE, n)
        store = CACHE / f"store-{n}-f{feature_size}"
        seconds = random_store(cat, store, feature_size)
        size = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
        child = _run([sys.executable, __file__, "--data-child", str(cat), str(store), str(batches)])
        row = {"n": n, "store_bytes": size, "bytes_per_image": size / n, "write_s": seconds,
               **json.loads(child.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- train
def bench_train(n: int, feature_size: int, steps: int) -> dict:
    """The demo-size model pre-trained ``steps`` steps on the ``n``-image store: pairs/s and data-wait share."""
    import csv

    cat, store = CACHE / f"catalogue-{n}", CACHE / f"store-{n}-f{feature_size}"
    out = Path(tempfile.mkdtemp(prefix="scale-train-"))
    start = time.perf_counter()
    _run([sys.executable, "-m", "kaleido_bert.cli", "pretrain", "--config", "demo", "--out", str(out),
          "--set", f"data.catalogue={cat}", "--set", f"data.features={store}", "--set", "data.alignments=None",
          "--set", f"model.patch_feature_size={feature_size}", "--set", f"train.max_steps={steps}",
          "--set", f"train.eval_every={steps}", "--set", f"train.save_every={steps}", "--set", "data.num_workers=0"])
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    with open(out / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("data_wait")]
    waits = [float(r["data_wait"]) for r in rows[1:]]  # the first step pays the start-up
    return {"n": n, "steps": steps, "batch": 32, "wall_s": wall, "pairs_per_s": summary.get("pairs_per_s"),
            "data_wait_share": statistics.mean(waits) if waits else None}


# ---------------------------------------------------------------------------------------------- extract
def _torchrun(nproc: int, *args: str) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if nproc == 1:
        return [sys.executable, "-m", "kaleido_bert.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "kaleido_bert.cli", *args]


def bench_extract(products: int) -> list[dict]:
    """``kaleido patches`` (tiny preset: ResNet-18, 64-px roi) on ``products`` synthetic products, 1 vs 2 processes."""
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.synth import synthesize

    cat = CACHE / f"extract-{products}"
    if not (cat / "catalogue.jsonl").is_file():
        synthesize(cat, products=products, seed=0, image_size=128, progress=False, overwrite=True)
    images = len(load_catalogue(cat).items)
    rows = []
    for nproc in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="scale-extract-")) / "store"
        start = time.perf_counter()
        _run(_torchrun(nproc, "patches", str(cat), "--out", str(out), "--config", "tiny"))
        seconds = time.perf_counter() - start
        rows.append({"processes": nproc, "images": images, "seconds": seconds, "images_per_s": images / seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- eval
def bench_eval(n: int, feature_size: int, queries: int) -> list[dict]:
    """``kaleido evaluate`` (sample-100 + full gallery) of a random-weight demo-size model, 1 vs 2 processes."""
    cat, store = CACHE / f"catalogue-{n}", CACHE / f"store-{n}-f{feature_size}"
    run = CACHE / f"eval-run-{n}"
    common = ["--config", "demo", "--set", f"data.catalogue={cat}", "--set", f"data.features={store}",
              "--set", "data.alignments=None", "--set", f"model.patch_feature_size={feature_size}",
              "--set", "model.tasks=['mlm','itm','itc']", "--set", f"eval.num_queries={queries}",
              "--set", "eval.rerank_k=20", "--set", "data.num_workers=0"]
    if not (run / "pretrain" / "latest").is_file():
        _run([sys.executable, "-m", "kaleido_bert.cli", "pretrain", "--out", str(run / "pretrain"), *common,
              "--set", "train.max_steps=1", "--set", "train.eval_every=1", "--set", "train.save_every=1"])
    rows = []
    for nproc in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="scale-eval-"))
        start = time.perf_counter()
        _run(_torchrun(nproc, "evaluate", str(run), "--out", str(out), *common))
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        sample = metrics["timings"].get("sample100")
        rows.append({"processes": nproc, "queries": 2 * queries, "wall_s": seconds, "sample100_s": sample,
                     "queries_per_s": 2 * queries / sample if sample else None,
                     "SumR": metrics.get("sample100/SumR")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def plot(results: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store, index = results.get("store") or [], results.get("index") or []
    if not store and not index:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if store:
        n = [r["n"] for r in store]
        ax = axes[0]
        ax.loglog(n, [r["store_bytes"] / 2**20 for r in store], "o-", label="store size (MiB)")
        ax.loglog(n, [r["peak_rss_mb"] for r in store], "s-", label="data pipeline peak RSS (MiB)")
        ax.loglog(n, [1e3 / r["pairs_per_s"] for r in store], "^-", label="data pipeline ms per pair (cold)")
        ax.loglog(n, [r["build_s"] for r in store], "v-", label="dataset construction (s)")
        ax.set_xlabel("catalogue images N")
        ax.set_title("store and data pipeline")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if index:
        ax = axes[1]
        for kind, marker in (("exact", "o"), ("hnsw", "s")):
            rows = [r for r in index if r["kind"] == kind]
            n = [r["n"] for r in rows]
            ax.loglog(n, [r["build_s"] for r in rows], marker + "-", label=f"{kind} build (s)")
            ax.loglog(n, [r["p50_ms"] for r in rows], marker + "--", label=f"{kind} query p50 (ms)")
        ax.set_xlabel("indexed vectors N (D = 256)")
        ax.set_title("FAISS index")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("kaleido-bert: cost against catalogue size (log-log)")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    out = DOCS / "scale.png"
    fig.savefig(out, dpi=110)
    return out


def markdown(results: dict) -> str:
    lines = ["# Scale benchmark", "", f"Machine: {results['machine']}; load before: {results['load_before']}.", ""]
    if results.get("store"):
        lines += ["## Feature store and pre-training data pipeline", "",
                  f"Random fp16 features, F = {results['feature_size']} (the `demo` preset's EfficientNet-Lite0), 74 "
                  "vectors per image. Data pipeline: `PretrainDataset` + `collate`, one thread, cold page cache, "
                  f"{results['batches']} random batches of 32 in a fresh process per N.", "",
                  "| N images | store MiB | bytes / image | dataset build s | pairs/s (cold) | peak RSS MiB |",
                  "|---|---|---|---|---|---|"]
        for r in results["store"]:
            lines.append(f"| {r['n']:,} | {r['store_bytes'] / 2**20:,.0f} | {r['bytes_per_image']:,.0f} | "
                         f"{r['build_s']:.2f} | {r['pairs_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")
        rss = [r["peak_rss_mb"] for r in results["store"]]
        lines += ["", f"Peak RSS from the smallest to the largest catalogue: {rss[0]:,.0f} → {rss[-1]:,.0f} MiB "
                  f"({100 * (rss[-1] / rss[0] - 1):+.1f} %).", ""]
    if results.get("train"):
        r = results["train"]
        lines += ["## Pre-training throughput and data wait", "",
                  f"`demo` model (4 layers, H = 256, `precision: auto`: fp32 on a CPU without native bf16), batch 32, {r['steps']} steps on the "
                  f"{r['n']:,}-image store, `data.num_workers=0`: **{r['pairs_per_s']} pairs/s**, data-wait share "
                  f"{r['data_wait_share']:.3f} of each step.", ""]
    for key, title, unit in (("extract", "Feature extraction, 1 vs 2 processes (torchrun, gloo)", "images_per_s"),
                             ("eval", "Evaluation, 1 vs 2 processes (torchrun, gloo)", "queries_per_s")):
        rows = results.get(key) or []
        if rows:
            lines += [f"## {title}", "", "| processes | " + " | ".join(k for k in rows[0] if k != "processes") + " |",
                      "|---|" + "---|" * (len(rows[0]) - 1)]
            for r in rows:
                lines.append(f"| {r['processes']} | " + " | ".join(
                    f"{v:,.2f}" if isinstance(v, float) else str(v) for k, v in r.items() if k != "processes") + " |")
            if len(rows) == 2 and rows[0].get(unit) and rows[1].get(unit):
                lines += ["", f"Speed-up with 2 processes: {rows[1][unit] / rows[0][unit]:.2f}×."]
            lines.append("")
    if results.get("index"):
        lines += ["## FAISS index (D = 256, random unit vectors, k = 10, one query at a time)", "",
                  "| N | kind | build s | build items/s | p50 ms | p95 ms | recall@10 vs exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["index"]:
            lines.append(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['build_items_per_s']:,.0f} | "
                         f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['recall@10_vs_exact']:.3f} |")
        lines.append("")
    lines += ["![cost against N](../../docs/scale.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="store,train,extract,eval,index")
    parser.add_argument("--sizes", default="1000,5000,25000", help="store sizes N (images)")
    parser.add_argument("--index-sizes", default="10000,100000,1000000")
    parser.add_argument("--feature-size", type=int, default=1280)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--extract-products", type=int, default=120)
    parser.add_argument("--eval-queries", type=int, default=100)
    parser.add_argument("--data-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_child:
        print(json.dumps(data_child(args.data_child[0], args.data_child[1], int(args.data_child[2]))))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    previous = RESULTS / "scale.json"
    results = json.loads(previous.read_text()) if previous.is_file() else {}
    results.update({"machine": machine(), "load_before": os.getloadavg(), "feature_size": args.feature_size,
                    "batches": args.batches})
    if "store" in sections:
        results["store"] = bench_store(sizes, args.feature_size, args.batches)
    if "train" in sections:
        results["train"] = bench_train(sizes[min(1, len(sizes) - 1)], args.feature_size, args.train_steps)
    if "extract" in sections:
        results["extract"] = bench_extract(args.extract_products)
    if "eval" in sections:
        results["eval"] = bench_eval(sizes[0], args.feature_size, args.eval_queries)
    if "index" in sections:
        results["index"] = bench_index([int(s) for s in args.index_sizes.split(",")])
    plot(results)
    write_result("scale", results, markdown(results))


if __name__ == "__main__":
    main()
