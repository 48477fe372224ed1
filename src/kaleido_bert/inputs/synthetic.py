"""A pre-training batch of random numbers shaped like :func:`~kaleido_bert.inputs.pretraining.collate`'s (§3.4's
inputs and AKPM labels): what the step benchmark and the demo's time estimate run the model on, without a catalogue.

Shapes: text ``(B, T)``, patches ``(B, 55, F)`` and positions ``(B, 55, 5)``, the MLM budget of
:func:`~kaleido_bert.inputs.masking.text_budget`, ``masking.grey`` and ``masking.blank`` indices and targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kaleido_bert.config import MaskingConfig, ModelConfig
from kaleido_bert.inputs.masking import IGNORE, text_budget


def synthetic_batch(m: ModelConfig, masking: MaskingConfig, b: int, seed: int = 0) -> dict[str, Tensor]:
    """``b`` pairs of random text and patches for the model section ``m``, half of them ITM positives, with the
    AKPM labels and targets of ``masking``; ``product`` ids are distinct."""
    g = torch.Generator().manual_seed(seed)
    t, p, f = m.max_text_len, m.num_patches, m.patch_feature_size
    text_ids = torch.randint(0, m.vocab_size, (b, t), generator=g)
    mlm_labels = torch.full((b, t), IGNORE, dtype=torch.long)
    k = text_budget(t - 2, masking.text_ratio, masking.text_max)  # candidates: not [CLS] nor the final [SEP]
    for row in range(b):
        picked = 1 + torch.randperm(t - 2, generator=g)[:k]
        mlm_labels[row, picked] = text_ids[row, picked]

    def index(level: int, n: int) -> Tensor:
        return torch.stack([torch.randperm(level * level, generator=g)[:n] for _ in range(b)])

    return {
        "text_ids": text_ids, "text_mask": torch.ones(b, t, dtype=torch.long), "mlm_labels": mlm_labels,
        "patch_features": torch.randn(b, p, f, generator=g).relu(),
        "patch_positions": torch.rand(b, p, 5, generator=g), "itm_label": torch.arange(b) % 2,
        "product": torch.arange(b),
        "rotation_label": torch.randint(0, 4, (b,), generator=g),
        "jigsaw_label": torch.randint(0, 24, (b,), generator=g),
        "camouflage_label": torch.randint(0, 9, (b,), generator=g),
        "grey_index": index(4, masking.grey), "grey_target": torch.randn(b, masking.grey, f, generator=g),
        "blank_index": index(5, masking.blank), "blank_target": torch.randn(b, masking.blank, f, generator=g),
    }
