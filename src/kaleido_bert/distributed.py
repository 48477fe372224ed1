"""Devices, precision and DDP plumbing for ``torchrun``/``accelerate launch``: read the launcher's environment, join, leave.

The launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``); a plain
``python`` run has none of them and is rank 0 of 1. The backend is ``nccl`` on CUDA and ``gloo`` on CPU.
:func:`shard_batches` says which pairs each rank reads at each step (the ``DistributedSampler`` of this
package). :func:`device` and :func:`autocast_dtype` are the one device and precision choice of every stage.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank on this machine: the CUDA device index."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that logs and saves (nanoGPT's ``master_process``)."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None = fp32, no autocast).

    ``auto``: bf16 where it pays: a CUDA device that supports it, or a CPU with native bf16 (AVX512-BF16 or AMX)
    whose bf16 matmuls measure faster than fp32 (:func:`cpu_bf16_pays`); else fp32. On a CPU without native
    bf16 the matmuls are emulated and far slower than fp32 (measured: 33 s instead of ~0.7 s per demo step on an
    AVX2-only EPYC).
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16_pays() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


BF16_MIN_SPEEDUP = 1.25
"""``auto`` runs bf16 on a CPU only when its bf16 matmuls measure at least this much faster than fp32."""


@functools.cache
def cpu_matmul_rates() -> dict[str, float]:
    """GFLOP/s of a linear layer's matmul at the encoder's shapes ((2,048 × 256) @ (256 × 1,024), best of 3,
    interleaved) in fp32 and in bf16, measured once per process (about 0.1 s on 2 cores).

    Native bf16 is not always fast: on an Intel Xeon with AVX512-BF16 and no AMX, torch's bf16 matmul ran at half
    the fp32 rate, while an AVX512-BF16 EPYC ran it 1.8× faster, so ``auto`` measures rather than trusts the flags.
    """
    import time

    rates = {}
    a, b = torch.randn(2048, 256), torch.randn(256, 1024)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    for x, y in pairs.values():
        torch.mm(x, y)  # warm-up (oneDNN primitive creation)
    for _ in range(3):
        for name, (x, y) in pairs.items():
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(x, y)
            best[name] = min(best[name], (time.perf_counter() - start) / 4)
    for name, seconds in best.items():
        rates[name] = 2 * 2048 * 256 * 1024 / seconds / 1e9
    return rates


def cpu_bf16_pays() -> bool:
    """Whether ``auto`` runs bf16 on this CPU: native bf16 (AVX512-BF16 or AMX) whose matmuls measure at least
    :data:`BF16_MIN_SPEEDUP` × the fp32 rate."""
    if not cpu_has_native_bf16():
        return False
    rates = cpu_matmul_rates()
    return rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU flags that decide this package's speed: fp32 vector width, native bf16 dot products, bf16 tiles."""


def describe_machine(precision: str = "auto") -> dict[str, Any]:
    """The hardware a time was measured on: CPU model, the :data:`SPEED_FLAGS` it has, torch's thread count, the
    device, and the dtype ``precision`` resolves to there (so every reported figure can name its machine)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    dev = device()
    dtype = autocast_dtype(precision, dev)
    if dev.type == "cuda":
        model = torch.cuda.get_device_name(dev)
    return {"cpu": model, "flags": [f for f in SPEED_FLAGS if f in flags], "threads": torch.get_num_threads(),
            "device": dev.type, "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            "native_bf16": dev.type == "cuda" or cpu_has_native_bf16()}


def machine_line(precision: str = "auto") -> str:
    """:func:`describe_machine` in one line, e.g. ``Intel Xeon (avx2 avx512f avx512_bf16), 2 threads, cpu, bf16``."""
    m = describe_machine(precision)
    line = f"{m['cpu']} ({' '.join(m['flags']) or 'no avx2'}), {m['threads']} threads, {m['device']}, {m['precision']}"
    if precision == "auto" and m["device"] == "cpu":
        if not m["native_bf16"]:
            line += " (bf16 is emulated here, far slower than fp32, so auto runs fp32)"
        elif m["precision"] == "fp32":
            rates = cpu_matmul_rates()
            line += (f" (native bf16 measured at {rates['bf16']:.0f} GFLOP/s against fp32's {rates['fp32']:.0f}, "
                     f"under {BF16_MIN_SPEEDUP}×, so auto runs fp32)")
    return line


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def init() -> None:
    """Join the process group when launched with ``WORLD_SIZE > 1`` (idempotent; a no-op for one process)."""
    if not is_distributed() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (unchanged for one process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_chunks(num_items: int, chunk_size: int, fn: Callable[[int, int], Any], *, desc: str = "",
               progress: bool = False) -> list[Any]:
    """Evaluate ``fn(start, stop)`` on every chunk of ``range(num_items)``, the chunks shared out over the ranks.

    Rank ``r`` computes chunks ``r, r + W, r + 2W …``; the results are gathered to every rank and returned in
    chunk order. The chunks are those one process would use, so every chunk's result is computed on the same
    batch as in a single process, and the merged outputs match one process exactly (an embarrassingly parallel
    evaluation under ``torchrun``; one process without a launcher).
    """
    from tqdm import tqdm

    starts = list(range(0, num_items, max(1, chunk_size)))
    mine = [i for i in range(len(starts)) if i % world_size() == rank()]
    local = {i: fn(starts[i], min(num_items, starts[i] + chunk_size))
             for i in tqdm(mine, desc=desc, unit="batch", disable=not progress or not is_main(), leave=False)}
    merged: dict[int, Any] = {}
    for part in all_gather_object(local):
        merged.update(part)
    return [merged[i] for i in range(len(starts))]


def epoch_order(num_items: int, *, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of one epoch (the same on every rank and after a resume)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def shard_batches(num_items: int, *, seed: int, epoch: int, position: int, batch_size: int,
                  grad_accum: int) -> Iterator[list[tuple[int, int]]]:
    """This rank's micro-batches from step ``position`` of ``epoch`` on, endlessly, as ``(epoch, index)``.

    Step ``s`` of an epoch is the global batch ``perm[s·B:(s+1)·B]`` of :func:`epoch_order`; rank ``r`` takes
    its contiguous ``B/W`` share and splits it into ``grad_accum`` micro-batches. An incomplete last batch of
    an epoch is dropped, so every step sees exactly ``B`` pairs whatever ``W`` and ``grad_accum`` are.
    """
    share, micro = batch_size // world_size(), batch_size // (world_size() * grad_accum)
    while True:
        order = epoch_order(num_items, seed=seed, epoch=epoch)
        for step in range(position, num_items // batch_size):
            mine = order[step * batch_size:(step + 1) * batch_size][rank() * share:(rank() + 1) * share]
            for m in range(grad_accum):
                yield [(epoch, i) for i in mine[m * micro:(m + 1) * micro]]
        epoch, position = epoch + 1, 0


def cleanup() -> None:
    """Leave the process group (safe to call when none was started)."""
    if dist.is_initialized():
        dist.destroy_process_group()
