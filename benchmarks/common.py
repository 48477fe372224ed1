"""Shared benchmark helpers: the offline environment, the machine's measured matmul peak (fp32 or bf16) and result writing.

Every benchmark imports this module before anything from ``kaleido_bert`` or ``transformers``, so the model hubs
are never asked (the machines have no route to them) and tokenizers do not fork threads under the CLI's workers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from kaleido_bert.distributed import describe_machine, machine_line  # noqa: E402  (after the offline environment)

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak_gflops(n: int = 4096, repeats: int = 3, *, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of an n×n matmul in ``dtype`` on ``device`` (fp32 on the CPU by default,
    with the current torch thread count)."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine(precision: str = "auto") -> dict:
    """The machine a result was measured on: CPU model, speed flags, threads, device, precision, torch version."""
    return {**describe_machine(precision), "torch": torch.__version__}


def machine_note(precision: str = "auto") -> str:
    """One line for a result's markdown: the CPU, its speed flags, threads, device, precision and torch."""
    return f"Machine: {machine_line(precision)}; torch {torch.__version__}."


def write_result(name: str, payload: dict, markdown: str, *, precision: str = "auto") -> None:
    """``results/NAME.json`` and ``results/NAME.md``; both name the machine (the markdown gets a closing
    :func:`machine_note` unless it already has a ``Machine:`` line)."""
    payload = {"machine": machine(precision), **payload}
    if "Machine:" not in markdown:
        markdown = markdown.rstrip("\n") + "\n\n" + machine_note(precision) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
