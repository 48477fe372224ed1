"""Pictures a person would rather look at than read: the Kaleido grids (paper Fig. 3), and the one PNG writer
(:func:`save_figure`) every figure of the package goes through.

matplotlib runs headless (Agg); every figure is written atomically as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from kaleido_bert.atomic import atomic_path  # noqa: E402
from kaleido_bert.patches.grid import level_slice  # noqa: E402

LEVEL_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00")


def save_figure(fig, out: str | Path, *, dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return out


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
