"""Fashion captioning that generates (paper §4.2, task 4 "FC"; SPEC §3.5 "Captioning that actually generates").

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

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.masking import IGNORE
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.model.encoder import KaleidoBertConfig, KaleidoBertModel, KaleidoBertPreTrainedModel
from kaleido_bert.model.heads import masked_cross_entropy
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.runs import WEIGHTS, resolve_checkpoint

OBJECTIVES = ("seq2seq", "one_shot")
LOSS_NAMES = {"seq2seq": "caption", "one_shot": "one_shot"}
"""Objective → the name of its loss in :attr:`CaptionOutput.losses`."""


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
def _next_log_probs(model: KaleidoBertForCaptioning, text_ids: Tensor, patch_features: Tensor,
                    patch_positions: Tensor) -> Tensor:
    """``(N, V)`` float32 log-probabilities of the token after ``text_ids (N, t)`` (full recompute, no cache)."""
    hidden = model.encode_seq2seq(text_ids, torch.ones_like(text_ids), patch_features, patch_positions)
    return F.log_softmax(model.lm(hidden[:, -1]).float(), dim=-1)


def _restrict(logp: Tensor, banned: list[int], sep_id: int, last: bool) -> Tensor:
    """Never pick ``banned`` ids; at the last step (``max_len`` words generated) only ``[SEP]`` is allowed."""
    if last:
        only = torch.full_like(logp, float("-inf"))
        only[:, sep_id] = logp[:, sep_id]
        return only
    if banned:
        logp[:, banned] = float("-inf")
    return logp


def _banned(cls_id: int, sep_id: int, banned_ids: Iterable[int]) -> list[int]:
    return sorted(({int(i) for i in banned_ids} | {int(cls_id)}) - {int(sep_id)})


@torch.no_grad()
def greedy(model: KaleidoBertForCaptioning, patch_features: Tensor, patch_positions: Tensor, *, cls_id: int,
           sep_id: int, max_len: int = 40, banned_ids: Iterable[int] = ()) -> list[list[int]]:
    """Greedy left-to-right decoding with the seq2seq mask (the reference :func:`generate` with beam 1 equals).

    Args:
        model: the captioning model (evaluated in eval mode; its mode is restored).
        patch_features: ``(B, P, F)``; patch_positions: ``(B, P, 5)``.
        cls_id, sep_id: the tokenizer's ``[CLS]`` and ``[SEP]`` ids; ``[SEP]`` ends a caption.
        max_len: at most this many caption tokens (after them ``[SEP]`` is forced).
        banned_ids: ids never generated (``[CLS]`` always is), e.g. ``[PAD]``, ``[MASK]``, ``[UNK]``.

    Returns:
        For each image its caption token ids, without ``[CLS]``/``[SEP]``.
    """
    was_training = model.training
    model.eval()
    try:
        b, device = patch_features.shape[0], patch_features.device
        banned = _banned(cls_id, sep_id, banned_ids)
        seqs = torch.full((b, 1), cls_id, dtype=torch.long, device=device)
        out: list[list[int]] = [[] for _ in range(b)]
        active = list(range(b))
        for step in range(max_len + 1):
            index = torch.tensor(active, device=device)
            logp = _next_log_probs(model, seqs[index], patch_features[index], patch_positions[index])
            tokens = _restrict(logp, banned, sep_id, step == max_len).argmax(dim=-1)  # (A,)
            seqs = torch.cat([seqs, torch.zeros((b, 1), dtype=torch.long, device=device)], dim=1)
            seqs[index, -1] = tokens
            still = []
            for image, token in zip(active, tokens.tolist(), strict=True):
                if token == sep_id:
                    out[image] = seqs[image, 1:-1].tolist()
                else:
                    still.append(image)
            active = still
            if not active:
                break
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: KaleidoBertForCaptioning, patch_features: Tensor, patch_positions: Tensor, *, cls_id: int,
             sep_id: int, beam_size: int = 3, max_len: int = 40, length_penalty: float = 1.0,
             banned_ids: Iterable[int] = ()) -> list[list[int]]:
    """Batched beam search with the seq2seq mask; the beams of all images run in one forward per step.

    Every hypothesis, finished or not, is ranked by

        score = Σ log p(token) / L ** length_penalty,   L = tokens generated so far (a final ``[SEP]`` counts)

    (a plain power of the length, simpler than GNMT's ((5 + L) / 6) ** α: 0 = summed log-probability, 1 = mean
    per token). A finished hypothesis keeps its slot among the K beams for as long as it ranks in the top K of
    all candidates (the extensions of the live beams and the finished hypotheses); an image is done when all K
    slots hold finished hypotheses. So a short caption that finished early cannot end the search while a live
    beam still ranks above it. The answer is the best hypothesis that ever held a slot (a live beam's running
    score can be optimistic, so a finished one it displaced may still win). ``beam_size=1`` is exactly
    :func:`greedy`: the one slot follows the argmax until it picks ``[SEP]``. After ``max_len`` caption tokens
    only ``[SEP]`` is allowed. Each step recomputes the whole sequence (no key/value cache).

    Args:
        model: the captioning model (evaluated in eval mode; its mode is restored).
        patch_features: ``(B, P, F)``; patch_positions: ``(B, P, 5)``.
        cls_id, sep_id: the tokenizer's ``[CLS]`` and ``[SEP]`` ids.
        beam_size: K.
        max_len: at most this many caption tokens.
        length_penalty: the exponent α above.
        banned_ids: ids never generated (``[CLS]`` always is), e.g. ``[PAD]``, ``[MASK]``, ``[UNK]``.

    Returns:
        For each image the best finished hypothesis's token ids, without ``[CLS]``/``[SEP]``.
    """
    if beam_size < 1 or max_len < 0:
        raise ValueError(f"beam_size must be ≥ 1 and max_len ≥ 0 (got {beam_size}, {max_len})")
    was_training = model.training
    model.eval()
    try:
        b, k, device = patch_features.shape[0], beam_size, patch_features.device
        banned = _banned(cls_id, sep_id, banned_ids)
        inf = float("-inf")
        seqs = torch.full((b, k, 1), cls_id, dtype=torch.long, device=device)  # live beams: [CLS] + t tokens
        scores = torch.full((b, k), inf, device=device)  # summed log-probs of the live beams
        scores[:, 0] = 0.0  # one live beam to start with; empty slots score -inf and are never picked
        done_words: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]  # finished slots' tokens
        done_scores = torch.full((b, k), inf, device=device)  # their normalised scores (-inf: slot not finished)
        best: list[tuple[float, list[int]]] = [(inf, []) for _ in range(b)]  # best finished that held a slot
        active = list(range(b))
        for step in range(max_len + 1):
            index = torch.tensor(active, device=device)
            a = len(active)
            logp = _next_log_probs(model, seqs[index].flatten(0, 1), patch_features[index].repeat_interleave(k, 0),
                                   patch_positions[index].repeat_interleave(k, 0))  # (A·K, V)
            logp = _restrict(logp, banned, sep_id, step == max_len)
            vocab = logp.shape[-1]
            extended = (scores[index][..., None] + logp.view(a, k, vocab)) / (step + 1) ** length_penalty
            candidates = torch.cat([extended.flatten(1), done_scores[index]], dim=1)  # (A, K·V + K)
            top_scores, top_index = candidates.topk(k, dim=1)
            new_seqs = torch.cat([seqs, torch.zeros((b, k, 1), dtype=torch.long, device=device)], dim=2)
            new_scores = torch.full_like(scores, inf)
            new_done = done_scores.clone()  # images already done keep theirs
            new_words = list(done_words)
            still = []
            for row, image in enumerate(active):
                new_done[image] = inf
                new_words[image] = [[] for _ in range(k)]
                for slot, (score, flat) in enumerate(zip(top_scores[row].tolist(), top_index[row].tolist(),
                                                         strict=True)):
                    if score == inf:
                        break
                    if flat >= k * vocab:  # a finished hypothesis keeps its place
                        new_words[image][slot] = done_words[image][flat - k * vocab]
                        new_done[image, slot] = score
                        continue
                    beam, token = divmod(flat, vocab)
                    if token == sep_id:
                        new_words[image][slot] = seqs[image, beam, 1:].tolist()
                        new_done[image, slot] = score
                        if score > best[image][0]:
                            best[image] = (score, new_words[image][slot])
                    else:
                        new_seqs[image, slot, :-1] = seqs[image, beam]
                        new_seqs[image, slot, -1] = token
                        new_scores[image, slot] = scores[image, beam] + logp[row * k + beam, token]
                if (new_scores[image] > inf).any():
                    still.append(image)
            seqs, scores, done_scores, done_words, active = new_seqs, new_scores, new_done, new_words, still
            if not active:
                break
        return [words for _, words in best]
    finally:
        model.train(was_training)


def sequence_score(model: KaleidoBertForCaptioning, patch_features: Tensor, patch_positions: Tensor,
                   tokens: list[int], *, cls_id: int, sep_id: int, length_penalty: float = 1.0) -> float:
    """The beam-search score of one caption of one image: Σ log p over its tokens and ``[SEP]`` / L ** α.

    Computed teacher-forced in one pass over ``[CLS] tokens [SEP]``. ``patch_features``: ``(P, F)``.
    """
    ids = torch.tensor([[cls_id, *tokens, sep_id]], device=patch_features.device)
    with torch.no_grad():
        logits = model.seq2seq_logits(ids, torch.ones_like(ids), patch_features[None], patch_positions[None])
    logp = F.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None]).sum()
    return float(logp) / (len(tokens) + 1) ** length_penalty


@torch.no_grad()
def generate_one_shot(model: KaleidoBertForCaptioning, patch_features: Tensor, patch_positions: Tensor, *,
                      cls_id: int, sep_id: int, mask_id: int, length: int | None = None,
                      special_ids: Iterable[int] = ()) -> list[list[int]]:
    """The authors' baseline: fill ``[CLS] [MASK]×length`` in one bidirectional pass.

    ``length`` defaults to the training width ``max_text_len − 1``. Each masked position takes its argmax; the
    caption is cut at the first predicted ``[SEP]`` and special ids (``[CLS]``, ``[MASK]`` and ``special_ids``,
    e.g. ``[PAD]``) are dropped.

    Returns:
        For each image its caption token ids.
    """
    was_training = model.training
    model.eval()
    try:
        b, device = patch_features.shape[0], patch_features.device
        length = int(model.config.max_text_len) - 1 if length is None else length
        ids = torch.full((b, length + 1), mask_id, dtype=torch.long, device=device)
        ids[:, 0] = cls_id
        predicted = model.one_shot_logits(ids, patch_features, patch_positions)[:, 1:].argmax(dim=-1).tolist()
        drop = {int(i) for i in special_ids} | {cls_id, mask_id}
        out = []
        for tokens in predicted:
            if sep_id in tokens:
                tokens = tokens[:tokens.index(sep_id)]
            out.append([t for t in tokens if t not in drop])
        return out
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------- data
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
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    captions: dict[str, str] = {}
    with tqdm(total=len(dataset), desc=f"captions ({method})", unit="img", disable=not progress) as bar:
        for batch in loader:
            feats, positions = batch["patch_features"].to(device), batch["patch_positions"].to(device)
            if method == "beam":
                decoded = generate(model, feats, positions, beam_size=beam_size, max_len=max_len,
                                   length_penalty=length_penalty, banned_ids=specials, **ids)
            else:
                decoded = generate_one_shot(model, feats, positions, mask_id=tokenizer.mask_token_id,
                                            special_ids=specials, **ids)
            for item_id, tokens in zip(batch["ids"], decoded, strict=True):
                captions[item_id] = tokenizer.decode(tokens, skip_special_tokens=True).lower()
            bar.update(len(decoded))
    return captions
