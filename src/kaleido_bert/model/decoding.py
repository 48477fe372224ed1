"""Caption decoding (paper §4.2 FC, generated token by token): greedy, batched beam search and the authors' one-shot fill.

Works on a :class:`~kaleido_bert.model.captioning.KaleidoBertForCaptioning` under its sequence-to-sequence mask:
each step runs the encoder over ``[caption so far, patches]`` and reads the next-token distribution at the last
caption position. Beam 1 is exactly greedy. Shapes: B images, K beam size, P patches (55), F features, V vocabulary;
``patch_features (B, P, F)``, ``patch_positions (B, P, 5)``; outputs are lists of token-id lists.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kaleido_bert.model.captioning import KaleidoBertForCaptioning


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
