"""The dual encoder in onnxruntime against PyTorch: parity, the recall int8 costs, query latency and throughput.

On a trained run's retrieval model (``finetune/retrieval``, else ``pretrain``; the frozen member's ensemble included
when the checkpoint has one), exported with ``kaleido export --format onnx --int8`` into ``--export`` (default
``benchmarks/.cache/onnx-<config hash>/``, git-ignored; reused while the model is the same):

* (a) parity: the first ``--queries`` test-split product descriptions against every test image, cosines of ONNX
  fp32 and int8 against PyTorch: max |Δcos| and the share of queries whose top-10 images are the same list;
* (b) full-gallery text → image recall R@1/5/10 over the test split (the protocol of ``kaleido evaluate``: every
  image of the described product is a hit), embedded by PyTorch, ONNX fp32 and ONNX int8, no re-ranking;
* (c) latency of one text query (batch 1, from the string: tokenise + text tower) and throughput at batch 64 of
  texts and of images (patch features from the store), median over ``--repeats`` after warm-up, PyTorch and
  onnxruntime on the same number of threads (``--threads``, default all cores).

    python benchmarks/bench_onnx.py --run runs/demo [--queries 100] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
BACKENDS = ("pytorch", "onnx fp32", "onnx int8")
K = 10


def export(data, directory: Path | None) -> Path:
    """The run's ONNX export with int8 towers, written once per config hash."""
    from kaleido_bert.serve.onnx_export import export_onnx
    from kaleido_bert.serve.onnx_runtime import MANIFEST, read_manifest

    directory = directory or CACHE / f"onnx-{data.config_hash()}"
    if (directory / MANIFEST).is_file():
        found = read_manifest(directory)
        if found.get("int8") and found["source"]["checkpoint"] == str(data.checkpoint):
            return directory
    start = time.perf_counter()
    export_onnx(data.run, directory, int8=True, overwrite=True)
    print(f"exported {data.checkpoint} to {directory} in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parity(want: np.ndarray, got: np.ndarray) -> dict:
    """max |Δcos| and the share of queries (rows) whose top-K columns are the same list, in the same order."""
    k = min(K, want.shape[1])
    top_want = np.argsort(-want, axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-got, axis=1, kind="stable")[:, :k]
    same = (top_want == top_got).all(axis=1)
    return {"max_abs_dcos": float(np.abs(got - want).max()), "mean_abs_dcos": float(np.abs(got - want).mean()),
            "top10_identical": float(same.mean()), "queries": int(len(want))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="trained run directory or checkpoint")
    parser.add_argument("--export", type=Path, default=None, help="export directory (default: the cache)")
    parser.add_argument("--queries", type=int, default=100, help="test descriptions of the parity check")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per latency figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch and onnxruntime threads")
    parser.add_argument("--name", default="onnx", help="result file name in benchmarks/results/")
    args = parser.parse_args()

    from kaleido_bert.data.catalogue import is_view
    from kaleido_bert.eval.baseline import EmbeddingScorer
    from kaleido_bert.eval.retrieval import evaluate_gallery
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
    from kaleido_bert.serve.catalogue_index import open_run
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder, read_manifest

    torch.set_num_threads(args.threads)
    data = open_run(args.run)
    directory = export(data, args.export)
    manifest = read_manifest(directory)
    encoders = {"pytorch": DualEncoder.from_checkpoint(data.checkpoint, device="cpu"),
                "onnx fp32": OnnxDualEncoder(directory, threads=args.threads),
                "onnx int8": OnnxDualEncoder(directory, int8=True, threads=args.threads)}

    test = [it for it in data.catalogue.split("test") if it.id in data.store and not is_view(it)]
    descriptions = product_descriptions(test)
    pids = sorted(descriptions)
    feats, pos = store_patches(data.store, [it.id for it in test])
    embedded = {}
    for name, encoder in encoders.items():
        images = feats if name == "pytorch" else feats.numpy()
        positions = pos if name == "pytorch" else pos.numpy()
        embedded[name] = (encoder.embed_texts([descriptions[p] for p in pids]),
                          encoder.embed_patches(images, positions))

    # (a) parity on the first --queries descriptions against the whole test gallery
    n = min(args.queries, len(pids))
    reference = embedded["pytorch"][0][:n] @ embedded["pytorch"][1].T
    parity_rows = {name: parity(reference, text[:n] @ image.T) for name, (text, image) in embedded.items()
                   if name != "pytorch"}

    # (b) full-gallery text → image recall, the evaluation's protocol
    recall = {}
    for name, (text, image) in embedded.items():
        scorer = EmbeddingScorer(dict(zip([it.id for it in test], image, strict=True)),
                                 dict(zip(pids, text, strict=True)))
        found = evaluate_gallery(scorer, data.catalogue, {it.id for it in test}, split="test", rerank_k=0,
                                 progress=False)["metrics"]
        recall[name] = {f"R@{k}": round(found[f"tir_gallery/R@{k}"], 2) for k in (1, 5, 10)}

    # (c) latency of one query and throughput at batch 64
    queries = [descriptions[p] for p in pids] * (1 + 64 // max(1, len(pids)))
    batch_texts, batch = queries[:64], min(64, len(test))
    timing = {}
    for name, encoder in encoders.items():
        images, positions = (feats[:batch], pos[:batch]) if name == "pytorch" else (feats[:batch].numpy(),
                                                                                   pos[:batch].numpy())
        one = median_seconds(lambda e=encoder: e.embed_texts(queries[:1]), args.repeats)
        texts = median_seconds(lambda e=encoder: e.embed_texts(batch_texts), max(3, args.repeats // 5))
        imgs = median_seconds(lambda e=encoder, a=images, b=positions: e.embed_patches(a, b),
                              max(3, args.repeats // 5))
        timing[name] = {"query_ms": round(1000 * one, 2), "texts_per_s": round(len(batch_texts) / texts, 1),
                        "images_per_s": round(batch / imgs, 1)}
        print(name, timing[name], flush=True)

    sizes = {f: round((directory / f).stat().st_size / 2**20, 1) for f in
             ("text.onnx", "image.onnx", "text.int8.onnx", "image.int8.onnx")}
    payload = {"run": str(args.run), "checkpoint": str(data.checkpoint), "config_hash": data.config_hash(),
               "embedding_size": manifest["embedding_size"], "member": manifest["ensemble"]["member"],
               "threads": args.threads, "test_images": len(test), "test_products": len(pids),
               "parity": parity_rows, "recall": recall, "timing": timing, "sizes_mib": sizes,
               "onnxruntime": __import__("onnxruntime").__version__, "opset": manifest["opset"]}
    write_result(args.name, payload, render(payload))


def render(p: dict) -> str:
    member = "the ensemble with its frozen member" if p["member"] else "no frozen member"
    lines = [f"# The dual encoder in onnxruntime vs PyTorch: `{p['run']}`", "",
             f"Model: `{p['checkpoint']}` ({member}; D' = {p['embedding_size']}; config hash {p['config_hash']}), "
             f"exported with `kaleido export --format onnx --int8` (opset {p['opset']}, onnxruntime "
             f"{p['onnxruntime']}). Test split: {p['test_products']} products, {p['test_images']} images. "
             f"{p['threads']} threads for PyTorch and onnxruntime alike.", "",
             f"## Parity: {p['parity']['onnx fp32']['queries']} test descriptions against the test gallery", "",
             "| backend | max abs Δcos | mean abs Δcos | top-10 lists identical |", "|---|---|---|---|"]
    for name, row in p["parity"].items():
        lines.append(f"| {name} | {row['max_abs_dcos']:.2e} | {row['mean_abs_dcos']:.2e} | "
                     f"{100 * row['top10_identical']:.0f}% |")
    lines += ["", "## Full-gallery text → image recall (test split, %)", "", "| backend | R@1 | R@5 | R@10 |",
              "|---|---|---|---|"]
    for name, row in p["recall"].items():
        lines.append(f"| {name} | {row['R@1']} | {row['R@5']} | {row['R@10']} |")
    lines += ["", "## Speed (median; a query = one string → its embedding, tokenisation included)", "",
              "| backend | one text query, ms | texts/s at batch 64 | images/s at batch 64 |", "|---|---|---|---|"]
    for name, row in p["timing"].items():
        lines.append(f"| {name} | {row['query_ms']} | {row['texts_per_s']} | {row['images_per_s']} |")
    s = p["sizes_mib"]
    lines += ["", f"Files: text {s['text.onnx']} MiB (int8 {s['text.int8.onnx']}), image {s['image.onnx']} MiB "
              f"(int8 {s['image.int8.onnx']}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
