"""Synthetic catalogue generation speed: images/s for 300 products, 1 worker vs all cores (SPEC §2, demo data).

Moved here from the test suite: a speed is measured, not asserted. Writes ``results/synth.{json,md}``.
"""

from __future__ import annotations

import os
import tempfile
import time

from common import machine, write_result

from kaleido_bert.data.synth import synthesize


def main() -> None:
    rows, payload = [], {"machine": machine(), "runs": []}
    for workers in sorted({1, os.cpu_count() or 1}):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            stats = synthesize(f"{tmp}/cat", products=300, seed=0, workers=workers, progress=False)
            seconds = time.perf_counter() - start
        rate = stats["items"] / seconds
        payload["runs"].append({"workers": workers, "images": stats["items"], "seconds": seconds, "images_per_s": rate})
        rows.append(f"| {workers} | {stats['items']} | {seconds:.2f} | {rate:.0f} |")
    write_result("synth", payload, "# Synthetic catalogue generation (300 products)\n\n"
                 "| workers | images | seconds | images/s |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
