"""The run configuration's sections (paper §4.1 implementation details): one dataclass per concern.

A run is described by one :class:`RunConfig` made of sections (``model``, ``data``, ``features``, ``align``,
``masking``, ``train``, ``finetune``, ``eval``); each section checks its own values in ``__post_init__`` and
raises a one-line :class:`~kaleido_bert.config.validation.ConfigError` naming the key. This module holds the
sections of the model and its data and the :class:`RunConfig` itself (built from a nested dict by
:func:`config_from_dict`); the training and evaluation sections are :mod:`kaleido_bert.config.recipe`. Only
:class:`ModelConfig` goes next to the weights (``config.json``); the full resolved run config is written as
``run.yaml`` next to every output. Loading presets and ``--set`` overrides: :mod:`kaleido_bert.config.loading`.

Paper values (§4.1, Implementation details): L=12, H=768, A=12, ResNet-50 2048-d patch features, 64 text tokens,
1/2/3 masked patches at the 3×3/4×4/5×5 levels, at most 10 masked tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kaleido_bert.atomic import atomic_write_text
from kaleido_bert.config.recipe import EvalConfig, FinetuneConfig, TrainConfig
from kaleido_bert.config.rules import broken_rule
from kaleido_bert.config.validation import ConfigError, build, check_ranges

PRETRAINING_TASKS = ("mlm", "itm", "rotation", "jigsaw", "camouflage", "grey_to_color", "blank_to_color")
"""The paper's seven pre-training tasks (§3.5): AMLM, ITM and the five AKPM tasks (levels 1 to 5)."""
AKPM_TASKS = PRETRAINING_TASKS[2:]
"""The aligned Kaleido patch modelling tasks I..V of Table 4."""
KNOWN_TASKS = (*PRETRAINING_TASKS, "itc")
"""Every task ``model.tasks`` may name: the seven plus the optional image-text contrastive loss."""


ITM_NEGATIVES = ("sampled", "mined")
"""Where ITM negatives come from (``masking.itm_negatives``, saved as ``config.json``'s ``itm_negatives``)."""


