"""Pre-training step throughput and MFU: Kaleido-BERT vs transformers' VisualBertForPreTraining, ± compile, fp32 / bf16.

A step is forward + backward + AdamW on a synthetic batch shaped like ``data.collate``'s output (T =
``max_text_len`` tokens, the MLM budget of ``masking.text_budget``, 2 grey and 3 blank indices, ITM labels
half 0 / half 1); VisualBert gets the same width, depth, heads, FFN, vocabulary, T text + 55 visual tokens
(the patch features), MLM labels over T+55 and ITM labels. Each configuration (preset × model × compile ×
dtype) runs in a fresh subprocess (2 threads on CPU): 2 warm-up steps (the first compiles), then 3-5 timed steps,
median reported. dtype ``bf16`` is the training loop's ``train.precision: bf16``: ``torch.autocast(device,
bfloat16)`` over the forward and the losses (``distributed.autocast``), backward and AdamW outside it, fp32
weights. FLOPs: ``FlopCounterMode`` over one eager forward + backward (plus the CPU flash-attention kernels it
does not know) in the first dtype; the other dtype and the compiled rows reuse the count. MFU = FLOPs / step
time / the matmul peak of the row's own dtype, measured in the same run (n×n matmuls, n = 1024, 2048, 4096, bf16
tensors for bf16). Peak RSS: the subprocess's own ``VmHWM`` (``ru_maxrss`` inherits the parent's across exec),
Δ = over its RSS after imports. Shapes: text (B, T), patches (B, 55, F), VisualBert's sequence (B, T + 55).

    python benchmarks/bench_pretrain.py                # tiny, demo, small; fp32 + bf16 eager, fp32 compiled (< 10 min)
    python benchmarks/bench_pretrain.py --compile-bf16 # bf16 compiled rows too (about 15 min)
    python benchmarks/bench_pretrain.py --quick        # tiny and demo, eager only, fp32 + bf16 (< 2 min)
    python benchmarks/bench_pretrain.py --dtypes fp32  # one dtype only
    python benchmarks/bench_pretrain.py --paper        # paper preset on a CUDA GPU: bf16 autocast, batch 64
    python benchmarks/bench_pretrain.py --paper --cpu  # reduced paper run on CPU: fp32 + bf16, batch 4, eager
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # importing torchvision sets it to /tmp's

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_peak_gflops, write_result  # noqa: E402

from kaleido_bert.config import ModelConfig, load_config  # noqa: E402
from kaleido_bert.distributed import (  # noqa: E402
    BF16_MIN_SPEEDUP,
    autocast,
    autocast_dtype,
    cpu_has_native_bf16,
    cpu_matmul_rates,
    machine_line,
)
from kaleido_bert.inputs.masking import IGNORE, text_budget  # noqa: E402
from kaleido_bert.inputs.synthetic import synthetic_batch  # noqa: E402

BATCH_CAP = {"tiny": 32, "demo": 32, "small": 16, "paper": 64}
"""Batch = min(the preset's train.batch_size, this cap); tiny's own batch is 6."""
COMPILE_TIMEOUT_S = 240  # a compiled configuration (compilation + 7 steps) that takes longer is reported
DTYPES = ("fp32", "bf16")
"""The step dtypes (``train.precision`` values): fp32, and bf16 autocast as the training loop runs it."""
PEAK_SIZES = (1024, 2048, 4096)
"""The matmul peak of a dtype is the best n×n matmul of these sizes (8192 too on CUDA, where 4096 does not fill
the GPU); each subprocess measures its own view with the first two (4096 on CUDA)."""
PEAK_SLOW_S = 10.0
"""A larger peak size is not tried when its 4 matmuls would take longer than this at the last size's rate
(bf16 on a CPU without native bf16 runs tens of times slower than fp32)."""


# -------------------------------------------------------------------------------------------- the worker side
LossFn = Callable[[nn.Module], Tensor]


def build(kind: str, m: ModelConfig, batch: dict[str, Tensor]) -> tuple[nn.Module, LossFn]:
    """The model and a ``loss(model)`` closure over its inputs (VisualBert's built from the same batch)."""
    if kind == "kaleido":
        from kaleido_bert.model.encoder import KaleidoBertConfig
        from kaleido_bert.model.heads import KaleidoBertForPreTraining

        model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(m))
        return model, lambda mod: mod(batch).loss
    from transformers import VisualBertConfig, VisualBertForPreTraining

    config = VisualBertConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                              num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                              vocab_size=m.vocab_size, visual_embedding_dim=m.patch_feature_size,
                              hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    b, p = batch["patch_features"].shape[:2]
    inputs = {"input_ids": batch["text_ids"], "attention_mask": batch["text_mask"],
              "visual_embeds": batch["patch_features"],
              "visual_attention_mask": torch.ones(b, p, dtype=torch.long, device=batch["text_ids"].device),
              "labels": torch.cat([batch["mlm_labels"], torch.full_like(batch["mlm_labels"][:, :1], IGNORE)
                                   .expand(-1, p)], dim=1),
              "sentence_image_labels": batch["itm_label"]}
    return VisualBertForPreTraining(config), lambda mod: mod(**inputs).loss


def count_flops(loss_fn: Callable[[], Tensor], model: nn.Module) -> dict[str, float]:
    """GFLOPs of one forward + backward (``loss_fn`` runs the forward, in its autocast): total, encoder, MLM
    head (module attribution: FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    extra = {  # the CPU SDPA kernels FlopCounterMode does not register: same formula as the CUDA ones
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with counter:
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    parts = {"encoder": ("bert.encoder", "visual_bert.encoder"), "mlm_head": ("heads.mlm", "cls.predictions")}
    out = {"total": counter.get_total_flops() / 1e9}
    for key, names in parts.items():
        out[key] = sum(by_module.get(f"{root}.{n}", 0) for n in names) / 1e9
    return out


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set in MiB; ``ru_maxrss`` off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and return its measurements."""
    if spec["model"] == "visualbert":  # imported before the RSS baseline
        import transformers.models.visual_bert.modeling_visual_bert  # noqa: F401
    import kaleido_bert.model.heads  # noqa: F401

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device, cuda = spec["device"], spec["device"] == "cuda"
    cast = autocast_dtype(spec["dtype"], torch.device(device))  # None = fp32, as the training loop resolves it
    own_sizes = (4096,) if cuda else PEAK_SIZES[:2]
    peak = max(matmul_peaks(device, spec["dtype"], own_sizes).values())  # this process's own view
    base = rss_mib("VmRSS")
    run = load_config(spec["preset"])
    m, b = run.model, spec["batch"]
    batch = {k: v.to(device) for k, v in synthetic_batch(m, run.masking, b).items()}
    model, loss_of = build(spec["model"], m, batch)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    tables = {id(x): x.weight.numel() for x in model.modules() if isinstance(x, nn.Embedding)}
    seq = m.max_text_len + m.num_patches
    out = {**spec, "seq_len": seq, "text_len": m.max_text_len, "params": params, "peak_gflops": peak,
           "non_embedding_params": params - sum(tables.values()), "load_average": os.getloadavg()[0],
           "six_n_tokens_gflop": 6 * (params - sum(tables.values())) * b * seq / 1e9,
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    runner = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward(mod: nn.Module) -> Tensor:  # the training loop's autocast: the forward and the losses only
        with autocast(torch.device(device), cast):
            return loss_of(mod)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward(runner)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    out["warmup_s"] = [step() for _ in range(2)]
    times: list[float] = []
    while len(times) < spec["steps"] and (len(times) < 3 or sum(times) < spec["budget_s"]):
        times.append(step())
    median = statistics.median(times)
    out.update(step_ms=1000 * median, best_step_ms=1000 * min(times), timed_steps=len(times),
               pairs_per_s=b / median, peak_rss_mib=rss_mib(), base_rss_mib=base)
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if spec["compile"]:
        from torch._dynamo.utils import counters

        out["graphs"] = counters["stats"]["unique_graphs"]
    if spec["count_flops"]:  # on the eager model after the RSS reading; the other rows reuse the count
        out["gflop"] = count_flops(lambda: forward(model), model)
    return out


# -------------------------------------------------------------------------------------------- the parent side
def matmul_peaks(device: str, dtype: str, sizes: tuple[int, ...] | None = None) -> dict[str, float]:
    """GFLOP/s of n×n matmuls in ``dtype`` (bf16 tensors for bf16) by size, smallest first, best of 3 each;
    ``sizes`` defaults to :data:`PEAK_SIZES` (+ 8192 on CUDA). A size is left out when it would take longer than
    :data:`PEAK_SLOW_S` (emulated bf16)."""
    sizes = sizes or (PEAK_SIZES + (8192,) if device == "cuda" else PEAK_SIZES)
    tensor_dtype = autocast_dtype(dtype, torch.device(device)) or torch.float32
    rates: dict[str, float] = {}
    for n in sizes:
        if rates and 4 * 2 * n**3 / (list(rates.values())[-1] * 1e9) > PEAK_SLOW_S:
            break
        rates[str(n)] = matmul_peak_gflops(n, 3, dtype=tensor_dtype, device=device)
    return rates


def launch(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; failures and timeouts come back as ``error`` rows."""
    cache = tempfile.mkdtemp(prefix="bench_pretrain_inductor_")  # a cold compile unless the user set one
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": USER_INDUCTOR_CACHE or cache}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - start}


def step_dtypes(args: argparse.Namespace, device: str) -> tuple[list[str], list[str]]:
    """The dtypes of the eager rows and of the compiled rows: ``--dtypes`` (default fp32 + bf16 on CPU, bf16 on
    CUDA); on CPU the compiled rows are fp32 only unless ``--compile-bf16`` (both would not fit 10 minutes)."""
    dtypes = list(dict.fromkeys(args.dtypes or (["bf16"] if device == "cuda" else list(DTYPES))))
    both = args.compile_bf16 or device == "cuda" or "fp32" not in dtypes
    return dtypes, dtypes if both else ["fp32"]


def plan(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """Every eager configuration first (all of the first dtype, then the next), then the compiled ones (which
    the run-time budget may cut). FLOPs are counted in the eager rows of the first dtype."""
    dtypes, compile_dtypes = step_dtypes(args, device)
    if args.paper:
        presets, compiled = ["paper"], ([False, True] if device == "cuda" else [False])
    else:
        presets = args.presets or (["tiny", "demo"] if args.quick else ["tiny", "demo", "small"])
        compiled = [False] if args.quick or args.no_compile else [False, True]
    try:
        from transformers import VisualBertForPreTraining  # noqa: F401
        models = ("kaleido", "visualbert")
    except ImportError:
        models = ("kaleido",)
    specs = []
    for comp in compiled:
        for dtype in compile_dtypes if comp else dtypes:
            for preset in presets:
                own = load_config(preset).train.batch_size
                batch = args.batch or (4 if device == "cpu" and args.paper else min(own, BATCH_CAP[preset]))
                if comp and not args.paper and preset not in args.compile_presets:
                    continue
                specs += [{"preset": preset, "model": model, "compile": comp, "dtype": dtype, "batch": batch,
                           "device": device, "threads": args.threads, "steps": args.steps,
                           "budget_s": 3 if args.quick else 20,
                           "count_flops": not comp and dtype == dtypes[0]} for model in models]
    return specs


NAMES = {"kaleido": "Kaleido-BERT", "visualbert": "VisualBert"}


def dtype_peaks(rows: list[dict[str, Any]], peaks: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Each dtype's matmul peak: the best of the parent's sweeps (before and after) and the subprocesses' own."""
    best = {d: max(rate for sweep in sweeps for rate in sweep.values()) for d, sweeps in peaks.items()}
    for r in rows:
        if "peak_gflops" in r:
            best[r["dtype"]] = max(best.get(r["dtype"], 0.0), r["peak_gflops"])
    return best


def bf16_support(device: str) -> dict[str, Any]:
    """Whether ``device`` computes bf16 natively, what ``precision: auto`` picks there and why (for the report)."""
    m = machine()
    native = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_native_bf16()
    return {"native": native, "flags": m["flags"], "auto_precision": m["precision"], "auto": machine_line(),
            "rates_gflops": cpu_matmul_rates() if device == "cpu" and native else None}


def bf16_sentence(support: dict[str, Any]) -> str:
    """The report's sentence on this CPU's bf16: native or emulated, and ``precision: auto``'s choice."""
    flags = ", ".join(support["flags"]) or "not even avx2"
    if support["native"]:
        text = (f"This CPU has native bf16 (oneDNN's check says yes; speed flags: {flags}), so bf16 matmuls run "
                "in hardware.")
    else:
        text = (f"This CPU has no native bf16 (neither AVX512-BF16 nor AMX; speed flags: {flags}): bf16 matmuls "
                "are emulated, far slower than fp32.")
    text += f" `precision: auto` here: {support['auto']}"
    rates = support["rates_gflops"]
    if rates and support["auto_precision"] == "bf16":
        text += (f" (its bf16 matmuls measured at {rates['bf16']:.0f} GFLOP/s against fp32's {rates['fp32']:.0f},"
                 f" at least {BF16_MIN_SPEEDUP}×)")
    return text + "."


def speed_paragraph(preset: str, rows: list[dict[str, Any]], dtypes: list[str]) -> str | None:
    """One preset's speed comparison: bf16 / fp32 step speed per model, Kaleido-BERT / VisualBert per dtype."""
    ok = {(r["model"], r["compile"], r["dtype"]): r["step_ms"] for r in rows
          if r["preset"] == preset and "step_ms" in r}
    parts = []
    for comp, mode in ((False, "eager"), (True, "compiled")):
        ratios = [f"{NAMES[m]} {ok[m, comp, 'fp32'] / ok[m, comp, 'bf16']:.2f}×" for m in NAMES
                  if (m, comp, "fp32") in ok and (m, comp, "bf16") in ok]
        versus = [f"{d} {ok['visualbert', comp, d] / ok['kaleido', comp, d]:.2f}×" for d in dtypes
                  if ("kaleido", comp, d) in ok and ("visualbert", comp, d) in ok]
        said = ([f"bf16 / fp32 speed {', '.join(ratios)}"] if ratios else []) + (
            [f"Kaleido-BERT / VisualBert speed {', '.join(versus)}"] if versus else [])
        if said:
            parts.append(f"{mode}: " + "; ".join(said) + ".")
    return f"{preset}, " + " ".join(parts) if parts else None


def report(rows: list[dict[str, Any]], peaks: dict[str, list[dict[str, float]]], device: str,
           loads: list[str], support: dict[str, Any]) -> str:
    """The markdown: peaks per dtype, the table (preset × model × compile × dtype), FLOP split, speed ratios."""
    peak = dtype_peaks(rows, peaks)
    dtypes = [d for d in DTYPES if d in peaks]
    counted = {(r["preset"], r["model"]): r for r in rows if "gflop" in r}
    where = "CUDA" if device == "cuda" else f"CPU, {rows[0]['threads']} threads"
    memory_head = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB (Δ)"
    sizes = ", ".join(map(str, PEAK_SIZES + ((8192,) if device == "cuda" else ())))
    lines = ["# Pre-training step: Kaleido-BERT vs transformers' VisualBertForPreTraining", "",
             f"Measured matmul peaks ({where}), each the best n×n matmul (n = {sizes}; bf16 tensors for bf16) "
             "of the parent's sweeps before and after the runs and a smaller one in each subprocess; each row's "
             "MFU is against the peak of its own dtype:", ""]
    for d in dtypes:
        sweeps = "; ".join(f"{when}: " + ", ".join(f"{n}² {v:.0f}" for n, v in sweep.items())
                           for when, sweep in zip(("before", "after"), peaks[d], strict=False))
        lines.append(f"- {d}: {peak[d]:.0f} GFLOP/s ({sweeps})")
    versions = (f"torch {torch.__version__}, transformers {__import__('transformers').__version__}. "
                f"Load average before / after: {loads[0]} / {loads[1]}.")
    lines += ["", (bf16_sentence(support) + " " if device == "cpu" else "") + versions]
    lines += ["", "| preset | model | compile | dtype | batch | seq len (T+P) | params | step ms | pairs/s | "
              f"GFLOP/step | 6·N·tok GFLOP | GFLOP/s | MFU | {memory_head} |", "|" + "---|" * 14]
    for r in rows:
        head = f"| {r['preset']} | {r['model']} | {'on' if r['compile'] else 'off'} | {r['dtype']} | {r['batch']} |"
        flops = counted.get((r["preset"], r["model"]), {}).get("gflop")
        if "error" in r or not flops:
            lines.append(head + f" {r.get('error', 'no eager FLOP count')} |" + " |" * 8)
            continue
        r["gflop"] = flops
        r["achieved_gflops"] = flops["total"] / (r["step_ms"] / 1000)
        r["mfu_peak_gflops"] = peak[r["dtype"]]
        r["mfu"] = r["achieved_gflops"] / peak[r["dtype"]]
        memory = (f"{r['peak_cuda_mib']:.0f}" if device == "cuda"
                  else f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['base_rss_mib']:.0f})")
        lines.append(head + f" {r['seq_len']} ({r['text_len']}+{r['seq_len'] - r['text_len']}) | "
                     f"{r['params'] / 1e6:.2f} M | {r['step_ms']:.0f} | {r['pairs_per_s']:.1f} | "
                     f"{flops['total']:.2f} | {r['six_n_tokens_gflop']:.2f} | {r['achieved_gflops']:.1f} | "
                     f"{r['mfu']:.1%} | {memory} |")
    if not any(r["model"] == "visualbert" for r in rows):
        lines += ["", "VisualBertForPreTraining is not in this transformers: its rows are skipped."]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    speeds = [p for p in (speed_paragraph(preset, rows, dtypes) for preset in presets) if p]
    if speeds:
        lines += ["", "Step speed ratios, from the median step times (above 1× the first is faster): "
                  "bf16 / fp32 = fp32 ms ÷ bf16 ms of the same model, Kaleido-BERT / VisualBert = VisualBert ms "
                  "÷ Kaleido-BERT ms in the same dtype."]
        lines += [f"\n{p}" for p in speeds]
    first = next((r["dtype"] for r in counted.values()), dtypes[0])
    lines += ["", f"Where the counted FLOPs of one forward + backward go (eager, {first}; the other rows reuse the "
              "count):", "",
              "| preset | model | GFLOP/step | encoder | MLM head | rest (embeddings, other heads, pooler) |",
              "|---|---|---|---|---|---|"]
    for (preset, model), r in counted.items():
        f = r["gflop"]
        rest = 1 - (f["encoder"] + f["mlm_head"]) / f["total"]
        lines.append(f"| {preset} | {model} | {f['total']:.2f} | {f['encoder'] / f['total']:.0%} | "
                     f"{f['mlm_head'] / f['total']:.0%} | {rest:.0%} |")
    for preset in dict.fromkeys(p for p, _ in counted):
        k, v = counted.get((preset, "kaleido")), counted.get((preset, "visualbert"))
        if k and v:
            cfg = load_config(preset)
            masked = text_budget(k["text_len"] - 2, cfg.masking.text_ratio, cfg.masking.text_max)
            kf, vf = k["gflop"], v["gflop"]
            lines.append(f"\n{preset}: VisualBert's MLM head costs {vf['mlm_head']:.2f} GFLOP/step "
                         f"({vf['mlm_head'] / vf['total']:.0%} of its step) and Kaleido-BERT's "
                         f"{kf['mlm_head']:.2f} ({kf['mlm_head'] / kf['total']:.0%}): VisualBert projects "
                         f"all T+P = {v['seq_len']} positions of a pair onto the {cfg.model.vocab_size}-word "
                         f"vocabulary, Kaleido-BERT only its {masked} masked text positions.")
    compiled = [r for r in rows if r["compile"] and "error" not in r]
    if compiled:
        eager = {(r["preset"], r["model"], r["dtype"]): r for r in rows if not r["compile"] and "step_ms" in r}
        lines += ["", "torch.compile (the first warm-up step includes compilation, each from an empty "
                  "inductor cache unless TORCHINDUCTOR_CACHE_DIR is set; graphs = FX graphs dynamo compiled, "
                  "1 = no graph break):", ""]
        for r in compiled:
            e = eager.get((r["preset"], r["model"], r["dtype"]))
            speed = f"; eager step / compiled step = {e['step_ms'] / r['step_ms']:.2f}" if e else ""
            lines.append(f"- {r['preset']} / {r['model']} / {r['dtype']}: first step {r['warmup_s'][0]:.0f} s, "
                         f"{r['graphs']} graphs{speed}.")
    return "\n".join(lines) + "\n"


NOTES = """
Step = forward + backward + AdamW, {precision}. bf16 = `torch.autocast(device, torch.bfloat16)` over the forward
and the losses, backward and AdamW outside it, fp32 weights and optimizer state (the training loop's
`train.precision: bf16`; bf16 needs no GradScaler). Compiled rows: {compiled}. Batch = {batch}. Timed steps
follow 2 warm-up steps; the median is shown (best step, load average and settings per row in the JSON).
GFLOP/step is counted by FlopCounterMode on the eager model (matmuls and attention; element-wise ops, softmax,
LayerNorm and the optimizer count nothing) and reused for the other rows. 6·N·tok = 6 × non-embedding parameters
× B·(T+P), the textbook estimate: it leaves out attention scores and the tied vocabulary projection, and it
charges every token with all five patch projections and every head. VisualBert computes MLM and ITM only
(Kaleido-BERT: 7 tasks); Kaleido-BERT runs BERT's SDPA attention, VisualBert its eager attention. Peak RSS is
each configuration subprocess's VmHWM (Δ: over its RSS after imports; inductor's compile workers, separate
processes, are not in it). Two-thread CPU timings are very sensitive to other load on the machine (an OpenMP
thread waits for a descheduled peer at every barrier).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and demo, eager only (< 2 min)")
    parser.add_argument("--paper", action="store_true", help="paper preset on a CUDA GPU (bf16, batch 64)")
    parser.add_argument("--cpu", action="store_true", help="with --paper: a reduced CPU run (batch 4, eager)")
    parser.add_argument("--presets", nargs="+", default=None, choices=list(BATCH_CAP),
                        help="default: tiny demo small (tiny demo with --quick)")
    parser.add_argument("--compile-presets", nargs="+", default=["tiny", "demo", "small"],
                        help="presets also run under torch.compile")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                        help="step dtypes (default: fp32 bf16 on CPU, bf16 on CUDA); bf16 = autocast")
    parser.add_argument("--compile-bf16", action="store_true",
                        help="on CPU, compiled rows in bf16 too (default: compiled rows in fp32 only)")
    parser.add_argument("--batch", type=int, default=None, help="override every preset's batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (fewer, ≥3, when a config is slow)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=9.25,
                        help="stop launching configurations (compiled ones run last) after this many minutes")
    parser.add_argument("--result", default="pretrain",
                        help="write results/NAME.md and .json (NAME_quick / NAME_paper for --quick / --paper)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.paper and not args.cpu and not torch.cuda.is_available():
        sys.exit("bench_pretrain.py --paper needs a CUDA GPU (bf16 autocast, batch 64) and none is visible; "
                 "use --paper --cpu for a reduced run on CPU (batch 4, eager only).")
    device = "cuda" if args.paper and not args.cpu else "cpu"
    specs = plan(args, device)
    dtypes, compile_dtypes = step_dtypes(args, device)
    torch.set_num_threads(args.threads)
    support = bf16_support(device)  # measures auto's fp32/bf16 rates before the runs load the machine
    loads, start = [os.getloadavg()], time.perf_counter()
    peaks: dict[str, list[dict[str, float]]] = {d: [matmul_peaks(device, d)] for d in dtypes}
    rows = []
    for spec in specs:
        left = args.budget_min * 60 - (time.perf_counter() - start)
        timeout = min(COMPILE_TIMEOUT_S if spec["compile"] else 600, left)
        skipped = {**spec, "error": f"skipped: past --budget-min {args.budget_min}"}
        r = launch(spec, timeout) if timeout > 30 else skipped
        rows.append(r)
        done = r.get("error") or (f"{r['step_ms']:.0f} ms/step, {r['pairs_per_s']:.1f} pairs/s, first step "
                                  f"{r['warmup_s'][0]:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"{spec['preset']:>5} {spec['model']:>10} compile={spec['compile']!s:5} {spec['dtype']} {done}",
              flush=True)
    for d in dtypes:
        peaks[d].append(matmul_peaks(device, d))
    load_text = [" ".join(f"{x:.1f}" for x in la) for la in loads + [os.getloadavg()]]
    caps = ", ".join(f"{k} {v}" for k, v in BATCH_CAP.items() if k != "paper" or args.paper)
    batch = (f"{args.batch} (--batch)" if args.batch else "4 (the reduced --paper --cpu run)"
             if args.paper and device == "cpu" else f"min(preset train.batch_size, {caps})")
    where = "on CUDA" if device == "cuda" else f"on CPU, {args.threads} threads"
    precision = " and ".join(d if d == "fp32" else "bf16 autocast" for d in dtypes) + " " + where
    if any(s["compile"] for s in specs):
        compiled = " and ".join(compile_dtypes) + ("" if compile_dtypes == dtypes else " only (--compile-bf16 "
                                                   "adds bf16)")
    else:
        compiled = "none (eager only)"
    rows.sort(key=lambda r: (list(BATCH_CAP).index(r["preset"]), r["model"], r["compile"],
                             DTYPES.index(r["dtype"])))
    markdown = report(rows, peaks, device, load_text, support) + NOTES.format(
        precision=precision, batch=batch, compiled=compiled)
    name = args.result + ("_paper" if args.paper else "_quick" if args.quick else "")
    write_result(name, {"peak_gflops": peaks, "bf16_support": support, "load_average": load_text,
                        "device": device, "dtypes": dtypes, "compile_dtypes": compile_dtypes,
                        "machine": machine(), "transformers": __import__("transformers").__version__,
                        "rows": rows}, markdown)


if __name__ == "__main__":
    main()
