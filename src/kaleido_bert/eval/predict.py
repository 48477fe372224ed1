"""Predictions over a whole split (paper §4.2): decoded captions (FC) and class probabilities (CR/SUB).

The evaluation loops that turn a fine-tuned model and a dataset into per-item outputs; the metrics that score
them live in :mod:`kaleido_bert.eval.metrics`. Shapes: patches ``(B, 55, F)``; probabilities ``(N, C)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from kaleido_bert import distributed as dist
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.downstream import ClassificationDataset
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.model.captioning import KaleidoBertForCaptioning
from kaleido_bert.model.classification import KaleidoBertForClassification
from kaleido_bert.model.decoding import generate, generate_one_shot


def caption_split(model: KaleidoBertForCaptioning, dataset: Dataset, tokenizer: Any, *, beam_size: int,
                  max_len: int, batch_size: int = 32, method: str = "beam", progress: bool = True,
                  limit: int | None = None, length_penalty: float = 1.0) -> dict[str, str]:
    """Decode a caption for each image of ``dataset`` (a :class:`CaptionDataset`) on the model's device.

    Args:
        model: the captioning model.
        dataset: the images (only ``id``, ``patch_features`` and ``patch_positions`` are read).
        tokenizer: the WordPiece tokenizer the model was trained with.
        beam_size, max_len, length_penalty: see :func:`generate`; ``one_shot`` fills the training width's masks.
        batch_size: images per decoding batch.
        method: ``beam`` (:func:`generate`) or ``one_shot`` (:func:`generate_one_shot`).
        progress: a tqdm bar over images.
        limit: decode only the first ``limit`` images.

    Returns:
        Item id → lower-cased caption (``tokenizer.decode(ids, skip_special_tokens=True)``).
    """
    if method not in ("beam", "one_shot"):
        raise KaleidoError(f"unknown caption method {method!r}: choose beam or one_shot")
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    specials = [int(i) for i in tokenizer.all_special_ids]
    ids = {"cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id}
    pad = partial(collate, pad_id=tokenizer.pad_token_id)

    def one_batch(start: int, stop: int) -> list[tuple[str, str]]:
        batch = pad([dataset[i] for i in range(start, stop)])
        feats, positions = batch["patch_features"].to(device), batch["patch_positions"].to(device)
        if method == "beam":
            decoded = generate(model, feats, positions, beam_size=beam_size, max_len=max_len,
                               length_penalty=length_penalty, banned_ids=specials, **ids)
        else:
            decoded = generate_one_shot(model, feats, positions, mask_id=tokenizer.mask_token_id,
                                        special_ids=specials, **ids)
        return [(item_id, tokenizer.decode(tokens, skip_special_tokens=True).lower())
                for item_id, tokens in zip(batch["ids"], decoded, strict=True)]

    parts = dist.map_chunks(len(dataset), batch_size, one_batch, desc=f"captions ({method})", progress=progress)
    return dict(pair for part in parts for pair in part)


@torch.no_grad()
def predict(model: KaleidoBertForClassification, dataset: ClassificationDataset, collate_fn, *,
            batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True
            ) -> tuple[list[str], Tensor, Tensor]:
    """Class probabilities of every sample: ``(ids, probs (N, C), labels (N,))``."""
    model.eval().to(device)

    def one_batch(start: int, stop: int) -> tuple[list[str], Tensor, Tensor]:
        batch = collate_fn([dataset[i] for i in range(start, stop)])
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return list(batch["ids"]), model(inputs).logits.float().softmax(-1).cpu(), batch["label"]

    parts = dist.map_chunks(len(dataset), batch_size, one_batch, desc=f"predict {dataset.field}", progress=progress)
    ids = [i for part in parts for i in part[0]]
    return ids, torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
