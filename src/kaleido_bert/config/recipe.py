"""The run configuration's training and evaluation sections (paper §4.1–4.2): ``train``, ``finetune``, ``eval``.

Pre-training's optimizer, schedule and budget (:class:`TrainConfig`), fine-tuning's (:class:`FinetuneConfig`: the
parts it trains, the classifier head and its probe) and the evaluation protocols' settings (:class:`EvalConfig`).
Each section checks its own values in ``__post_init__``; the sections of the model and its data are
:mod:`kaleido_bert.config.sections`, which also gathers every section into the :class:`RunConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kaleido_bert.config.validation import ConfigError, check_ranges

LABEL_TASKS = ("category", "subcategory")
"""The classification tasks (paper §4.2 CR and SUB): each named by the catalogue's label field it predicts."""
CLASS_WEIGHTS = ("none", "balanced", "sqrt")
"""The classifier loss weightings ``finetune.class_weights`` may name."""
PAIR_SCORES = ("itm", "itm+itc")
"""What can rank an (image, text) pair: the ITM logit alone, or ITM log-odds + ITC logit (``eval.pair_score``)."""


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
    """When > 0: ``max_steps`` = ceil(epochs × training items / batch_size), set by
    :meth:`~kaleido_bert.config.sections.RunConfig.with_train_items`."""
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
        check_ranges("train", self, positive=("lr", "new_lr_scale"),
                     at_least_one=("batch_size", "grad_accum", "eval_every", "save_every", "keep_last"),
                     non_negative=("max_steps", "epochs", "weight_decay", "grad_clip", "seed"),
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
    """Caption training: ``seq2seq`` (generation by next-token prediction) and/or ``one_shot`` (the authors' mask-all baseline)."""
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
        check_ranges("finetune", self, positive=("lr",), at_least_one=("max_steps", "batch_size", "eval_every"),
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
        check_ranges("eval", self, at_least_one=("num_queries", "num_negatives", "beam_size", "max_caption_len",
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
