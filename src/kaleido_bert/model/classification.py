"""Category and sub-category prediction (paper §4.2 task 3, "CR & SUB"; Table 3).

As the released ``finetune_main.py``: dropout 0.1 on the pooled ``[CLS]``, one ``Linear(D→C)`` initialised with
std 0.01, softmax cross-entropy; no pre-training losses and no blanking while fine-tuning. Two inputs (SPEC §3.5):
``image+text`` (``[CLS] description [SEP]`` + 55 patches, the paper's setting, where the description often names the
category) and ``image`` (a lone ``[CLS]`` + 55 patches: what a shop needs for a new photo).

Shapes: text ``(B, T)`` (T = 1 image-only), patches ``(B, 55, F)``, logits ``(B, C)``, labels ``(B,)``.
The label map is the training catalogue's ``labels.json`` (``config.label2id``); an item whose label is missing from
it is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import KaleidoBertModel, KaleidoBertPreTrainedModel
from kaleido_bert.patches.store import FeatureStore

FIELDS = ("category", "subcategory")
INPUTS = ("image+text", "image")


@dataclass
class ClassificationOutput:
    loss: Tensor
    losses: dict[str, Tensor]
    logits: Tensor  # (B, C)


class KaleidoBertForClassification(KaleidoBertPreTrainedModel):
    """Encoder + dropout + ``Linear(D→num_labels)``; ``config.label_field`` and ``config.classifier_input`` say
    what it predicts and from what."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bert = KaleidoBertModel(config)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "classifier", None):
            with torch.no_grad():
                module.weight.normal_(0.0, 0.01)
                module.bias.zero_()

    def forward(self, batch: dict[str, Tensor]) -> ClassificationOutput:
        out = self.bert(text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                        patch_features=batch["patch_features"], patch_positions=batch["patch_positions"])
        logits = self.classifier(self.dropout(out.pooled))
        loss = F.cross_entropy(logits.float(), batch["label"]) if "label" in batch else logits.sum() * 0.0
        return ClassificationOutput(loss=loss, losses={"cls": loss}, logits=logits)


def label_map(labels: dict[str, Any], field: str) -> dict[str, int]:
    if field not in FIELDS:
        raise KaleidoError(f"unknown label field {field!r}: choose one of {', '.join(FIELDS)}")
    return dict(labels[field])


class ClassificationDataset(Dataset):
    """One sample per image of a split that has features: clean patches, the text (or a lone ``[CLS]``), the label.

    Raises:
        KaleidoError: an item whose label is not in ``label2id`` (names the item and the label).
    """

    def __init__(self, catalogue: Catalogue, store: FeatureStore, tokenizer, *, split: str, field: str,
                 label2id: dict[str, int], image_only: bool = False, max_text_len: int = 64) -> None:
        if field not in FIELDS:
            raise KaleidoError(f"unknown label field {field!r}: choose one of {', '.join(FIELDS)}")
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


@torch.no_grad()
def predict(model: KaleidoBertForClassification, dataset: ClassificationDataset, collate_fn, *,
            batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True
            ) -> tuple[list[str], Tensor, Tensor]:
    """Class probabilities of every sample: ``(ids, probs (N, C), labels (N,))``."""
    from tqdm import tqdm

    model.eval().to(device)
    ids, probs, labels = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"predict {dataset.field}", disable=not progress,
                      leave=False):
        batch = collate_fn([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        probs.append(model(inputs).logits.float().softmax(-1).cpu())
        labels.append(batch["label"])
        ids.extend(batch["ids"])
    return ids, torch.cat(probs), torch.cat(labels)
