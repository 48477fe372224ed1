"""The run configuration's sections (paper §4.1 implementation details): one dataclass per concern.

A run is described by one :class:`RunConfig` made of sections (``model``, ``data``, ``features``, ``align``,
``masking``, ``train``, ``finetune``, ``eval``); each section checks its own values in ``__post_init__`` and
raises a one-line :class:`ConfigError` naming the key. Only :class:`ModelConfig` goes next to the weights
(``config.json``); the full resolved run config is written as ``run.yaml`` next to every output. Loading presets
and ``--set`` overrides: :mod:`kaleido_bert.config.loading`.

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
from kaleido_bert.errors import KaleidoError

PRETRAINING_TASKS = ("mlm", "itm", "rotation", "jigsaw", "camouflage", "grey_to_color", "blank_to_color")
"""The paper's seven pre-training tasks (§3.5): AMLM, ITM and the five AKPM tasks (levels 1 to 5)."""
AKPM_TASKS = PRETRAINING_TASKS[2:]
"""The aligned Kaleido patch modelling tasks I..V of Table 4."""
KNOWN_TASKS = (*PRETRAINING_TASKS, "itc")
"""Every task ``model.tasks`` may name: the seven plus the optional image-text contrastive loss."""


LABEL_TASKS = ("category", "subcategory")
"""The classification tasks (paper §4.2 CR and SUB): each named by the catalogue's label field it predicts."""
CLASS_WEIGHTS = ("none", "balanced", "sqrt")
"""The classifier loss weightings ``finetune.class_weights`` may name."""


PAIR_SCORES = ("itm", "itm+itc")
"""What can rank an (image, text) pair: the ITM logit alone, or ITM log-odds + ITC logit (``eval.pair_score``)."""


class ConfigError(KaleidoError):
    """A config file, preset name or override is invalid."""


