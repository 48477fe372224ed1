"""Retrieval throughput: sample-100 ITM scoring (fp32 vs bf16 autocast) and full-gallery top-k (FAISS vs torch).

* **Sample-100 scoring** ranks 1,000 queries × 101 candidates per direction with the cross-encoder: 202,000 joint
  forward passes of T text + 55 patch tokens. We time :meth:`PairScorer.itm_logits`' forward on a batch shaped like
  the demo's (T = 40 WordPieces, the synthetic descriptions' median) for the ``demo`` model, fp32 and under bf16
  autocast, and report pairs/s, the time the full protocol would take, and MFU against the matmul peak of the same
  dtype measured in the same run.
* **Full gallery**: exact inner-product top-10 of Q queries over a G-item gallery of D-dim embeddings with
  ``faiss.IndexFlatIP`` against ``torch.topk`` over ``Q × G`` scores (the obvious alternative).

    python benchmarks/bench_retrieval.py            # demo model, G = 10k and 100k (≈ 1 min)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_peak_gflops, write_result  # noqa: E402

from kaleido_bert.config import load_config  # noqa: E402
from kaleido_bert.model.encoder import KaleidoBertConfig  # noqa: E402
from kaleido_bert.model.heads import KaleidoBertForPreTraining  # noqa: E402


def bf16_peak(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_flops(model, batch: dict[str, torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.heads.itm(model.bert(**batch).pooled)
    return float(counter.get_total_flops())


def scoring(batch_size: int = 128, text_len: int = 40, repeats: int = 3) -> list[dict]:
    config = load_config("demo").model
    torch.manual_seed(0)
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(config)).eval()
    batch = {"text_ids": torch.randint(1000, 30000, (batch_size, text_len)),
             "text_mask": torch.ones(batch_size, text_len, dtype=torch.long),
             "patch_features": torch.randn(batch_size, 55, config.patch_feature_size),
             "patch_positions": torch.rand(batch_size, 55, 5)}
    flops = forward_flops(model, batch)
    rows = []
    for name, dtype, peak in (("fp32", None, matmul_peak_gflops()), ("bf16 autocast", torch.bfloat16, bf16_peak())):
        def step(dtype=dtype):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model.heads.itm(model.bert(**batch).pooled)

        step()
        seconds = min(_time(step) for _ in range(repeats))
        pairs = batch_size / seconds
        rows.append({"precision": name, "pairs_per_s": round(pairs, 1),
                     "protocol_minutes": round(2 * 1000 * 101 / pairs / 60, 1),
                     "gflops_per_pair": round(flops / batch_size / 1e9, 3),
                     "achieved_gflops": round(flops / seconds / 1e9, 1), "peak_gflops": round(peak, 1),
                     "mfu": round(flops / seconds / 1e9 / peak, 3)})
    return rows


def gallery(sizes=(10_000, 100_000), queries: int = 1000, dim: int = 256, k: int = 10) -> list[dict]:
    import faiss

    rng = np.random.default_rng(0)
    rows = []
    for g in sizes:
        base = rng.standard_normal((g, dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        q = base[rng.choice(g, queries, replace=False)] + 0.1 * rng.standard_normal((queries, dim), dtype=np.float32)
        index = faiss.IndexFlatIP(dim)
        build = _time(lambda index=index, base=base: index.add(base))
        faiss_s = min(_time(lambda index=index, q=q: index.search(q, k)) for _ in range(3))
        _, faiss_idx = index.search(q, k)
        tb, tq = torch.from_numpy(base), torch.from_numpy(q)
        torch_s = min(_time(lambda tb=tb, tq=tq: torch.topk(tq @ tb.T, k, dim=1)) for _ in range(3))
        torch_idx = torch.topk(tq @ tb.T, k, dim=1).indices.numpy()
        agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(faiss_idx, torch_idx, strict=True)]))
        flops = 2 * queries * g * dim
        rows.append({"gallery": g, "queries": queries, "faiss_build_items_per_s": round(g / build),
                     "faiss_queries_per_s": round(queries / faiss_s), "torch_queries_per_s": round(queries / torch_s),
                     "faiss_gflops": round(flops / faiss_s / 1e9, 1), "torch_gflops": round(flops / torch_s / 1e9, 1),
                     "top10_agreement": round(agree, 4)})
    return rows


def main() -> None:
    score_rows, gallery_rows = scoring(), gallery()
    md = ["# Retrieval benchmark", "", f"Machine: {machine()}", "",
          "## Sample-100 scoring (demo model, batch 128, T = 40 + 55 patches)", "",
          "| precision | pairs/s | full protocol (2×1000×101 pairs) | GFLOP/pair | achieved GFLOP/s | "
          "matmul peak GFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['precision']} | {r['pairs_per_s']} | {r['protocol_minutes']} min | {r['gflops_per_pair']} | "
           f"{r['achieved_gflops']} | {r['peak_gflops']} | {r['mfu']:.1%} |" for r in score_rows]
    md += ["", "## Full-gallery exact top-10 (D = 256, 1,000 queries)", "",
           "| gallery | FAISS flat IP queries/s | torch matmul+topk queries/s | FAISS GFLOP/s | torch GFLOP/s | "
           "top-10 agreement | FAISS add items/s |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['gallery']:,} | {r['faiss_queries_per_s']:,} | {r['torch_queries_per_s']:,} | {r['faiss_gflops']} | "
           f"{r['torch_gflops']} | {r['top10_agreement']} | {r['faiss_build_items_per_s']:,} |" for r in gallery_rows]
    write_result("bench_retrieval", {"machine": machine(), "scoring": score_rows, "gallery": gallery_rows},
                 "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
