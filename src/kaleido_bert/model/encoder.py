"""Kaleido-BERT: one BERT encoder over text tokens and 55 Kaleido patch tokens (paper §3.5, Fig. 2).

The text side is BERT's own embedding (word + position + token type, ``[CLS] description [SEP]``); the image
side is the Kaleido patch embedding: a per-level projection of the patch feature (one ``Linear(F→D)`` per
level), a per-level type embedding, and one shared bias-free ``Linear(5→D)`` of the 5-d position, added and
layer-normalised. Patches get no sequence-index embedding (the original had none). Both go through
``transformers``' ``BertEncoder``, so any BERT checkpoint directory initialises the text embeddings and encoder
with its own parameter names (``embeddings.*``, ``encoder.*``, ``pooler.*``).

Shape legend: B batch, T text tokens, P patches (55), F patch feature size, D hidden size, S = T + P.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertPooler,
    BertPreTrainedModel,
)

from kaleido_bert.config import PRETRAINING_TASKS, ModelConfig
from kaleido_bert.patches.grid import level_ids
from kaleido_bert.runs import is_local_path, resolve_checkpoint

MODEL_CONFIG_FIELDS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size", "vocab_size": "vocab_size", "max_text_len": "max_text_len",
    "patch_feature_size": "patch_feature_size", "num_levels": "num_levels", "dropout": "hidden_dropout_prob",
    "tasks": "tasks", "patch_levels": "patch_levels", "itc_pool": "itc_pool",
}
"""The one map from the run config's ``model.*`` fields to ``config.json`` keys: building a model config and
refusing a checkpoint of another config (a resumed run must agree on every field) both read it."""


class KaleidoBertConfig(BertConfig):
    """BERT's config plus the patch side: ``patch_feature_size`` F, ``num_levels`` and the pre-training ``tasks``.

    Also the pre-training heads' training setting, so that a reloaded model trains as the saved one did:
    ``itm_negatives`` (``masking.itm_negatives``: ``sampled`` or ``mined``). A ``config.json`` without it (older
    checkpoints) reads as ``sampled``, the behaviour of those checkpoints; an older ``itc_queue`` key is kept as
    read and not used.
    """

    model_type = "kaleido_bert"

    def __init__(self, patch_feature_size: int = 2048, num_levels: int = 5, tasks: list[str] | None = None,
                 max_text_len: int = 64, patch_levels: list[int] | None = None, itc_pool: str = "cls",
                 itm_negatives: str = "sampled", **kwargs) -> None:
        super().__init__(**kwargs)
        self.itc_pool = itc_pool
        self.itm_negatives = itm_negatives
        self.patch_levels = list(range(1, num_levels + 1) if patch_levels is None else patch_levels)
        self.patch_feature_size = patch_feature_size
        self.num_levels = num_levels
        self.tasks = list(PRETRAINING_TASKS if tasks is None else tasks)
        self.max_text_len = max_text_len

    @property
    def num_patches(self) -> int:
        return sum(k * k for k in range(1, self.num_levels + 1))

    @classmethod
    def from_model_config(cls, m: ModelConfig, **settings: Any) -> KaleidoBertConfig:
        """Map the run config's ``model`` section onto BERT's field names (through :data:`MODEL_CONFIG_FIELDS`);
        ``settings`` are further ``config.json`` fields (``itm_negatives=``)."""
        values = {key: getattr(m, field) for field, key in MODEL_CONFIG_FIELDS.items()}
        values["tasks"], values["patch_levels"] = list(values["tasks"]), list(values["patch_levels"])
        return cls(**values, **settings, attention_probs_dropout_prob=m.dropout,
                   max_position_embeddings=max(512, m.max_text_len))


class KaleidoPatchEmbeddings(nn.Module):
    """Patch features + per-level type + shared 5-d position → ``(B, P, D)`` (one module for all levels)."""

    def __init__(self, config: KaleidoBertConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.patch_feature_size
        self.projections = nn.ModuleList(nn.Linear(f, d) for _ in range(config.num_levels))
        self.level_embeddings = nn.Embedding(config.num_levels, d)
        self.position = nn.Linear(5, d, bias=False)  # shared by all levels, as the original
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("level_ids", level_ids(config.num_levels), persistent=False)
        self.register_buffer("keep", _kept_patches(config), persistent=False)

    def forward(self, patch_features: Tensor, patch_positions: Tensor) -> Tensor:
        # project each level with its own Linear; levels are contiguous slices of the P axis
        parts, start = [], 0
        for level, projection in enumerate(self.projections, start=1):
            parts.append(projection(patch_features[:, start:start + level * level]))  # (B, k², D)
            start += level * level
        x = torch.cat(parts, dim=1)  # (B, P, D)
        x = x + self.level_embeddings(self.level_ids)[None] + self.position(patch_positions.to(x.dtype))
        return self.dropout(self.LayerNorm(x))


@dataclass
class KaleidoBertOutput:
    hidden: Tensor  # (B, S, D): text tokens first, then patches
    pooled: Tensor  # (B, D): tanh(Dense(h_[CLS]))
    num_text: int  # T, where the patch tokens start


class KaleidoBertPreTrainedModel(BertPreTrainedModel):
    """BERT's initialisation (normal(0.02) weights, LayerNorm 1/0, embedding buffers) plus the level-id buffer."""

    config_class = KaleidoBertConfig
    base_model_prefix = "bert"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, which also takes a run or stage directory (its latest checkpoint).

        Raises:
            KaleidoError: a local path that holds no checkpoint, in one line naming it and the latest checkpoint
                beside it (``no checkpoint at runs/demo/pretrain/step-000300 (latest: step-001000)``).
        """
        if is_local_path(pretrained_model_name_or_path):
            pretrained_model_name_or_path = str(resolve_checkpoint(Path(pretrained_model_name_or_path).expanduser()))
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, KaleidoPatchEmbeddings):
            with torch.no_grad():  # non-persistent buffer: rebuilt whenever weights are (re)initialised
                module.level_ids.copy_(level_ids(self.config.num_levels))
                module.keep.copy_(_kept_patches(self.config))


def _kept_patches(config: KaleidoBertConfig) -> Tensor:
    """``(P,)`` 1 for patches of the levels in ``config.patch_levels``, 0 for levels hidden from attention."""
    used = torch.tensor(sorted(getattr(config, "patch_levels", range(1, config.num_levels + 1))))
    return torch.isin(level_ids(config.num_levels), used - 1).long()


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``states (B, N, D)`` over the positions where ``mask`` (``(B, N, 1)`` or ``(1, N, 1)``) is 1 →
    ``(B, D)``: mean pooling over real tokens or attended patches (ITC, the wide classifier head, the probe)."""
    mask = mask.to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@torch.no_grad()
