"""Fashion captioning that generates (paper §4.2, task 4 "FC"; generation is beyond the authors' code).

The authors released no captioning code; they described an encoder-only fine-tuning on image features alone that
masks the whole caption and predicts it in one shot. We keep that as a baseline and add a real generator in the
style of UniLM (Dong et al., 2019): the same single-stream encoder with a sequence-to-sequence attention mask,

* ``seq2seq`` (loss ``caption``): input ``[CLS] w1 … wn [SEP]``; patches attend to patches only, caption token t
  attends to every patch and to caption tokens 0..t. The hidden state at position t predicts token t + 1
  (next-token teacher forcing through the tied MLM head); every real token after ``[CLS]``, the final ``[SEP]``
  included, is a target. Decoding is left to right with :func:`greedy` or the batched beam search
  :func:`generate`.
* ``one_shot`` (loss ``one_shot``, the authors' baseline): input ``[CLS] [MASK]×(L−1)`` at the fixed width
  L = ``max_text_len`` under ordinary bidirectional attention over text and patches; position i predicts caption
  token i, the position after the caption predicts ``[SEP]`` (so the model learns where to stop) and later
  positions are ignored. Decoding (:func:`generate_one_shot`) fills the same L−1 masks in one pass and cuts at the
  first ``[SEP]``.

The model never sees other text than the caption it is trained on: captioning is image-only.

Shapes: B batch (images), T text tokens, P patches (55), F patch feature size, D hidden size, V vocabulary,
S = T + P (text first, then the patches, as :class:`~kaleido_bert.model.encoder.KaleidoBertModel` orders them),
K beam size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.masking import IGNORE
from kaleido_bert.model.encoder import KaleidoBertConfig, KaleidoBertModel, KaleidoBertPreTrainedModel
from kaleido_bert.model.heads import masked_cross_entropy
from kaleido_bert.runs import WEIGHTS, resolve_checkpoint

OBJECTIVES = ("seq2seq", "one_shot")


def seq2seq_attention_mask(text_mask: Tensor, num_patches: int) -> Tensor:
    """The sequence-to-sequence mask over ``[caption tokens, patches]`` (1 = the query may attend the key).

    Patch queries attend to all patches and to no text. A real caption token at position t attends to all
    patches and to the real caption tokens 0..t (itself included). Padded caption keys are never attended;
    padded query rows attend to the patches only, so that no row is fully masked.

    Args:
        text_mask: ``(B, T)`` 1 for real caption tokens, 0 for padding.
        num_patches: P.

    Returns:
        ``(B, S, S)`` long mask, S = T + P.
    """
    b, t = text_mask.shape
    s = t + num_patches
    real = text_mask.bool()
    mask = torch.zeros((b, s, s), dtype=torch.long, device=text_mask.device)
    mask[:, :, t:] = 1  # every query sees every patch
    causal = torch.ones((t, t), dtype=torch.bool, device=text_mask.device).tril()  # key j ≤ query i
    text_block = causal[None] & real[:, None, :] & real[:, :, None]  # (B, T, T): real query, real key
    mask[:, :t, :t] = text_block.long()
    return mask


@dataclass
class CaptionOutput:
    """What :meth:`KaleidoBertForCaptioning.forward` returns (the training loop reads ``loss`` and ``losses``)."""

    loss: Tensor  # the sum of ``losses``
    losses: dict[str, Tensor]  # "caption" (seq2seq) and/or "one_shot"


def caption_objectives(config: KaleidoBertConfig) -> list[str]:
    """``config.caption_objectives``, default ``["seq2seq", "one_shot"]``; unknown names are a KaleidoError."""
    objectives = list(getattr(config, "caption_objectives", None) or OBJECTIVES)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise KaleidoError(f"unknown caption objective {unknown[0]!r}: choose from {', '.join(OBJECTIVES)}")
    return objectives


class KaleidoBertForCaptioning(KaleidoBertPreTrainedModel):
    """The encoder plus one LM head (BERT's MLM head, decoder tied to the word embeddings) for both objectives.

    The config carries ``caption_objectives`` (saved in ``config.json``) and, for ``one_shot``, the tokenizer's
    ``mask_token_id``. The pooler of :class:`KaleidoBertModel` is kept (so checkpoints load both ways) but
    captioning never reads it: it is frozen (``requires_grad=False``), so the optimizer skips it and DDP (which
    runs without ``find_unused_parameters``) sees no parameter left without a gradient.

    Example:
        >>> model = KaleidoBertForCaptioning.from_pretraining("runs/pretrain/step-010000")
        >>> model.config.mask_token_id = tokenizer.mask_token_id
        >>> out = model(batch)          # CaptionOutput(loss, {"caption": …, "one_shot": …})
    """

    def __init__(self, config: KaleidoBertConfig) -> None:
        super().__init__(config)
        config.caption_objectives = caption_objectives(config)
        # the LM decoder shares the word embeddings (and its bias is the head's bias), as in pre-training
        self._tied_weights_keys = {
            "lm.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "lm.decoder.bias": "lm.bias",
        }
        self.bert = KaleidoBertModel(config)
        self.lm = BertLMPredictionHead(config)
        self.lm.decoder.weight = self.bert.get_input_embeddings().weight
        self.post_init()
        self.bert.pooler.requires_grad_(False)  # never read: frozen, so DDP has no parameter without a gradient

    @property
    def objectives(self) -> list[str]:
        return list(self.config.caption_objectives)

    # ------------------------------------------------------------------------------------------ encoding
    def encode_seq2seq(self, text_ids: Tensor, text_mask: Tensor, patch_features: Tensor,
                       patch_positions: Tensor) -> Tensor:
        """Caption hidden states ``(B, T, D)`` under :func:`seq2seq_attention_mask` (position t sees tokens ≤ t)."""
        mask = seq2seq_attention_mask(text_mask, patch_features.shape[1])
        out = self.bert(text_ids, text_mask, patch_features, patch_positions, attention_mask=mask)
        return out.hidden[:, :out.num_text]

    def seq2seq_logits(self, text_ids: Tensor, text_mask: Tensor, patch_features: Tensor,
                       patch_positions: Tensor) -> Tensor:
        """``(B, T, V)``: row t is the distribution of caption token t + 1 given the image and tokens 0..t."""
        return self.lm(self.encode_seq2seq(text_ids, text_mask, patch_features, patch_positions))

    def one_shot_hidden(self, text_ids: Tensor, patch_features: Tensor, patch_positions: Tensor) -> Tensor:
        """``(B, L, D)``: ``[CLS] [MASK]…`` and the patches under full bidirectional attention."""
        out = self.bert(text_ids, torch.ones_like(text_ids), patch_features, patch_positions)
        return out.hidden[:, :out.num_text]

    def one_shot_logits(self, text_ids: Tensor, patch_features: Tensor, patch_positions: Tensor) -> Tensor:
        """``(B, L, V)`` for ``[CLS] [MASK]×(L−1)``."""
        return self.lm(self.one_shot_hidden(text_ids, patch_features, patch_positions))

    def _mask_id(self) -> int:
        mask_id = getattr(self.config, "mask_token_id", None)
        if mask_id is None:
            raise KaleidoError("the one_shot caption objective needs config.mask_token_id (the tokenizer's "
                               "[MASK] id): set it, or set caption_objectives to ['seq2seq']")
        return int(mask_id)

    # ------------------------------------------------------------------------------------------ losses
    def forward(self, batch: dict[str, Any]) -> CaptionOutput:
        """The enabled objectives' losses on a :func:`~kaleido_bert.inputs.pretraining.collate` batch of captions.

        Args:
            batch: ``text_ids``/``text_mask`` ``(B, T)`` (``[CLS] caption [SEP]``, right-padded),
                ``patch_features`` ``(B, P, F)``, ``patch_positions`` ``(B, P, 5)``.

        Returns:
            The summed loss and each objective's loss, each a mean over its target tokens.
        """
        ids, mask = batch["text_ids"], batch["text_mask"]
        feats, positions = batch["patch_features"], batch["patch_positions"]
        losses: dict[str, Tensor] = {}
        if "seq2seq" in self.objectives:
            hidden = self.encode_seq2seq(ids, mask, feats, positions)[:, :-1]  # (B, T-1, D) predicts 1..T-1
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
            picked = labels != IGNORE
            losses["caption"] = masked_cross_entropy(self.lm(hidden[picked]), labels[picked])
        if "one_shot" in self.objectives:
            width = max(int(self.config.max_text_len), ids.shape[1])
            inputs = torch.full((ids.shape[0], width), self._mask_id(), dtype=ids.dtype, device=ids.device)
            inputs[:, 0] = ids[:, 0]  # [CLS]
            labels = torch.full_like(inputs, IGNORE)
            labels[:, 1:ids.shape[1]] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # caption, then [SEP]
            hidden = self.one_shot_hidden(inputs, feats, positions)
            picked = labels != IGNORE
            losses["one_shot"] = masked_cross_entropy(self.lm(hidden[picked]), labels[picked])
        return CaptionOutput(loss=sum(losses.values()), losses=losses)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretraining(cls, checkpoint_dir: str | Path, **overrides: Any) -> KaleidoBertForCaptioning:
        """Start captioning from a pre-training checkpoint (``KaleidoBertForPreTraining.save_pretrained``).

        The encoder (``bert.*``) carries over, and the pre-trained MLM head (``heads.mlm.*``) becomes the LM
        head (``lm.*``) when present; other pre-training heads are dropped. A run directory resolves to its
        ``latest`` checkpoint.

        Args:
            checkpoint_dir: a directory with ``config.json`` and ``model.safetensors``, or a run directory.
            overrides: config fields to set, e.g. ``mask_token_id=103`` or ``caption_objectives=["seq2seq"]``.

        Raises:
            KaleidoError: no checkpoint there, an unreadable weights file, or encoder weights missing from it.
        """
        directory = resolve_checkpoint(checkpoint_dir)
        config = KaleidoBertConfig.from_pretrained(str(directory))
        for key, value in overrides.items():
            setattr(config, key, value)
        path = directory / WEIGHTS
        if not path.is_file():
            raise KaleidoError(f"checkpoint {directory} has no {WEIGHTS}")
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors has no common error base class
            raise KaleidoError(f"{path} is corrupt or truncated ({type(err).__name__})") from None
        model = cls(config)
        mapped = {k: v for k, v in state.items() if k.startswith("bert.")}
        wanted = [k for k in model.state_dict() if k.startswith("bert.")]
        missing = [k for k in wanted if k not in mapped]
        if missing:
            raise KaleidoError(f"{path} lacks the encoder weight {missing[0]} ({len(missing)} missing): it is not a "
                               "Kaleido-BERT pre-training checkpoint")
        for key, value in state.items():
            if key.startswith("heads.mlm."):
                mapped["lm." + key.removeprefix("heads.mlm.")] = value
        try:
            model.load_state_dict(mapped, strict=False)
        except RuntimeError as err:  # a size mismatch, e.g. an override of vocab_size or hidden_size
            raise KaleidoError(f"cannot load {path}: {str(err).splitlines()[-1].strip()[:200]}") from None
        model.tie_weights()
        return model


def caption_loss_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Units each caption loss averages over (see :mod:`kaleido_bert.train.loop`): target tokens, and ``*`` = B.

    Both objectives predict every real token after ``[CLS]``, the final ``[SEP]`` included.
    """
    mask = batch["text_mask"]
    targets = int(mask[:, 1:].sum())
    return {"*": int(mask.shape[0]), "caption": targets, "one_shot": targets}


# ---------------------------------------------------------------------------------------------- decoding


# ---------------------------------------------------------------------------------------------- data