@dataclass
class ModelConfig:
    hidden_size: int = 768
    """Transformer width D."""
    num_layers: int = 12
    """Number of BERT encoder layers L."""
    num_heads: int = 12
    """Attention heads A; must divide ``hidden_size``."""
    intermediate_size: int = 3072
    """Feed-forward width inside each encoder layer."""
    vocab_size: int = 30522
    """WordPiece vocabulary size (bert-base-uncased: 30,522)."""
    max_text_len: int = 64
    """Text tokens T including ``[CLS]`` and ``[SEP]``."""
    patch_feature_size: int = 2048
    """Patch feature size F (ResNet-50 pooled: 2048); must match the feature store."""
    num_levels: int = 5
    """Kaleido levels 1×1 … K×K; 5 gives 55 patches."""
    dropout: float = 0.1
    """Dropout on embeddings, attention and hidden states."""
    patch_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Kaleido levels the encoder attends to; ``[5]`` is the ablation's scale-fixed grid (25 equal patches)."""
    init: str | None = None
    """A BERT checkpoint directory that initialises text embeddings and encoder (None = random)."""
    tasks: list[str] = field(default_factory=lambda: list(PRETRAINING_TASKS))
    """Pre-training tasks switched on (paper §3.5 plus the optional ``itc``)."""
    itc_pool: str = "cls"
    """ITC embeddings: ``cls`` (the pooled ``[CLS]`` of the text-only and patch-only passes) or ``mean`` (the mean
    of the text token states, as sentence encoders such as MiniLM are trained, and the mean of the patch states
    plus a linear skip of the mean clean colour feature)."""

    def __post_init__(self) -> None:
        check_ranges("model", self, at_least_one=("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                  "vocab_size", "max_text_len", "patch_feature_size"),
                     fractions=("dropout",))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if not 1 <= self.num_levels <= 5:
            raise ConfigError(f"model.num_levels={self.num_levels} must be between 1 and 5")
        if not self.patch_levels or any(not 1 <= k <= self.num_levels for k in self.patch_levels):
            raise ConfigError(f"model.patch_levels={self.patch_levels} must be a non-empty subset of 1..{self.num_levels}")
        known = set(KNOWN_TASKS)
        unknown = sorted(set(self.tasks) - known)
        if unknown:
            raise ConfigError(f"model.tasks has unknown task(s) {unknown}; known: {sorted(known)}")
        if self.itc_pool not in ("cls", "mean"):
            raise ConfigError(f"model.itc_pool={self.itc_pool!r} must be cls or mean")

    @property
    def num_patches(self) -> int:
        """P = 1 + 4 + … + K² (55 for five levels)."""
        return sum(k * k for k in range(1, self.num_levels + 1))


@dataclass
class DataConfig:
    catalogue: str | None = None
    """Catalogue directory (see docs/real-catalogues.md, "Catalogue format"); None = the built-in synthetic catalogue."""
    features: str | None = None
    """Feature store directory (``kaleido patches`` output)."""
    alignments: str | None = None
    """Alignment file (``kaleido align`` output); None = no alignments (masking falls back to random)."""
    synthetic_products: int = 300
    """Products in the synthetic catalogue when ``catalogue`` is None."""
    synthetic_seed: int = 0
    """Seed of the synthetic catalogue."""
    tokenizer: str | None = None
    """WordPiece vocabulary directory (bert-base-uncased layout); None = the offline MiniLM vocab."""
    val_fraction: float = 0.1
    """Share of products in the validation split when an importer assigns splits."""
    test_fraction: float = 0.1
    """Share of products in the test split when an importer assigns splits."""
    num_workers: int = 2
    """DataLoader worker processes for image decoding."""

    def __post_init__(self) -> None:
        check_ranges("data", self, at_least_one=("synthetic_products",), non_negative=("synthetic_seed", "num_workers"),
                     fractions=("val_fraction", "test_fraction"))
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")


@dataclass
class FeaturesConfig:
    backbone: str = "resnet50"
    """torchvision backbone (``resnet50``) or ``efficientnet_lite0``."""
    weights: str = "none"
    """``imagenet`` (torchvision weights API / offline package), a local weights file, or ``none`` (random init)."""
    mode: str = "crop"
    """``crop`` (each patch cropped and encoded, as the paper) or ``roi`` (one pass, ``roi_align``)."""
    patch_size: int = 224
    """Side of each resized crop in ``crop`` mode."""
    image_size: int = 256
    """Side the whole image is resized to before the box is cut (``roi`` mode input size)."""
    saliency: str = "threshold"
    """Foreground box: ``threshold``, ``opencv``, ``unet`` or ``none`` (whole image)."""
    saliency_checkpoint: str | None = None
    """Trained U-Net checkpoint directory for ``saliency: unet``."""
    batch_size: int = 64
    """Backbone inputs per forward pass."""
    max_side: int = 1024
    """Images are downscaled (aspect kept) to at most this longer side before the saliency box and the patches, in
    the store and for uploaded photos alike. The default keeps detail; the longer side of most training images (80
    for 60×80 thumbnails) makes bigger photos look like them, for catalogues whose training images are all small
    (docs/real-catalogues.md, the recipe's item 7)."""

    def __post_init__(self) -> None:
        check_ranges("features", self, at_least_one=("patch_size", "image_size", "batch_size", "max_side"))
        if self.mode not in ("crop", "roi"):
            raise ConfigError(f"features.mode={self.mode!r} must be 'crop' or 'roi'")
        if self.saliency not in ("threshold", "opencv", "unet", "none"):
            raise ConfigError(f"features.saliency={self.saliency!r} must be threshold, opencv, unet or none")


@dataclass
class MaskingConfig:
    strategy: str = "alignment"
    """``alignment`` (alignment-guided, paper §3.4) or ``random`` (the ablation baseline)."""
    text_ratio: float = 0.15
    """Share of text tokens masked."""
    text_max: int = 10
    """At most this many masked tokens per description."""
    camouflage: int = 1
    """Camouflaged patches at the 3×3 level."""
    grey: int = 2
    """Greyed patches at the 4×4 level."""
    blank: int = 3
    """Blanked patches at the 5×5 level."""
    itm_negative_ratio: float = 0.5
    """Share of pairs whose description comes from another product (same sub-category first)."""
    itm_hard_ratio: float = 1.0
    """Share of those negatives drawn from the same sub-category (the paper); the rest come from any product."""
    itm_negatives: str = "sampled"
    """``sampled`` (only the dataset's negatives above) or ``mined``: each positive pair also gets a hard negative
    text or image from the batch, drawn by softmax of the ITC similarity (ALBEF; needs ``itc`` in model.tasks)."""

    def __post_init__(self) -> None:
        check_ranges("masking", self, non_negative=("text_max",))
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ConfigError(f"masking.itm_negatives={self.itm_negatives!r} must be 'sampled' or 'mined'")
        if self.strategy not in ("alignment", "random"):
            raise ConfigError(f"masking.strategy={self.strategy!r} must be 'alignment' or 'random'")
        if not (0 <= self.camouflage <= 9 and 0 <= self.grey <= 16 and 0 <= self.blank <= 25):
            raise ConfigError("masking budgets exceed the patches of their level (3×3: 9, 4×4: 16, 5×5: 25)")
        for name in ("itm_negative_ratio", "itm_hard_ratio", "text_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"masking.{name}={getattr(self, name)} must be between 0 and 1")


ALIGN_DECODES = ("greedy", "forced")
"""Whose words the alignment generator aligns: its generated caption's, or the real description's (forced)."""


@dataclass
class AlignConfig:
    """The Attention-based Alignment Generator (paper §3.3): the Show-Attend-Tell captioner and its alignments."""

    epochs: int = 20
    """Most captioner epochs (early-stopped on the val split's loss)."""
    batch_size: int = 32
    """Captioner training batch."""
    hidden: int = 256
    """LSTM hidden size."""
    embed: int = 128
    """Word embedding size."""
    attention: int = 128
    """Soft-attention size."""
    lr: float = 2e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    dropout: float = 0.3
    """Dropout before the deep output layer."""
    patience: int = 3
    """Epochs without a better validation loss before stopping (the best weights are kept)."""
    penalty: float = 0.0
    """λ of the doubly-stochastic attention penalty (0: see docs/deviations.md)."""
    max_len: int = 40
    """Most words of a description used as a target, and most generated words per caption."""
    decode_batch_size: int = 64
    """Images per decoding batch when extracting alignments."""
    decode: str = "greedy"
    """Whose words are aligned: ``greedy`` (the captioner's generated caption, as the paper; a word counts only
    when the description has it too) or ``forced`` (the description's own words fed by teacher forcing, each
    with the attention the decoder uses to predict it)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "hidden", "embed", "attention", "patience", "max_len",
                     "decode_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"align.{name}={getattr(self, name)} must be at least 1")
        if self.decode not in ALIGN_DECODES:
            raise ConfigError(f"align.decode={self.decode!r} must be one of {', '.join(ALIGN_DECODES)}")
        if not self.lr > 0:
            raise ConfigError(f"align.lr={self.lr} must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"align.dropout={self.dropout} must be in [0, 1)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "custom"
    """Preset name or file the config came from."""

    def __post_init__(self) -> None:
        """Refuse a config that breaks a rule between sections (:mod:`kaleido_bert.config.rules`), in one line."""
        problem = broken_rule(self)
        if problem:
            raise ConfigError(problem)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_train_items(self, items: int) -> RunConfig:
        """Epoch budgets made steps: ``train.max_steps`` from ``train.epochs`` and ``finetune.max_steps`` /
        caption steps (unless ``caption_max_steps`` sets them) from ``finetune.epochs`` (each only when positive), for
        ``items`` training items.

        The one place epochs become steps (pre-training, fine-tuning and the demo call it); idempotent.
        """
        def steps(epochs: float, batch: int) -> int:
            return max(1, math.ceil(epochs * items / batch))

        values: dict[str, Any] = {}
        if self.train.epochs > 0:
            values["train.max_steps"] = steps(self.train.epochs, self.train.batch_size)
        if self.finetune.epochs > 0:  # a generative captioner keeps its own step budget when it has one
            values["finetune.max_steps"] = steps(self.finetune.epochs, self.finetune.batch_size)
        return self.with_overrides(values) if values else self

    def with_overrides(self, values: dict[str, Any]) -> RunConfig:
        """A new, validated config with dotted keys replaced: ``{"train.lr": 2e-5, "model.tasks": [...]}``.

        The one way to derive a config from another (fine-tuning, ablation columns, pipeline stages); values are
        type-checked as ``--set`` overrides are.

        Raises:
            ConfigError: an unknown key, a wrong type or an invalid value (one line, names the key).
        """
        data = self.to_dict()
        for key, value in values.items():
            *sections, name = key.split(".")
            node = data
            for part in sections:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config section {part!r} in {key!r}")
                node = node[part]
            node[name] = list(value) if isinstance(value, tuple) else value
        return config_from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically (``run.yaml`` next to an output)."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from a (possibly partial) nested dict."""
    return build(RunConfig, data)
