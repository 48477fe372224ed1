"""The alignment generator's output type (paper §3.3): one word of a description aligned to one Kaleido patch.

Produced by :mod:`kaleido_bert.align.alignment`, consumed by the alignment-guided masking of
:mod:`kaleido_bert.inputs.masking` (paper §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AlignedPair:
    """A word of the description aligned to a patch (AAG output, paper §3.3).

    Attributes:
        tokens: positions of the word's WordPieces in the tokenised sequence (``[CLS]`` is position 0).
        level: Kaleido level of the patch (3, 4 or 5).
        patch: index of the patch inside its level (row-major).
    """

    tokens: tuple[int, ...]
    level: int
    patch: int
