"""Fine-tuning datasets (paper §4.2): clean image + text samples for captioning and for CR/SUB classification.

No masking and no corruption: the patches are the 55 colour patches of the store, the text is
``[CLS] description [SEP]`` (or a lone ``[CLS]`` for an image-only classifier). Samples are
``{"id", "text_ids" (T,) long, "patch_features" (55, F), "patch_positions" (55, 5)}`` (+ ``"label"`` () long for
classification); batch them with :func:`kaleido_bert.inputs.pretraining.collate`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kaleido_bert.data.catalogue import LABEL_FIELDS, Catalogue, Item
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.store import FeatureStore


class CaptionDataset(Dataset):
    """One sample per image of a split that has features: ``[CLS] description [SEP]`` and its 55 patches.

    Items whose features are missing from the store (or failed) are skipped and counted in ``skipped``.
    Samples are ``{"id", "text_ids" (T,) long, "patch_features" (55, F) float32, "patch_positions" (55, 5)}``;
    batch them with ``partial(kaleido_bert.inputs.pretraining.collate, pad_id=tokenizer.pad_token_id)``.
    """

    def __init__(self, catalogue: Catalogue, store: FeatureStore, tokenizer: Any, *, split: str = "train",
                 max_text_len: int = 64) -> None:
        self.store = store
        split_items = catalogue.split(split)
        self.items: list[Item] = [it for it in split_items if it.id in store]
        self.skipped = len(split_items) - len(self.items)
        self.text_ids: dict[str, Tensor] = {}
        for it in self.items:  # every image of a product shares its description
            if it.product_id not in self.text_ids:
                enc = tokenizer(it.description, max_length=max_text_len, truncation=True)
                self.text_ids[it.product_id] = torch.tensor(enc["input_ids"], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        feats = self.store[item.id]
        return {"id": item.id, "text_ids": self.text_ids[item.product_id],
                "patch_features": feats["colour"].float(), "patch_positions": feats["positions"].float()}


class ClassificationDataset(Dataset):
    """One sample per image of a split that has features: clean patches, the text (or a lone ``[CLS]``), the label.

    Raises:
        KaleidoError: an item whose label is not in ``label2id`` (names the item and the label).
    """

    def __init__(self, catalogue: Catalogue, store: FeatureStore, tokenizer, *, split: str, field: str,
                 label2id: dict[str, int], image_only: bool = False, max_text_len: int = 64) -> None:
        if field not in LABEL_FIELDS:
            raise KaleidoError(f"unknown label field {field!r}: choose one of {', '.join(LABEL_FIELDS)}")
        chosen = catalogue.split(split)
        self.items: list[Item] = [it for it in chosen if it.id in store]
        self.skipped = len(chosen) - len(self.items)
        for it in self.items:
            if getattr(it, field) not in label2id:
                raise KaleidoError(f"item {it.id}: {field} {getattr(it, field)!r} is not in the model's label map "
                                   f"({len(label2id)} labels); evaluate with the catalogue the model was trained on")
        self.store, self.field, self.label2id = store, field, label2id
        cls = torch.tensor([tokenizer.cls_token_id])
        self.texts = {it.id: cls if image_only else torch.tensor(
            tokenizer(it.description, max_length=max_text_len, truncation=True)["input_ids"]) for it in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        feats = self.store[item.id]
        return {"id": item.id, "text_ids": self.texts[item.id], "patch_features": feats["colour"],
                "patch_positions": feats["positions"],
                "label": torch.tensor(self.label2id[getattr(item, self.field)])}
