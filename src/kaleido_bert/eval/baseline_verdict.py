"""The model against the frozen baseline in the terminal, and whether the test split can tell them apart (beyond the paper).

:func:`baseline_summary` reads an evaluation's ``metrics.json``, ``baseline.json`` and the two per-unit outcome files
(see :mod:`kaleido_bert.eval.baseline_report`) and returns the report's "frozen baseline" section as ``report.md``
holds it (the same renderer, without its HTML-comment markers) with the paired bootstrap 95% intervals of
model − baseline, then one plain verdict line (:func:`baseline_verdict`): whether the split is large enough and
whether any row's interval excludes 0. ``kaleido demo`` prints both at the end. No arrays: rows are dicts of floats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kaleido_bert.atomic import read_json
from kaleido_bert.eval.baseline_report import (
    BEGIN,
    END,
    baseline_intervals,
    baseline_section,
    load_baseline,
    resolved_sign,
)

MIN_TEST_ITEMS = 100
"""The rule of thumb: an evaluated split with fewer items than this is too small to tell two systems apart (a
paired bootstrap over a few dozen queries gives intervals of several points on every metric), whatever the
intervals say; from this size on, the paired intervals decide (a row differs when its interval excludes 0)."""


def baseline_verdict(items: int, intervals: dict[str, dict[str, float]], *, split: str = "test") -> str:
    """One line saying whether ``items`` evaluated items and the rows' ``intervals``
    (:func:`~kaleido_bert.eval.baseline_report.baseline_intervals`) tell the model from the baseline
    (rule: :data:`MIN_TEST_ITEMS`, then an interval that excludes 0)."""
    resolved = [label for label, found in intervals.items() if resolved_sign(found)]
    spread = ("no paired intervals: the per-query outcome files are missing" if not intervals else
              "every interval spans 0" if not resolved else
              f"{len(resolved)} of {len(intervals)} intervals exclude 0")
    if items < MIN_TEST_ITEMS:
        return (f"the {split} split has {items} items: too few to tell the model from the baseline ({spread}; "
                f"at least {MIN_TEST_ITEMS} needed)")
    if not intervals:
        return f"the {split} split has {items} items, but {spread}: the differences above are untested"
    if not resolved:
        return (f"the {split} split has {items} items and every interval spans 0: the model and the baseline "
                "cannot be told apart on it")
    return (f"the {split} split has {items} items; {spread} (in bold above): "
            + ", ".join(f"{label} {'better' if resolved_sign(intervals[label]) > 0 else 'worse'}"
                        for label in resolved))


def baseline_summary(report: str | Path, items: int, *, split: str = "test") -> tuple[list[str], str] | None:
    """The baseline section of ``report/report.md`` as text lines (with its intervals) and the verdict line of
    :func:`baseline_verdict`; None when ``report`` holds no ``baseline.json`` or no ``metrics.json``."""
    report = Path(report)
    baseline, metrics_path = load_baseline(report), report / "metrics.json"
    if baseline is None or not metrics_path.is_file():
        return None
    metrics: dict[str, Any] = read_json(metrics_path, dict, what="a metrics report (a JSON object)",
                                        fix="re-run `kaleido evaluate`")
    intervals = baseline_intervals(report, metrics)
    section = [line for line in baseline_section(metrics, baseline, intervals) if line not in (BEGIN, END)]
    return section, baseline_verdict(items, intervals, split=split)
