"""Category and sub-category prediction (paper §4.2 task 3, "CR & SUB"; Table 3).

As the released ``finetune_main.py``: dropout 0.1 on the pooled ``[CLS]``, one ``Linear(D→C)`` initialised with
std 0.01, softmax cross-entropy; no pre-training losses and no blanking while fine-tuning. Two inputs:
``image+text`` (``[CLS] description [SEP]`` + 55 patches, the paper's setting, where the description often names the
category) and ``image`` (a lone ``[CLS]`` + 55 patches: what a shop needs for a new photo).

Two heads (``config.classifier_head``, saved in ``config.json``): ``pooled`` (the released code) and ``wide``, our
addition: the head input is the concatenation of the pooled ``[CLS]`` (D), the mean text state over real tokens
(D; the lone ``[CLS]`` of an image-only input), the mean patch state over the patches the encoder attends to (D)
and the mean raw colour feature of the attended patches (F), standardised by the persistent buffers ``feature_mean`` /
``feature_std`` (shape ``(3D+F,)``, default 0/1; set by the linear probe of :mod:`kaleido_bert.train.probe`), then
dropout 0.1 and ``Linear(3D+F→C)``. :meth:`KaleidoBertForClassification.load_linear` installs a linear classifier
fitted on standardised head inputs (LP-FT, Kumar et al. 2022) into either head.

The wide head can also read the **sentence embedding** of the text initialisation (``config.classifier_sentence``,
the BERT checkpoint's ``config.json`` as a dict; ``finetune.sentence``): a frozen copy of that BERT
(``transformers.BertModel``, never trained, always in eval mode, ``sentence.*`` in the weights) mean-pooled over
the real tokens, ``(B, S)``: the text features the frozen baseline classifies, which pre-training would otherwise
drift (MLM through a new head). Image-only inputs give it a lone ``[CLS]``, the same vector for every item.

The wide head can also carry a **frozen member** (``config.classifier_frozen_member``; ``finetune.probe_mix``), an
output ensemble in the manner of WiSE-FT (Wortsman et al. 2022) against distribution shift: a second, frozen
``Linear`` over the frozen columns of the standardised head input (the colour feature and the sentence embedding,
the inputs the frozen baseline classifies), fitted by the linear probe and never fine-tuned. The logits are then
``α · log_softmax(head) + (1 − α) · log_softmax(member)``, ``α`` the persistent buffer ``frozen_mix`` (1 = the head
alone) that the probe chooses on validation.

Shapes: text ``(B, T)`` (T = 1 image-only), patches ``(B, 55, F)``, head input ``(B, H)`` (H = D pooled,
3D+F wide, 3D+F+S wide with the sentence), logits ``(B, C)``, labels ``(B,)``.
The label map is the training catalogue's ``labels.json`` (``config.label2id``); an item whose label is missing from
it is refused in one line. The loss weights per class (``finetune.class_weights``) are ``config.classifier_class_weights``
(C numbers in ``config.json``; absent = unweighted, as checkpoints written before they were saved), so a reloaded
classifier computes the loss it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers.initialization as hf_init
from torch import Tensor, nn

from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import (
    KaleidoBertModel,
    KaleidoBertPreTrainedModel,
    masked_mean,
    sentence_embedding,
)

HEADS = ("pooled", "wide")
"""The two classifier heads: the pooled ``[CLS]`` (the released code) or the wide concatenation."""


def class_weight_of(config) -> Tensor | None:
    """``config.classifier_class_weights`` (a list of C loss weights, absent or None = unweighted) as ``(C,)``.

    Raises:
        KaleidoError: not one finite weight ≥ 0 per label (names the lengths or the first bad weight).
    """
    weights = getattr(config, "classifier_class_weights", None)
    if weights is None:
        return None
    if not isinstance(weights, list | tuple) or len(weights) != config.num_labels:
        count = len(weights) if isinstance(weights, list | tuple) else type(weights).__name__
        raise KaleidoError(f"config.classifier_class_weights has {count} weights for {config.num_labels} labels")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf")]
    if bad:
        raise KaleidoError(f"config.classifier_class_weights has the weight {bad[0]!r}: each must be a finite "
                           "number ≥ 0")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


@dataclass
class ClassificationOutput:
    loss: Tensor
    losses: dict[str, Tensor]
    logits: Tensor  # (B, C)


class KaleidoBertForClassification(KaleidoBertPreTrainedModel):
    """Encoder + dropout + ``Linear(H→num_labels)``; ``config.label_field`` and ``config.classifier_input`` say
    what it predicts and from what, ``config.classifier_head`` (``pooled`` when absent) from which states."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.head_type = getattr(config, "classifier_head", "pooled")
        if self.head_type not in HEADS:
            raise KaleidoError(f"classifier_head={self.head_type!r} must be one of {', '.join(HEADS)}")
        self.bert = KaleidoBertModel(config)
        self.sentence = self._sentence_encoder(config)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(self.head_size, config.num_labels)
        if self.head_type == "wide":  # standardisation of the head input, saved with the weights
            self.register_buffer("feature_mean", torch.zeros(self.head_size))
            self.register_buffer("feature_std", torch.ones(self.head_size))
        self.frozen_member = bool(getattr(config, "classifier_frozen_member", False))
        if self.frozen_member:
            if self.head_type != "wide":
                raise KaleidoError("the frozen member (finetune.probe_mix below 1) reads the wide head's frozen "
                                   "columns: set finetune.head=wide")
            self.frozen_classifier = nn.Linear(self.head_size - self.frozen_start, config.num_labels)
            self.frozen_classifier.requires_grad_(False)
            self.register_buffer("frozen_mix", torch.ones(()))  # α: the head's weight in the ensemble
        # per-class loss weights (C,) of config.classifier_class_weights (finetune.class_weights; None = unweighted):
        # config.json owns them, the buffer only follows the model's device
        self.register_buffer("class_weight", class_weight_of(config), persistent=False)
        self.post_init()

    def _sentence_encoder(self, config) -> nn.Module | None:
        """The frozen sentence BERT of ``config.classifier_sentence`` (None without one)."""
        sentence = getattr(config, "classifier_sentence", None)
        if not sentence:
            return None
        if self.head_type != "wide":
            raise KaleidoError("the sentence embedding (finetune.sentence) is read by the wide head only: set "
                               "finetune.head=wide")
        from kaleido_bert.model.loading import frozen_bert

        return frozen_bert(sentence)

    @property
    def head_size(self) -> int:
        """H: D (pooled), 3D + F (wide), 3D + F + S (wide with the sentence embedding)."""
        d = self.config.hidden_size
        if self.head_type == "pooled":
            return d
        sentence = 0 if self.sentence is None else self.sentence.config.hidden_size
        return 3 * d + self.config.patch_feature_size + sentence

    @property
    def frozen_start(self) -> int:
        """The first frozen column of the wide head input (3D): the colour feature, then the sentence embedding."""
        return 3 * self.config.hidden_size

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As the encoder's; transformers' loading makes parameters trainable again, so the sentence encoder and
        the frozen member are frozen once more."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        if model.sentence is not None:
            model.sentence.requires_grad_(False)
        if model.frozen_member:
            model.frozen_classifier.requires_grad_(False)
        return loaded

    def train(self, mode: bool = True) -> KaleidoBertForClassification:
        """As ``nn.Module.train``; the frozen sentence encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.sentence is not None:
            self.sentence.eval()
        return self

    @torch.no_grad()
    def load_sentence(self, bert_dir: str | Path) -> None:
        """Copy the BERT checkpoint in ``bert_dir`` (the text initialisation) into the frozen sentence encoder.

        Raises:
            KaleidoError: no sentence encoder in this model, or a checkpoint transformers cannot read.
        """
        if self.sentence is None:
            raise KaleidoError("this classifier has no sentence encoder (config.classifier_sentence is unset)")
        from kaleido_bert.model.loading import copy_bert

        copy_bert(self.sentence, bert_dir, "sentence encoder")

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "classifier", None):
            with torch.no_grad():
                module.weight.normal_(0.0, 0.01)
                module.bias.zero_()
        if module is self and self.class_weight is not None:  # non-persistent: rebuilt from config.json
            with torch.no_grad():
                self.class_weight.copy_(class_weight_of(self.config))
        if module is self and self.head_type == "wide":  # transformers' init skips what the checkpoint loaded
            hf_init.zeros_(self.feature_mean)
            hf_init.ones_(self.feature_std)
            if self.frozen_member:
                hf_init.ones_(self.frozen_mix)

    def head_input(self, batch: dict[str, Tensor]) -> Tensor:
        """The encoder's features the head reads, ``(B, H)``, before standardisation."""
        out = self.bert(text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                        patch_features=batch["patch_features"], patch_positions=batch["patch_positions"])
        if self.head_type == "pooled":
            return out.pooled
        text, patches = out.hidden[:, :out.num_text], out.hidden[:, out.num_text:]  # (B, T, D), (B, P, D)
        text_mask = batch["text_mask"][..., None]  # (B, T, 1): real tokens (masked_mean casts the masks)
        keep = self.bert.patch_embeddings.keep[None, :, None]  # (1, P, 1): attended patches
        colour = masked_mean(batch["patch_features"].float(), keep)  # (B, F): the attended patches' mean
        parts = [out.pooled.float(), masked_mean(text, text_mask).float(), masked_mean(patches, keep).float(), colour]
        if self.sentence is not None:
            parts.append(sentence_embedding(self.sentence, batch["text_ids"], batch["text_mask"]))  # frozen
        return torch.cat(parts, dim=-1)

    def head_logits(self, features: Tensor) -> Tensor:
        """Logits ``(B, C)`` of head inputs ``(B, H)`` (standardised first by the wide head)."""
        if self.head_type == "wide":
            features = (features - self.feature_mean) / self.feature_std
        logits = self.classifier(self.dropout(features))
        if not self.frozen_member:
            return logits
        member = self.frozen_classifier(features[:, self.frozen_start:])
        mix = self.frozen_mix
        return mix * F.log_softmax(logits.float(), -1) + (1 - mix) * F.log_softmax(member.float(), -1)

    @torch.no_grad()
    def load_linear(self, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> None:
        """Install the classifier ``weight (C, H) · (x − mean) / std + bias (C,)``, fitted on standardised head
        inputs: the wide head keeps ``mean`` / ``std`` ``(H,)`` as its buffers, the pooled head folds them into
        its ``Linear``. Either way the logits of a head input ``x`` are the fitted classifier's."""
        if self.head_type == "wide":
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)
        else:
            weight = weight / std
            bias = bias - weight @ mean
        self.classifier.weight.copy_(weight)
        self.classifier.bias.copy_(bias)

    @torch.no_grad()
    def load_frozen_member(self, weight: Tensor, bias: Tensor, mix: float) -> None:
        """Install the frozen member ``weight (C, H − 3D) · z[:, 3D:] + bias (C,)`` (``z`` the head input
        standardised by the buffers :meth:`load_linear` set) and its ensemble weight ``1 − mix``.

        Raises:
            KaleidoError: a model without the frozen member, or ``mix`` outside (0, 1].
        """
        if not self.frozen_member:
            raise KaleidoError("this classifier has no frozen member (config.classifier_frozen_member is unset)")
        if not 0 < mix <= 1:
            raise KaleidoError(f"the head's ensemble weight {mix} must be in (0, 1]")
        self.frozen_classifier.weight.copy_(weight)
        self.frozen_classifier.bias.copy_(bias)
        self.frozen_mix.fill_(float(mix))

    def forward(self, batch: dict[str, Tensor]) -> ClassificationOutput:
        logits = self.head_logits(self.head_input(batch))
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        loss = F.cross_entropy(logits.float(), batch["label"], weight=weight) if "label" in batch else logits.sum() * 0.0
        return ClassificationOutput(loss=loss, losses={"cls": loss}, logits=logits)
