"""Alignment-guided masking and the five patch corruptions (paper §3.4 AGM and §3.5 AKPM), for a batch at once.

Everything here is a pure function of its inputs and of explicit random draws (uniforms in ``[0, 1)`` or the
orders derived from them, see :mod:`kaleido_bert.inputs.draws`), planned every time a batch is loaded, so each
epoch sees a fresh corruption (the original froze one per item; a documented deviation).

Budgets (paper §3.4, the original's column shapes): text up to 15% of the tokens and at most 10; one camouflaged
patch at 3×3, two greyed at 4×4, three blanked at 5×5; 1×1 and 2×2 are never masked but always corrupted by the
rotation (1×1) and jigsaw (2×2) tasks. Aligned (token, patch) pairs are used first: for each chosen pair exactly
one side is masked, chosen at random, so the other modality can explain it; random choices fill what is left.
Items without usable pairs are planned by array operations only; items with pairs go through :func:`plan_masks`,
which gives the same plan as the array path when the pairs are empty.

Shape legend: B items, T text tokens, F feature size; patch features ``(B, 55, F)`` in level order (see
``patches/grid.py``); index arrays per masked level ``(B, budget)`` padded with -1 (these functions) or -100
(batches). Labels use -100 where there is nothing to predict (PyTorch's cross-entropy ``ignore_index``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.patches.grid import level_slice

JIGSAW_PERMUTATIONS: list[tuple[int, ...]] = list(itertools.permutations(range(4)))
"""The 24 orders of the 2×2 patches; the jigsaw label is the index of the order used."""
MASKED_LEVELS = {3: "camouflage", 4: "grey", 5: "blank"}
IGNORE = -100
"""The label of a position with nothing to predict (PyTorch's ``ignore_index``); the one owner of that value."""
_PERMUTATIONS = torch.tensor(JIGSAW_PERMUTATIONS)


@dataclass
class MaskPlan:
    """Which text positions and which patches of each masked level are corrupted for one item (sorted)."""

    text: list[int] = field(default_factory=list)
    patches: dict[int, list[int]] = field(default_factory=lambda: {3: [], 4: [], 5: []})


@dataclass
class MaskDraws:
    """The random choices behind one item's plan, as orders (first = tried first).

    Attributes:
        text_order: the maskable positions in the order the random fill tries them.
        patch_order: per masked level, its patch indices in the order the random fill tries them.
        pair_order: indices into the aligned pairs, in the order they are considered.
        text_first: per aligned pair, whether its text side is tried before its patch.
    """

    text_order: Sequence[int]
    patch_order: dict[int, Sequence[int]]
    pair_order: Sequence[int] = ()
    text_first: Sequence[bool] = ()


def text_budget(num_tokens: int, ratio: float = 0.15, cap: int = 10) -> int:
    """Masked-token budget: ``ratio`` of the real tokens, at least 1 when there is any, at most ``cap``."""
    if num_tokens <= 0:
        return 0
    return min(cap, max(1, round(ratio * num_tokens)), num_tokens)


def plan_masks(
    candidates: Sequence[int],
    pairs: Sequence[AlignedPair],
    draws: MaskDraws,
    *,
    budgets: dict[int, int],
    text_ratio: float = 0.15,
    text_max: int = 10,
    use_alignments: bool = True,
) -> MaskPlan:
    """Choose the masked tokens and patches of one item.

    Args:
        candidates: maskable text positions (real tokens; not ``[CLS]``/``[SEP]``/padding).
        pairs: aligned (token, patch) pairs of the item (ignored when ``use_alignments`` is False).
        draws: the orders of the random choices (``draws.text_order`` holds the candidates).
        budgets: patches to mask per level, e.g. ``{3: 1, 4: 2, 5: 3}``.
        use_alignments: False gives the random-masking baseline of the ablation.

    Returns:
        A plan whose sizes never exceed the budgets. For every aligned pair at most one side is masked: masking
        one side protects every partner of it (in all pairs) from being masked by later pairs or the random fill.
    """
    text_left = text_budget(len(candidates), text_ratio, text_max)
    left = dict(budgets)
    plan = MaskPlan(patches={level: [] for level in budgets})
    masked_text: set[int] = set()
    protected_text: set[int] = set()
    masked_patch: set[tuple[int, int]] = set()
    protected_patch: set[tuple[int, int]] = set()
    partners_of_text: dict[int, set[tuple[int, int]]] = {}
    if use_alignments and pairs:
        candidate_set = set(candidates)
        usable = {i for i, p in enumerate(pairs) if p.level in budgets and candidate_set.issuperset(p.tokens)}
        partners_of_patch: dict[tuple[int, int], set[int]] = {}
        for i in usable:
            p = pairs[i]
            for t in p.tokens:
                partners_of_text.setdefault(t, set()).add((p.level, p.patch))
            partners_of_patch.setdefault((p.level, p.patch), set()).update(p.tokens)
        for i in draws.pair_order:
            if i not in usable:
                continue
            pair = pairs[i]
            key = (pair.level, pair.patch)
            if key in masked_patch or not masked_text.isdisjoint(pair.tokens):
                continue  # one side is masked already (through another pair); its partners are protected
            fresh = [t for t in dict.fromkeys(pair.tokens) if t not in masked_text]
            text_ok = bool(fresh) and len(fresh) <= text_left and protected_text.isdisjoint(pair.tokens)
            patch_ok = left[key[0]] > 0 and key not in protected_patch
            if text_ok and (draws.text_first[i] or not patch_ok):
                for t in fresh:
                    masked_text.add(t)
                    plan.text.append(t)
                    protected_patch.update(partners_of_text.get(t, ()))
                text_left -= len(fresh)
            elif patch_ok:
                masked_patch.add(key)
                plan.patches[key[0]].append(key[1])
                left[key[0]] -= 1
                protected_text.update(partners_of_patch[key])

    # random fill of what the alignments left, never touching a protected partner
    for t in draws.text_order if text_left > 0 else ():
        if t not in masked_text and t not in protected_text:
            masked_text.add(t)
            plan.text.append(t)
            protected_patch.update(partners_of_text.get(t, ()))
            text_left -= 1
            if text_left == 0:
                break
    for level, budget in left.items():
        chosen = plan.patches[level]
        for patch in draws.patch_order[level] if budget > 0 else ():
            if (level, patch) not in masked_patch and (level, patch) not in protected_patch:
                chosen.append(patch)
                budget -= 1
                if budget == 0:
                    break
        chosen.sort()
    plan.text.sort()
    return plan


def priority_orders(lengths: np.ndarray, text_keys: np.ndarray,
                    patch_keys: dict[int, np.ndarray]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The random orders of a batch: lowest key first.

    Args:
        lengths: ``(B,)`` sequence lengths including ``[CLS]`` and the final ``[SEP]``.
        text_keys: ``(B, T)`` uniforms, one per position (``T`` ≥ the longest sequence).
        patch_keys: per masked level, ``(B, level²)`` uniforms.

    Returns:
        ``(text_order (B, T), patch_order)``: positions with the maskable ones (``1..length-2``) first, and per
        level ``(B, level²)`` patch indices.
    """
    positions = np.arange(text_keys.shape[1])[None, :]
    maskable = (positions >= 1) & (positions <= lengths[:, None] - 2)
    text_order = np.argsort(np.where(maskable, text_keys, 2.0), axis=1, kind="stable")
    return text_order, {level: np.argsort(keys, axis=1, kind="stable") for level, keys in patch_keys.items()}


def random_fill(lengths: np.ndarray, text_order: np.ndarray, patch_order: dict[int, np.ndarray], *,
                budgets: dict[int, int], text_ratio: float = 0.15,
                text_max: int = 10) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Plans of items without aligned pairs, by array operations: the first of each order are masked.

    Args:
        lengths: ``(B,)`` sequence lengths; text_order, patch_order: from :func:`priority_orders`.

    Returns:
        ``(text (B, T) bool, patches)``: the masked positions, and per level the masked patch indices
        ``(B, budget)`` sorted ascending, exactly what :func:`plan_masks` chooses without pairs from the same
        orders (:func:`item_draws`).
    """
    counts = np.maximum(lengths - 2, 0)
    budget = np.minimum(np.minimum(text_max, np.maximum(1, np.rint(text_ratio * counts))), counts)
    budget = np.where(counts > 0, budget, 0).astype(np.int64)  # text_budget(); np.rint rounds half to even
    most = int(budget.max(initial=0))
    text = np.zeros(text_order.shape, dtype=bool)
    first = text_order[:, :most]
    np.put_along_axis(text, first, np.arange(most)[None, :] < budget[:, None], axis=1)
    patches = {level: np.sort(patch_order[level][:, :k], axis=1) for level, k in budgets.items()}
    return text, patches


def item_draws(b: int, length: int, text_order: np.ndarray, patch_order: dict[int, np.ndarray],
               pair_keys: np.ndarray, side_keys: np.ndarray) -> MaskDraws:
    """Item ``b``'s :class:`MaskDraws` from the batch orders and its pairs' keys (a side key < 0.5: text first)."""
    return MaskDraws(text_order=text_order[b, :max(length - 2, 0)].tolist(),
                     patch_order={level: order[b].tolist() for level, order in patch_order.items()},
                     pair_order=np.argsort(pair_keys, kind="stable").tolist(), text_first=(side_keys < 0.5).tolist())


def mask_tokens(text_ids: Tensor, chosen: Tensor, rolls: Tensor, picks: Tensor, *, mask_token_id: int,
                replacements: Tensor) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 corruption of the chosen positions (paper §3.4).

    Args:
        text_ids: ``(B, T)`` token ids.
        chosen: ``(B, T)`` bool, the positions to corrupt.
        rolls: ``(B, T)`` uniforms: below 0.8 → ``[MASK]``, below 0.9 → a random token, else unchanged.
        picks: ``(B, T)`` uniforms choosing the random token among ``replacements`` (the non-special ids).

    Returns:
        ``(corrupted_ids (B, T), labels (B, T))`` with the original id at chosen positions and -100 elsewhere.
    """
    labels = torch.where(chosen, text_ids, torch.full_like(text_ids, IGNORE))
    random_ids = replacements[(picks * len(replacements)).long().clamp_(max=len(replacements) - 1)]
    ids = torch.where(chosen & (rolls < 0.9), random_ids, text_ids)
    ids = torch.where(chosen & (rolls < 0.8), torch.full_like(text_ids, mask_token_id), ids)
    return ids, labels


def patches_at(features: Tensor, index: Tensor) -> Tensor:
    """``features[b, index[b, j]]`` for every b, j: ``(B, P, F)`` and ``(B, k)`` → ``(B, k, F)`` (a row gather)."""
    b, p, f = features.shape
    rows = (torch.arange(b)[:, None] * p + index).flatten()
    return features.reshape(b * p, f).index_select(0, rows).view(b, index.shape[1], f)


def _rotate_(out: Tensor, rotated: Tensor, turns: Tensor) -> None:
    rows = (turns > 0).nonzero().flatten()
    out[rows, 0] = rotated[rows, turns[rows] - 1].to(out.dtype)


def _jigsaw_(out: Tensor, permutation_index: Tensor) -> None:
    s = level_slice(2)
    out[:, s] = patches_at(out, s.start + _PERMUTATIONS[permutation_index])  # slot i receives patch perm[i]


def _camouflage_(out: Tensor, donor_patch: Tensor, index: Tensor) -> None:
    rows = (index >= 0).nonzero().flatten()
    out[rows, level_slice(3).start + index[rows]] = donor_patch[rows].to(out.dtype)


def _put_(out: Tensor, level: int, indices: Tensor, source: Tensor | None) -> None:
    """Patches ``indices`` (B, k; -1 = none) of ``level`` take ``source``'s same patch (B, level², F), or 0."""
    rows, slots = (indices >= 0).nonzero(as_tuple=True)
    patches = indices[rows, slots]
    out[rows, level_slice(level).start + patches] = 0.0 if source is None else source[rows, patches].to(out.dtype)


def rotate_patch(colour: Tensor, rotated: Tensor, quarter_turns: Tensor) -> Tensor:
    """Rotation task (1×1): swap in the rotated-by-``quarter_turns`` (B,) feature of ``rotated`` (B, 3, F); 0 keeps
    the original. Label = turns."""
    out = colour.clone()
    _rotate_(out, rotated, quarter_turns)
    return out


def jigsaw(colour: Tensor, permutation_index: Tensor) -> Tensor:
    """Jigsaw task (2×2): slot i receives patch ``perm[i]``; the positions of the slots are unchanged."""
    out = colour.clone()
    _jigsaw_(out, permutation_index)
    return out


def camouflage(colour: Tensor, donor_patch: Tensor, index: Tensor) -> Tensor:
    """Camouflage task (3×3): patch ``index`` (B,) (-1: none) replaced by ``donor_patch`` ``(B, F)``, the
    same-position patch of another product."""
    out = colour.clone()
    _camouflage_(out, donor_patch, index)
    return out


def grey_patches(colour: Tensor, grey: Tensor, indices: Tensor) -> Tensor:
    """Grey-to-colour task (4×4): swap in the greyed features (``grey`` is ``(B, 16, F)``) at ``indices`` (B, k)."""
    out = colour.clone()
    _put_(out, 4, indices, grey)
    return out


def blank_patches(colour: Tensor, indices: Tensor) -> Tensor:
    """Blank-to-colour task (5×5): zero the features at ``indices`` (B, k) (the original did this in the model)."""
    out = colour.clone()
    _put_(out, 5, indices, None)
    return out


def corrupt_patches_(features: Tensor, rotated: Tensor, grey: Tensor, donor_patch: Tensor, *, turns: Tensor,
                     permutation: Tensor, camouflaged: Tensor, greyed: Tensor, blanked: Tensor) -> Tensor:
    """Apply all five corruptions, in place, to a batch's own copy of its ``(B, 55, F)`` colour features.

    The same as :func:`rotate_patch`, :func:`jigsaw`, :func:`camouflage`, :func:`grey_patches` and
    :func:`blank_patches` in turn, without their copies.

    Args:
        rotated: ``(B, 3, F)``; grey: ``(B, 16, F)``; donor_patch: ``(B, F)``, the camouflage donor's patch
            (any float dtype: the values taken are cast to ``features``').
        turns: ``(B,)`` quarter turns of the 1×1 patch (0–3), the rotation label.
        permutation: ``(B,)`` jigsaw order index (0–23), the jigsaw label.
        camouflaged: ``(B,)`` camouflaged 3×3 patch or -1; greyed ``(B, ≤2)`` and blanked ``(B, ≤3)`` patch
            indices relative to their level, padded with -1.

    Returns:
        ``features``, corrupted.
    """
    _rotate_(features, rotated, turns)
    _jigsaw_(features, permutation)
    _camouflage_(features, donor_patch, camouflaged)
    _put_(features, 4, greyed, grey)
    _put_(features, 5, blanked, None)
    return features
