"""Alignment-guided masking and the five patch corruptions (paper §3.4 AGM and §3.5 AKPM).

Everything here is a pure function of its inputs and an explicit ``torch.Generator``, called every time an item
is loaded, so each epoch sees a fresh corruption (the original froze one per item; a documented deviation).

Budgets (paper §3.4, the original's column shapes): text up to 15% of the tokens and at most 10; one camouflaged
patch at 3×3, two greyed at 4×4, three blanked at 5×5; 1×1 and 2×2 are never masked but always corrupted by the
rotation (1×1) and jigsaw (2×2) tasks. Aligned (token, patch) pairs are used first: for each chosen pair exactly
one side is masked, chosen at random, so the other modality can explain it; random choices fill what is left.

Shape legend: T text tokens, F feature size; patch features ``(55, F)`` in level order (see ``patches.py``).
Labels use -100 where there is nothing to predict (PyTorch's cross-entropy ``ignore_index``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.patches.grid import level_slice

JIGSAW_PERMUTATIONS: list[tuple[int, ...]] = list(itertools.permutations(range(4)))
"""The 24 orders of the 2×2 patches; the jigsaw label is the index of the order used."""
MASKED_LEVELS = {3: "camouflage", 4: "grey", 5: "blank"}
IGNORE = -100
"""The label of a position with nothing to predict (PyTorch's ``ignore_index``); the one owner of that value."""


@dataclass
class MaskPlan:
    """Which text positions and which patches of each masked level are corrupted for one item."""

    text: list[int] = field(default_factory=list)
    patches: dict[int, list[int]] = field(default_factory=lambda: {3: [], 4: [], 5: []})


def text_budget(num_tokens: int, ratio: float = 0.15, cap: int = 10) -> int:
    """Masked-token budget: ``ratio`` of the real tokens, at least 1 when there is any, at most ``cap``."""
    if num_tokens <= 0:
        return 0
    return min(cap, max(1, round(ratio * num_tokens)), num_tokens)


def _randperm(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def plan_masks(
    candidates: list[int],
    pairs: list[AlignedPair],
    *,
    budgets: dict[int, int],
    text_ratio: float = 0.15,
    text_max: int = 10,
    use_alignments: bool = True,
    generator: torch.Generator,
) -> MaskPlan:
    """Choose the masked tokens and patches of one item.

    Args:
        candidates: maskable text positions (real tokens; not ``[CLS]``/``[SEP]``/padding).
        pairs: aligned (token, patch) pairs of the item (ignored when ``use_alignments`` is False).
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
    candidate_set = set(candidates)
    pairs = [p for p in pairs if p.level in budgets and set(p.tokens) <= candidate_set] if use_alignments else []
    partners_of_text: dict[int, set[tuple[int, int]]] = {}
    partners_of_patch: dict[tuple[int, int], set[int]] = {}
    for p in pairs:
        for t in p.tokens:
            partners_of_text.setdefault(t, set()).add((p.level, p.patch))
        partners_of_patch.setdefault((p.level, p.patch), set()).update(p.tokens)

    def can_mask_text(tokens: tuple[int, ...]) -> bool:
        fresh = [t for t in tokens if t not in masked_text]
        return bool(fresh) and len(fresh) <= text_left and not (set(tokens) & protected_text)

    def mask_text(tokens: tuple[int, ...]) -> None:
        nonlocal text_left
        for t in tokens:
            if t not in masked_text:
                masked_text.add(t)
                plan.text.append(t)
                text_left -= 1
            protected_patch.update(partners_of_text.get(t, ()))

    def can_mask_patch(key: tuple[int, int]) -> bool:
        return left.get(key[0], 0) > 0 and key not in masked_patch and key not in protected_patch

    def mask_patch(key: tuple[int, int]) -> None:
        masked_patch.add(key)
        plan.patches[key[0]].append(key[1])
        left[key[0]] -= 1
        protected_text.update(partners_of_patch.get(key, ()))

    for i in _randperm(len(pairs), generator):
        pair = pairs[i]
        key = (pair.level, pair.patch)
        if key in masked_patch or set(pair.tokens) & masked_text:
            continue  # one side is masked already (through another pair); its partners are protected
        text_first = bool(torch.randint(0, 2, (1,), generator=generator).item())
        for side in ("text", "patch") if text_first else ("patch", "text"):
            if side == "text" and can_mask_text(pair.tokens):
                mask_text(pair.tokens)
                break
            if side == "patch" and can_mask_patch(key):
                mask_patch(key)
                break

    # random fill of what the alignments left, never touching a protected partner
    free_text = [candidates[i] for i in _randperm(len(candidates), generator)]
    for t in free_text:
        if text_left <= 0:
            break
        if t not in masked_text and t not in protected_text:
            mask_text((t,))
    for level in budgets:
        for patch in _randperm(level * level, generator):
            if left[level] <= 0:
                break
            if can_mask_patch((level, patch)):
                mask_patch((level, patch))
    plan.text.sort()
    for level in plan.patches:
        plan.patches[level].sort()
    return plan


def mask_text(
    text_ids: Tensor, positions: list[int], *, mask_token_id: int, vocab_size: int, special_ids: set[int],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 corruption of the chosen positions (paper §3.4).

    Args:
        text_ids: ``(T,)`` token ids.
        positions: positions to corrupt.

    Returns:
        ``(corrupted_ids (T,), labels (T,))`` with the original id at chosen positions and -100 elsewhere.
    """
    ids = text_ids.clone()
    labels = torch.full_like(text_ids, IGNORE)
    for pos in positions:
        labels[pos] = text_ids[pos]
        roll = torch.rand((1,), generator=generator).item()
        if roll < 0.8:
            ids[pos] = mask_token_id
        elif roll < 0.9:
            token = int(torch.randint(0, vocab_size, (1,), generator=generator).item())
            while token in special_ids:
                token = int(torch.randint(0, vocab_size, (1,), generator=generator).item())
            ids[pos] = token
        # else: left unchanged (10%)
    return ids, labels


def rotate_patch(colour: Tensor, rotated: Tensor, quarter_turns: int) -> Tensor:
    """Rotation task (1×1): swap in the rotated-by-``quarter_turns`` feature; 0 keeps the original. Label = turns."""
    out = colour.clone()
    if quarter_turns:
        out[0] = rotated[quarter_turns - 1]
    return out


def jigsaw(colour: Tensor, permutation_index: int) -> Tensor:
    """Jigsaw task (2×2): slot i receives patch ``perm[i]``; the positions of the slots are unchanged."""
    out = colour.clone()
    s = level_slice(2)
    order = torch.tensor(JIGSAW_PERMUTATIONS[permutation_index])
    out[s] = colour[s][order]
    return out


def camouflage(colour: Tensor, donor_colour: Tensor, index: int) -> Tensor:
    """Camouflage task (3×3): patch ``index`` replaced by the same-position patch of another product."""
    out = colour.clone()
    s = level_slice(3)
    out[s.start + index] = donor_colour[s.start + index]
    return out


def grey_patches(colour: Tensor, grey: Tensor, indices: list[int]) -> Tensor:
    """Grey-to-colour task (4×4): swap in the greyed features (``grey`` is ``(16, F)``) at ``indices``."""
    out = colour.clone()
    start = level_slice(4).start
    for i in indices:
        out[start + i] = grey[i]
    return out


def blank_patches(colour: Tensor, indices: list[int]) -> Tensor:
    """Blank-to-colour task (5×5): zero the features at ``indices`` (the original did this inside the model)."""
    out = colour.clone()
    start = level_slice(5).start
    for i in indices:
        out[start + i] = 0.0
    return out


def corrupt_patches(
    colour: Tensor, rotated: Tensor, grey: Tensor, donor_colour: Tensor | None, plan: MaskPlan, *,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply all five corruptions to one item's ``(55, F)`` colour features.

    Returns:
        ``(features (55, F), labels)`` where labels holds ``rotation`` (0–3), ``jigsaw`` (0–23), ``camouflage``
        (0–8, or -100 when no patch was camouflaged or no donor exists), and the index lists ``grey`` (≤2,
        padded with -100 to the budget) and ``blank`` likewise, relative to their level.
    """
    turns = int(torch.randint(0, 4, (1,), generator=generator).item())
    perm = int(torch.randint(0, len(JIGSAW_PERMUTATIONS), (1,), generator=generator).item())
    features = jigsaw(rotate_patch(colour, rotated, turns), perm)
    camo = plan.patches.get(3, [])
    camo_label = IGNORE
    if camo and donor_colour is not None:
        features = camouflage(features, donor_colour, camo[0])
        camo_label = camo[0]
    features = grey_patches(features, grey, plan.patches.get(4, []))
    features = blank_patches(features, plan.patches.get(5, []))
    labels = {"rotation": torch.tensor(turns), "jigsaw": torch.tensor(perm), "camouflage": torch.tensor(camo_label)}
    return features, labels
