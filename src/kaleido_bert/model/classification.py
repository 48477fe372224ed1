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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kaleido_bert.model.encoder import KaleidoBertModel, KaleidoBertPreTrainedModel

INPUTS = ("image+text", "image")
"""The two classifier inputs: the description with the image (the paper) or the image alone."""


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
        # per-class loss weights (C,) set by fine-tuning (finetune.class_weights); not saved with the weights
        self.register_buffer("class_weight", None, persistent=False)
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
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        loss = F.cross_entropy(logits.float(), batch["label"], weight=weight) if "label" in batch else logits.sum() * 0.0
        return ClassificationOutput(loss=loss, losses={"cls": loss}, logits=logits)
