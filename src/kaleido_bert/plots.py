"""The one PNG writer (:func:`save_figure`) every figure of the package goes through (Fig. 3, Fig. 4, loss
curves, report examples), and the headless matplotlib they share.

matplotlib runs headless (Agg); every figure is written atomically as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kaleido_bert.atomic import atomic_path  # noqa: E402


def save_figure(fig, out: str | Path, *, dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return out