def sentence_embedding(bert: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """A frozen BERT's sentence embedding, as sentence encoders such as all-MiniLM-L6-v2 are trained: token ids
    and mask ``(B, T)`` → the last hidden states' mean over real tokens ``(B, S)`` float32. The one owner of the
    frozen text embedding (the linear probe, the frozen members of the dual encoder and the classifiers)."""
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    return masked_mean(hidden.float(), mask[..., None])


def attention_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a key mask ``(B, S)`` or a full mask ``(B, S, S)`` (1 = may attend) into an additive ``(B, 1, S, S)``."""
    if mask.dim() == 2:
        mask = mask[:, None, :].expand(-1, mask.shape[1], -1)
    return (1.0 - mask[:, None].to(dtype)) * torch.finfo(dtype).min


class KaleidoBertModel(KaleidoBertPreTrainedModel):
    """The single-stream encoder. Either side may be absent (text-only or patch-only passes of the dual encoder)."""

    def __init__(self, config: KaleidoBertConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.patch_embeddings = KaleidoPatchEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, text_ids: Tensor | None = None, text_mask: Tensor | None = None,
                patch_features: Tensor | None = None, patch_positions: Tensor | None = None,
                attention_mask: Tensor | None = None) -> KaleidoBertOutput:
        """Encode text, patches, or both.

        Args:
            text_ids: ``(B, T)`` WordPiece ids starting with ``[CLS]``.
            text_mask: ``(B, T)`` 1 for real tokens, 0 for padding.
            patch_features: ``(B, P, F)``; patch_positions: ``(B, P, 5)``.
            attention_mask: optional full ``(B, S, S)`` mask (1 = query may attend key), e.g. the
                sequence-to-sequence mask of captioning; overrides the padding mask.

        Returns:
            Hidden states ``(B, S, D)`` with text first, the pooled ``[CLS]`` (or first patch) state, and T.
        """
        parts, keys = [], []
        if text_ids is not None:
            parts.append(self.embeddings(input_ids=text_ids))  # (B, T, D)
            keys.append(text_mask if text_mask is not None else torch.ones_like(text_ids))
        if patch_features is not None:
            patches = self.patch_embeddings(patch_features, patch_positions)  # (B, P, D)
            parts.append(patches)
            keys.append(self.patch_embeddings.keep.expand(patches.shape[0], -1))  # hidden levels: 0
        if not parts:
            raise ValueError("KaleidoBertModel needs text_ids, patch_features or both")
        hidden = torch.cat(parts, dim=1)  # (B, S, D)
        mask = torch.cat(keys, dim=1)
        if attention_mask is not None:  # a full mask still never lets anyone attend a hidden level
            mask = attention_mask * mask[:, None, :]
        hidden = self.encoder(hidden, attention_mask=attention_bias(mask, hidden.dtype)).last_hidden_state
        num_text = 0 if text_ids is None else text_ids.shape[1]
        return KaleidoBertOutput(hidden=hidden, pooled=self.pooler(hidden), num_text=num_text)
