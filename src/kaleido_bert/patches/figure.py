"""The paper's Fig. 3: an image with its saliency box and its five Kaleido grids (1×1 … 5×5, 55 patches).

:func:`draw_store_grids` reads what it draws from a catalogue and its feature store (boxes ``(55, 4)`` in the
image's pixels, the saliency box and whether it fell back to the whole image); :func:`draw_kaleido_grids` draws
given rows.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.patches import Rectangle
from PIL import Image

from kaleido_bert.data.catalogue import Catalogue
from kaleido_bert.data.images import load_rgb
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.plots import plt, save_figure

LEVEL_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00")


def draw_store_grids(catalogue: Catalogue, store: FeatureStore, ids: list[str], out: str | Path) -> Path:
    """Fig. 3 for the items ``ids`` of ``catalogue``, with the boxes ``store`` holds for them.

    Raises:
        KaleidoError: an id that is not in the catalogue (names it).
    """
    by_id = {it.id: it for it in catalogue.items}
    rows = []
    for item_id in ids:
        if item_id not in by_id:
            raise KaleidoError(f"item {item_id} is not in the catalogue {catalogue.root}")
        entry = store[item_id]
        rows.append((item_id, load_rgb(catalogue.image_path(by_id[item_id])), entry["saliency"].tolist(),
                     bool(entry["fallback"]), entry["boxes"]))
    return draw_kaleido_grids(rows, out)


def draw_kaleido_grids(rows: list[tuple[str, Image.Image, tuple, bool, object]], out: str | Path) -> Path:
    """Draw, for each item, the image with its saliency box and the five Kaleido grids (paper Fig. 3).

    Args:
        rows: ``(item_id, image, saliency_box, fallback, boxes)`` with ``boxes`` the ``(55, 4)`` patch boxes in the
            image's pixels.
        out: PNG path.
    """
    fig, axes = plt.subplots(len(rows), 6, figsize=(15, 2.7 * len(rows)), squeeze=False)
    for r, (item_id, image, sal, fallback, boxes) in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(image)
        x1, y1, x2, y2 = sal
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ec="#e41a1c"))
        ax.set_title(f"{item_id}\nsaliency box" + (" (fallback)" if fallback else ""), fontsize=8)
        for level in range(1, 6):
            ax = axes[r, level]
            ax.imshow(image)
            for bx1, by1, bx2, by2 in boxes[level_slice(level)].tolist():
                ax.add_patch(Rectangle((bx1, by1), bx2 - bx1, by2 - by1, fill=False, lw=1.2,
                                       ec=LEVEL_COLOURS[level - 1]))
            ax.set_title(f"level {level}: {level}×{level}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Kaleido patches: saliency box, then 1×1 … 5×5 grids (55 patches)", fontsize=10)
    return save_figure(fig, out)
