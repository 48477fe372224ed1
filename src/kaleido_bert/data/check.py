"""``kaleido data check DIR``: validate a catalogue directory and recompute its statistics.

The catalogue is loaded with :func:`kaleido_bert.data.catalogue.load_catalogue` (format, duplicate ids, the split
rule, labels), then every image is inspected from its header (:func:`kaleido_bert.data.images.inspect_image`, no
full decode) and compared with the content hash ``catalogue.jsonl`` recorded for it. Problems are records ``{"id", "image", "problem", "level"}`` with level ``error`` (the catalogue
cannot be used as is) or ``warning`` (e.g. a stale ``stats.json``). The stats are those of ``stats.json``,
recomputed, plus image width/height quantiles and the problem count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kaleido_bert.atomic import read_json
from kaleido_bert.data.catalogue import (
    STATS_FILE,
    CatalogueError,
    compute_stats,
    file_sha256,
    load_catalogue,
    quantiles,
)
from kaleido_bert.data.images import ImageProblem, inspect_image
from kaleido_bert.errors import KaleidoError

LISTED_PROBLEMS = 10
"""How many problems :meth:`CheckReport.format` lists one by one."""
COMPARED_STATS = ("items", "products", "categories", "subcategories", "splits")


@dataclass
class CheckReport:
    """The outcome of :func:`check_catalogue`: recomputed stats, problem records and whether it is usable."""

    stats: dict
    problems: list[dict] = field(default_factory=list)
    ok: bool = True

    def format(self) -> str:
        """A compact multi-line table for the terminal (the first problems listed one per line)."""
        s = self.stats
        errors = sum(p.get("level", "error") == "error" for p in self.problems)
        lines = [f"catalogue {s.get('root', '')}: " + ("OK" if self.ok else f"NOT OK ({errors} errors)")]

        def row(name: str, value: Any) -> None:
            lines.append(f"  {name:<18} {value}")

        if "items" in s:
            row("items", f"{s['items']:,}")
            row("products", f"{s['products']:,}")
            if s.get("views"):
                row("scaled views", f"{s['views']:,} training rows (kaleido data views)")
            row("categories", f"{s['categories']:,}")
            row("sub-categories", f"{s['subcategories']:,}")
            per_product = s.get("products_per_split", {})
            row(
                "splits",
                " · ".join(
                    f"{k} {v:,} ({per_product.get(k, 0):,} products)" for k, v in s.get("splits", {}).items()
                ),
            )
            row("description words", _quantile_line(s.get("description_words", {})))
        for key, name in (("image_width", "image width px"), ("image_height", "image height px")):
            if s.get(key):
                row(name, _quantile_line(s[key]))
        if s.get("non_rgb_images"):
            row("non-RGB images", f"{s['non_rgb_images']:,} (converted to RGB when loaded)")
        row("problems", f"{len(self.problems):,}" + (f" ({errors} errors)" if self.problems else ""))
        listed = sorted(self.problems, key=lambda p: p.get("level", "error") != "error")[:LISTED_PROBLEMS]
        for p in listed:
            who = f"item {p['id']}: " if p.get("id") else ""
            lines.append(f"    {p.get('level', 'error')}: {who}{p['problem']}")
        if len(self.problems) > LISTED_PROBLEMS:
            lines.append(f"    … and {len(self.problems) - LISTED_PROBLEMS:,} more")
        return "\n".join(lines)


def _quantile_line(q: dict[str, float]) -> str:
    return " · ".join(f"{k} {v:g}" for k, v in q.items()) if q else "-"


def _stale_stats(root: Path, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Warnings for ``stats.json`` numbers that differ from the recomputed ones."""
    path = root / STATS_FILE
    if not path.is_file():
        return [{"problem": f"{STATS_FILE} is missing", "level": "warning"}]
    try:
        stored = read_json(path, dict)
    except KaleidoError as err:  # not valid JSON or not an object: a warning, the numbers are recomputed anyway
        return [{"problem": str(err), "level": "warning"}]
    return [
        {
            "problem": f"{STATS_FILE} is stale: {key} is {stored.get(key)} there, {stats[key]} recomputed",
            "level": "warning",
        }
        for key in COMPARED_STATS
        if stored.get(key) != stats[key]
    ]


def check_catalogue(root: str | Path, *, images: bool = True, progress: bool = True) -> CheckReport:
    """Validate a catalogue directory and recompute its statistics.

    Args:
        root: the catalogue directory.
        images: also inspect every image (header plus a cheap integrity pass).
        progress: show a progress bar over the images.

    Returns:
        A :class:`CheckReport`; ``ok`` is False when there is any error-level problem (a catalogue that does
        not load, a missing or corrupt image, an image path outside the directory).
    """
    root = Path(root)
    try:
        cat = load_catalogue(root)
    except CatalogueError as err:
        return CheckReport(
            stats={"root": str(root), "problems": 1},
            problems=[{"problem": str(err), "level": "error"}],
            ok=False,
        )
    stats: dict[str, Any] = {"root": str(root), **compute_stats(cat.items)}
    problems = _stale_stats(root, stats)
    widths, heights, non_rgb = [], [], 0
    inside = root.resolve()
    for it in cat.items:
        path = cat.image_path(it)
        if Path(it.image).is_absolute() or not path.resolve().is_relative_to(inside):
            problems.append(
                {
                    "id": it.id,
                    "image": it.image,
                    "problem": f"image path {it.image} is outside the catalogue directory",
                    "level": "error",
                }
            )
    if images:
        for it in tqdm(cat.items, desc=f"check {root.name}", unit="image", disable=not progress):
            try:
                info = inspect_image(cat.image_path(it))
                if it.sha256 and file_sha256(cat.image_path(it)) != it.sha256:
                    raise ImageProblem(f"image changed after the catalogue was written (its SHA-256 differs from "
                                       f"the one in catalogue.jsonl): {cat.image_path(it)}")
            except (ImageProblem, OSError) as err:
                message = str(err) if isinstance(err, ImageProblem) else f"cannot read {it.image} ({err.strerror})"
                problems.append({"id": it.id, "image": it.image, "problem": message, "level": "error"})
                continue
            widths.append(info.width)
            heights.append(info.height)
            non_rgb += bool(info.notes)
        stats.update(image_width=quantiles(widths), image_height=quantiles(heights), non_rgb_images=non_rgb)
    stats["problems"] = len(problems)
    ok = not any(p["level"] == "error" for p in problems)
    return CheckReport(stats=stats, problems=problems, ok=ok)