def _check_ranges(section: str, config: Any, *, positive: tuple[str, ...] = (), at_least_one: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming ``section.field``, the first value outside its range (or not finite)."""
    rules = ((positive, lambda v: v > 0, "> 0"), (at_least_one, lambda v: v >= 1, "at least 1"),
             (non_negative, lambda v: v >= 0, "at least 0"), (fractions, lambda v: 0 <= v <= 1, "between 0 and 1"))
    for names, ok, wanted in rules:
        for name in names:
            value = getattr(config, name)
            if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{section}.{name}={value!r} must be {wanted}")


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
        _check_ranges("model", self, at_least_one=("hidden_size", "num_layers", "num_heads", "intermediate_size",
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
    """Catalogue directory (see README, "Catalogue format"); None = the built-in synthetic catalogue."""
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
        _check_ranges("data", self, at_least_one=("synthetic_products",), non_negative=("synthetic_seed", "num_workers"),
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
    (README, "Run it on your catalogue")."""

    def __post_init__(self) -> None:
        _check_ranges("features", self, at_least_one=("patch_size", "image_size", "batch_size", "max_side"))
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
        _check_ranges("masking", self, non_negative=("text_max",))
        if self.itm_negatives not in ("sampled", "mined"):
            raise ConfigError(f"masking.itm_negatives={self.itm_negatives!r} must be 'sampled' or 'mined'")
        if self.strategy not in ("alignment", "random"):
            raise ConfigError(f"masking.strategy={self.strategy!r} must be 'alignment' or 'random'")
        if not (0 <= self.camouflage <= 9 and 0 <= self.grey <= 16 and 0 <= self.blank <= 25):
            raise ConfigError("masking budgets exceed the patches of their level (3×3: 9, 4×4: 16, 5×5: 25)")
        for name in ("itm_negative_ratio", "itm_hard_ratio", "text_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"masking.{name}={getattr(self, name)} must be between 0 and 1")


@dataclass
class TrainConfig:
    lr: float = 1e-4
    """Peak learning rate (released scripts: 1e-4; paper text: 2e-5)."""
    batch_size: int = 256
    """Global batch (pairs per optimizer step, across ranks and accumulation)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 50683
    """Optimizer steps (replaced by ``epochs`` when that is positive)."""
    epochs: float = 0.0
    """When > 0: ``max_steps`` = ceil(epochs × training items / batch_size), set by :meth:`RunConfig.with_train_items`."""
    warmup_ratio: float = 0.1
    """Linear warm-up as a share of ``max_steps``, then linear decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (released scripts: 0)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    precision: str = "auto"
    """``auto`` (bf16 on a supporting GPU, else fp32), ``fp32``, ``bf16`` or ``fp16``."""
    seed: int = 0
    """Seed for weights, data order and masking."""
    eval_every: int = 1000
    """Validation every N steps."""
    save_every: int = 1000
    """Checkpoint every N steps."""
    keep_last: int = 3
    """Checkpoints kept."""
    probe_init: bool = False
    """Start the ITC projections (``model.itc_pool = mean``) from the frozen linear probe fitted on the training
    split (LP-FT, Kumar et al. 2022): the dual encoder starts where the frozen baseline ends."""
    itc_queue: int = 0
    """ITC negatives beyond the batch: the detached embeddings of the last N positive pairs of earlier batches
    (ALBEF's queue, without its momentum encoder; same-product pairs masked). 0 = the batch's own pairs only."""
    probe_mix: list[float] = field(default_factory=lambda: [1.0])
    """The pre-trained dual encoder's weights α in (0, 1] to try against a frozen member (WiSE-FT's output
    ensemble, :mod:`kaleido_bert.model.itc_member`): below 1, a linear probe on frozen features (the text
    initialisation mean-pooled, the mean colour feature) is fitted after pre-training and the α with the best
    validation full-gallery mean recall is kept in the checkpoint (the first on a tie); ``[1.0]`` = the model alone."""
    new_lr_scale: float = 1.0
    """With ``model.init``: the learning-rate factor of the parameters that checkpoint does not provide (the patch
    embedding and the pre-training heads; the ITC head too unless ``probe_init`` started it), so that the new
    modules learn at a useful rate while the BERT weights take small steps. 1 = one lr for all."""

    def __post_init__(self) -> None:
        _check_ranges("train", self, positive=("lr", "new_lr_scale"),
                      at_least_one=("batch_size", "grad_accum", "eval_every", "save_every", "keep_last"),
                      non_negative=("max_steps", "epochs", "weight_decay", "grad_clip", "seed", "itc_queue"),
                      fractions=("warmup_ratio",))
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={self.precision!r} must be auto, fp32, bf16 or fp16")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 0:
            raise ConfigError("train.batch_size and train.grad_accum must be ≥1 and train.max_steps ≥0")
        if not self.probe_mix or any(not 0 < m <= 1 for m in self.probe_mix):
            raise ConfigError(f"train.probe_mix={self.probe_mix} must be a non-empty list of numbers in (0, 1]")

    @property
    def itc_member(self) -> bool:
        """Whether pre-training ends by fitting the dual encoder's frozen member (some ``probe_mix`` below 1)."""
        return any(m < 1 for m in self.probe_mix)


@dataclass
class FinetuneConfig:
    lr: float = 2e-5
    """Peak learning rate of every fine-tuning task (the released ``finetune_main.py``)."""
    batch_size: int = 64
    """Global batch."""
    max_steps: int = 2000
    """Optimizer steps per task (replaced by ``epochs`` when that is positive)."""
    epochs: float = 0.0
    """When > 0: ``max_steps`` (and caption steps) = ceil(epochs × the task's training items / batch_size)."""
    class_weights: str | dict[str, str] = "none"
    """Classifier loss weights per class: ``none``, ``balanced`` (n / (C·n_c)) or ``sqrt`` (its square root),
    normalised to mean 1 over the training items: a remedy for imbalanced labels. One kind for both classifiers,
    or a mapping from the label field (``category``, ``subcategory``) to its kind (a field left out: ``none``);
    the probe fits with the same weights. See :meth:`class_weights_for`."""
    caption_max_steps: int = 0
    """Optimizer steps of caption fine-tuning (0 = ``max_steps``): generation needs more than a linear head."""
    caption_lr: float = 0.0
    """Peak learning rate of caption fine-tuning (0 = ``lr``)."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then linear decay to 0."""
    eval_every: int = 500
    """Validation loss every this many steps."""
    caption_objectives: list[str] = field(default_factory=lambda: ["seq2seq", "one_shot"])
    """Caption training: ``seq2seq`` (generation, SPEC §3.5) and/or ``one_shot`` (the authors' mask-all baseline)."""
    inputs: list[str] = field(default_factory=lambda: ["image+text", "image"])
    """Classifier inputs fine-tuned by ``kaleido demo``/``ablate``: ``image+text`` (paper) and ``image``."""
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "caption", "category", "subcategory"])
    """The fine-tuned parts ``kaleido demo`` trains (the ``real`` recipe drops ``retrieval``, whose ITC is trained
    during pre-training, and ``caption``, captioning by retrieval in the model's space instead)."""
    head: str = "pooled"
    """Classifier head input: ``pooled`` (the pooled ``[CLS]``, as the released code) or ``wide`` (the pooled
    ``[CLS]``, the mean text and patch states and the mean clean colour feature, concatenated)."""
    probe: bool = False
    """Initialise the classifier head by a linear probe (logistic regression on the frozen encoder's features of
    the training split) before fine-tuning (LP-FT)."""
    probe_c: list[float] = field(default_factory=lambda: [1.0])
    """The probe's inverse L2 strengths: with several, each is fitted on the training split and the one with the
    best validation accuracy + macro-F1 is kept (the validation split only; the first on a tie or without one)."""
    probe_mix: list[float] = field(default_factory=lambda: [1.0])
    """The fine-tuned head's weights α in (0, 1] to try against a frozen member (WiSE-FT's output ensemble): below
    1, the wide head also carries a logistic regression on its frozen columns (the colour feature and the sentence
    embedding), and the probe chooses α with C on validation; ``[1.0]`` = the head alone."""
    sentence: bool = False
    """The wide head also reads the frozen sentence embedding of the text initialisation (``model.init``, or the
    offline all-MiniLM-L6-v2, mean-pooled; the frozen baseline's text features), untouched by pre-training
    (image + text classifiers only: an image-only input has no text)."""

    def class_weights_for(self, field_name: str) -> str:
        """The loss weighting of the classifier of ``field_name`` (``category`` or ``subcategory``)."""
        if isinstance(self.class_weights, dict):
            return self.class_weights.get(field_name, "none")
        return self.class_weights

    def __post_init__(self) -> None:
        _check_ranges("finetune", self, positive=("lr",), at_least_one=("max_steps", "batch_size", "eval_every"),
                      non_negative=("caption_max_steps", "caption_lr"), fractions=("warmup_ratio",))
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("finetune.max_steps, finetune.batch_size and finetune.lr must be positive")
        bad = sorted(set(self.caption_objectives) - {"seq2seq", "one_shot"})
        if bad or not self.caption_objectives:
            raise ConfigError(f"finetune.caption_objectives must be a non-empty subset of seq2seq, one_shot; got {bad}")
        bad = sorted(set(self.inputs) - {"image+text", "image"})
        if bad:
            raise ConfigError(f"finetune.inputs has unknown input(s) {bad}; known: image+text, image")
        kinds = self.class_weights if isinstance(self.class_weights, dict) else {"": self.class_weights}
        for name, kind in kinds.items():
            if name and name not in LABEL_TASKS:
                raise ConfigError(f"finetune.class_weights has an unknown label field {name!r}; known: "
                                  f"{', '.join(LABEL_TASKS)}")
            if kind not in CLASS_WEIGHTS:
                key = f"finetune.class_weights.{name}" if name else "finetune.class_weights"
                raise ConfigError(f"{key}={kind!r} must be {', '.join(CLASS_WEIGHTS[:-1])} or {CLASS_WEIGHTS[-1]}")
        if self.epochs < 0:
            raise ConfigError(f"finetune.epochs={self.epochs} must be ≥ 0")
        known = ("retrieval", "caption", *LABEL_TASKS)
        bad = sorted(set(self.tasks) - set(known))
        if bad:
            raise ConfigError(f"finetune.tasks has unknown task(s) {bad}; known: {', '.join(known)}")
        if self.head not in ("pooled", "wide"):
            raise ConfigError(f"finetune.head={self.head!r} must be pooled or wide")
        if not self.probe_c or any(not c > 0 for c in self.probe_c):
            raise ConfigError(f"finetune.probe_c={self.probe_c} must be a non-empty list of positive numbers")
        if self.sentence and self.head != "wide":
            raise ConfigError("finetune.sentence is read by the wide head only: set finetune.head=wide")
        if not self.probe_mix or any(not 0 < m <= 1 for m in self.probe_mix):
            raise ConfigError(f"finetune.probe_mix={self.probe_mix} must be a non-empty list of numbers in (0, 1]")
        if self.frozen_member and not (self.probe and self.head == "wide"):
            raise ConfigError("finetune.probe_mix below 1 is chosen by the probe of the wide head: set "
                              "finetune.probe=true and finetune.head=wide")

    @property
    def frozen_member(self) -> bool:
        """Whether the classifiers carry the frozen member (some ``probe_mix`` below 1)."""
        return any(m < 1 for m in self.probe_mix)


