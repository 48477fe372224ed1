"""Shared model-test helpers: tiny-config pre-training samples and batches built in memory, and the tiny model.

Samples follow :class:`kaleido_bert.inputs.pretraining.PretrainDataset`'s layout (vocab < 99, F = 24, odd text
lengths, every label field present); ``tiny_model`` is the ``tiny`` preset's pre-training model, seeded.
"""

from __future__ import annotations

import dataclasses

import torch

from kaleido_bert.config import load_config
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.model.encoder import KaleidoBertConfig
from kaleido_bert.model.heads import KaleidoBertForPreTraining


def random_sample(
    index: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    vocab: int = 99,
    feature_size: int = 24,
    positive: bool | None = None,
) -> dict:
    """One pre-training sample shaped like ``PretrainDataset``'s, fixed by ``(seed, epoch, index)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + index)
    length = int(torch.randint(5, 12, (1,), generator=g))
    text_ids = torch.randint(5, vocab, (length,), generator=g)
    text_ids[0], text_ids[-1] = 2, 3  # [CLS] … [SEP]
    mlm_labels = torch.full((length,), -100)
    for pos in torch.randperm(length - 2, generator=g)[:2] + 1:
        mlm_labels[pos], text_ids[pos] = text_ids[pos], 4  # [MASK]
    itm = int(torch.randint(0, 2, (1,), generator=g)) if positive is None else int(positive)
    return {
        "id": f"pair-{index}",
        "text_ids": text_ids,
        "mlm_labels": mlm_labels,
        "patch_features": torch.randn(55, feature_size, generator=g),
        "patch_positions": torch.rand(55, 5, generator=g),
        "itm_label": torch.tensor(itm),
        "rotation_label": torch.randint(0, 4, (), generator=g),
        "jigsaw_label": torch.randint(0, 24, (), generator=g),
        "camouflage_label": torch.randint(0, 9, (), generator=g),
        "grey_index": torch.randperm(16, generator=g)[:2],
        "grey_target": torch.randn(2, feature_size, generator=g),
        "blank_index": torch.randperm(25, generator=g)[:3],
        "blank_target": torch.randn(3, feature_size, generator=g),
    }


def random_batch(size: int = 3, *, seed: int = 0, **kwargs) -> dict:
    return collate([random_sample(i, seed=seed, **kwargs) for i in range(size)])


def tiny_model(tasks: list[str] | None = None, **changes) -> KaleidoBertForPreTraining:
    model_config = load_config("tiny").model
    model_config = dataclasses.replace(
        model_config, **changes, **({"tasks": tasks} if tasks is not None else {})
    )
    torch.manual_seed(0)
    return KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(model_config))
