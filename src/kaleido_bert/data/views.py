"""Scaled training views: a second, smaller copy of each large training image (catalogue side of paper §3.2).

Real catalogues mix resolutions: the Myntra samples are 90% 60×80 thumbnails and 10% 240×320 photos, and
shoppers search with photos. Giving each training photo a second row, the photo downscaled to the small images'
size, lets every later stage (pre-training, the classifiers, the ITC projections, the frozen baseline) see a
product at both scales without any change to them: a view is an ordinary catalogue item of the same product,
with the same texts, labels and split. Measured with the frozen probes on the 536 non-test Myntra photos
(``benchmarks/results/resolution.md``, "both views trained"): SUB image accuracy +1.3 [+0.2, +2.6], gallery
recall ITR +2.8 [+1.8, +3.9] / TIR +1.8 [+0.8, +2.8], no accuracy row resolved lower.

A view of item ``ID`` is the item ``ID@s<max_side>`` with ``extra = {"view_of": ID, "max_side": N}`` and the
image ``images/views/ID@s<N>.png``: the original through :func:`kaleido_bert.data.images.downscale`, stored
losslessly, so its features are exactly the original's extracted at ``features.max_side = N``. Only training
images whose longer side exceeds ``N`` get one; evaluation splits never do (a view there would be a second
copy of a test product in every gallery). Search indexes leave views out
(:func:`kaleido_bert.data.catalogue.is_view`).

Adding views rewrites ``catalogue.jsonl`` (its hash changes and it gains items): ``kaleido patches CAT --out
STORE`` on the catalogue's store then grows it and extracts only the views
(:func:`kaleido_bert.patches.store_writer.grow_rows`). Adding views again with the same ``max_side`` changes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kaleido_bert.atomic import atomic_path, one_line_os_errors
from kaleido_bert.data.catalogue import (
    VIEW_OF,
    Catalogue,
    CatalogueError,
    Item,
    is_view,
    load_catalogue,
    write_catalogue,
)
from kaleido_bert.data.images import MIN_SIDE, downscale, inspect_image, load_rgb

VIEW_DIR = "images/views"
VIEW_SPLITS = ("train",)
"""The splits that may hold views; validation and test keep one image per item, as users' queries come."""


def view_id(item_id: str, max_side: int) -> str:
    return f"{item_id}@s{max_side}"


def typical_side(catalogue: Catalogue, *, progress: bool = False) -> int:
    """The median longer side of the training images (read from their headers): ``--max-side auto``."""
    originals = [it for it in catalogue.items if it.split in VIEW_SPLITS and not is_view(it)]
    if not originals:
        raise CatalogueError(f"catalogue {catalogue.root} has no training images to size views by")
    sides = []
    for item in tqdm(originals, desc="image sizes", unit="image", disable=not progress):
        info = inspect_image(catalogue.image_path(item))
        sides.append(max(info.width, info.height))
    return int(np.median(sides))


def add_views(root: str | Path, max_side: int | None, *, progress: bool = True) -> dict[str, Any]:
    """Add a ``max_side`` view of every training image larger than it to the catalogue at ``root``; ``None``
    sizes them by the training images' median longer side (:func:`typical_side`).

    Returns:
        ``{"added", "kept", "too_small", "views", "max_side"}``: views written now, views already there, training
        images not larger than ``max_side`` (no view), and the catalogue's views in all.

    Raises:
        CatalogueError: ``max_side`` below the smallest image side a catalogue accepts, or a failed write (one line).
        ImageProblem: an unreadable or changed image (one line naming its file). Either way ``catalogue.jsonl`` is
            left as it was.
    """
    catalogue = load_catalogue(root)
    if max_side is None:
        max_side = typical_side(catalogue, progress=progress)
    if max_side < MIN_SIDE:
        raise CatalogueError(f"views need max_side >= {MIN_SIDE} (the smallest image side a catalogue accepts), "
                             f"got {max_side}")
    have = {it.id for it in catalogue.items}
    todo, kept, small = [], 0, 0
    for item in catalogue.items:
        if is_view(item) or item.split not in VIEW_SPLITS:
            continue
        if view_id(item.id, max_side) in have:
            kept += 1
            continue
        todo.append(item)
    new: list[Item] = []
    with one_line_os_errors(f"cannot write the views of {catalogue.root}", CatalogueError):
        (catalogue.root / VIEW_DIR).mkdir(parents=True, exist_ok=True)
        for item in tqdm(todo, desc=f"views at {max_side} px", unit="image", disable=not progress):
            image = load_rgb(catalogue.image_path(item), sha256=item.sha256 or None)
            if max(image.size) <= max_side:
                small += 1
                continue
            scaled, _ = downscale(image, max_side)
            vid = view_id(item.id, max_side)
            relative = f"{VIEW_DIR}/{vid}.png"
            with atomic_path(catalogue.root / relative) as tmp:
                scaled.save(tmp, format="PNG")
            new.append(replace(item, id=vid, image=relative, sha256="",
                               extra={**item.extra, VIEW_OF: item.id, "max_side": max_side}))
    if new:  # the image files are in place before the rows that name them
        write_catalogue(catalogue.root, catalogue.items + new)
    views = sum(is_view(it) for it in catalogue.items) + len(new)
    return {"added": len(new), "kept": kept, "too_small": small, "views": views, "max_side": max_side}