@dataclass
class EvalConfig:
    num_queries: int = 1000
    """Queries per direction in the sample-100 protocol (paper Table 2)."""
    num_negatives: int = 100
    """Negatives per query, same sub-category first."""
    seed: int = 0
    """Seed of the candidate draw."""
    rerank_k: int = 100
    """Full-gallery retrieval: dual-encoder top-k re-ranked by ITM."""
    beam_size: int = 3
    """Caption beam width."""
    max_caption_len: int = 40
    """Generated caption tokens."""
    caption_items: int = 0
    """Test images captioned for the FC metrics (0 = all)."""
    batch_size: int = 64
    """Pairs or images per forward pass when scoring."""
    split: str = "test"
    """The split evaluated."""
    baseline_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the frozen dual-encoder baseline ``kaleido demo`` scores beside the model (empty = none)."""
    pair_score: str = "itm"
    """What ranks an (image, text) pair in sample-100 and re-ranking: ``itm`` (the ITM logit, the paper) or
    ``itm+itc`` (the ITM log-odds plus the ITC logit of the pair, as BLIP scores its re-ranked candidates)."""
    sample100_shortlist: int = 0
    """Sample-100 with an ITC head: only each query's top k candidates by the dual encoder go through the
    cross-encoder, the rest follow in dual-encoder order (0 = every candidate, the paper's protocol)."""
    caption_retrieval_k: int = 0
    """When > 0, also caption by retrieval in the model's dual-encoder space: the nearest training description
    (``fc/nearest``) and the consensus of the k nearest (``fc/consensus``, Devlin et al. 2015)."""
    caption_retrieval_grid: list[int] = field(default_factory=list)
    """With ``caption_retrieval_k`` > 0: the k values to choose among by validation SumCAP (1 = the nearest), kept
    in the retrieval model's checkpoint; empty = ``caption_retrieval_k`` as set."""
    query_bank_betas: list[float] = field(default_factory=list)
    """Full-gallery search normalised by a bank of training queries (inverted softmax): the β values to choose
    among by validation mean recall (0 = off), kept in the retrieval model's checkpoint; empty = off."""

    def __post_init__(self) -> None:
        _check_ranges("eval", self, at_least_one=("num_queries", "num_negatives", "beam_size", "max_caption_len",
                                                  "batch_size"), non_negative=("seed", "rerank_k", "caption_items",
                                                                              "caption_retrieval_k",
                                                                              "sample100_shortlist"))
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"eval.split={self.split!r} must be train, val or test")
        bad = [k for k in self.caption_retrieval_grid if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad or len(set(self.caption_retrieval_grid)) != len(self.caption_retrieval_grid):
            raise ConfigError(f"eval.caption_retrieval_grid={self.caption_retrieval_grid!r} must list distinct "
                              f"positive integers")
        betas = self.query_bank_betas
        if (any(isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b < 0 for b in betas)
                or len(set(betas)) != len(betas)):
            raise ConfigError(f"eval.query_bank_betas={betas!r} must list distinct finite numbers ≥ 0")
        if self.pair_score not in PAIR_SCORES:
            raise ConfigError(f"eval.pair_score={self.pair_score!r} must be one of {', '.join(PAIR_SCORES)}")


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
    """λ of the doubly-stochastic attention penalty (0: see the README's deviations)."""
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_train_items(self, items: int) -> RunConfig:
        """Epoch budgets made steps: ``train.max_steps`` from ``train.epochs`` and ``finetune.max_steps`` /
        ``caption_max_steps`` from ``finetune.epochs`` (each only when positive), for ``items`` training items.

        The one place epochs become steps (pre-training, fine-tuning and the demo call it); idempotent.
        """
        def steps(epochs: float, batch: int) -> int:
            return max(1, math.ceil(epochs * items / batch))

        values: dict[str, Any] = {}
        if self.train.epochs > 0:
            values["train.max_steps"] = steps(self.train.epochs, self.train.batch_size)
        if self.finetune.epochs > 0:
            values["finetune.max_steps"] = steps(self.finetune.epochs, self.finetune.batch_size)
            values["finetune.caption_max_steps"] = 0
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
        from kaleido_bert.config.loading import config_from_dict

        return config_from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically (``run.yaml`` next to an output)."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))
