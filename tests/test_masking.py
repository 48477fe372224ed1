"""Alignment-guided masking and the five patch corruptions (paper §3.4–3.5), per item and per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaleido_bert.inputs.draws import item_keys, uniforms
from kaleido_bert.inputs.masking import (
    IGNORE,
    JIGSAW_PERMUTATIONS,
    AlignedPair,
    MaskDraws,
    blank_patches,
    camouflage,
    corrupt_patches_,
    grey_patches,
    item_draws,
    jigsaw,
    mask_tokens,
    plan_masks,
    priority_orders,
    random_fill,
    rotate_patch,
    text_budget,
)
from kaleido_bert.patches.grid import level_slice

BUDGETS = {3: 1, 4: 2, 5: 3}
F = 11


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shuffled(candidates: list[int], n_pairs: int, generator: torch.Generator) -> MaskDraws:
    """Random orders for :func:`plan_masks`, drawn from ``generator``."""
    return MaskDraws(
        text_order=[candidates[i] for i in torch.randperm(len(candidates), generator=generator).tolist()],
        patch_order={level: torch.randperm(level * level, generator=generator).tolist() for level in BUDGETS},
        pair_order=torch.randperm(n_pairs, generator=generator).tolist(),
        text_first=(torch.rand(n_pairs, generator=generator) < 0.5).tolist(),
    )


def plan(candidates, pairs, seed, **kwargs):
    return plan_masks(candidates, pairs, shuffled(list(candidates), len(pairs), gen(seed)), budgets=BUDGETS, **kwargs)


def random_pairs(rng: torch.Generator, n_tokens: int, n_pairs: int) -> list[AlignedPair]:
    pairs = []
    for _ in range(n_pairs):
        start = int(torch.randint(1, n_tokens, (1,), generator=rng))
        width = int(torch.randint(1, 3, (1,), generator=rng))
        level = int(torch.randint(3, 6, (1,), generator=rng))
        patch = int(torch.randint(0, level * level, (1,), generator=rng))
        pairs.append(AlignedPair(tuple(range(start, min(start + width, n_tokens + 1))), level, patch))
    return pairs


@pytest.mark.parametrize("n_tokens, expected", [(0, 0), (1, 1), (5, 1), (20, 3), (40, 6), (63, 9), (100, 10)])
def test_text_budget_is_15_percent_capped_at_10(n_tokens, expected):
    assert text_budget(n_tokens) == expected


@pytest.mark.parametrize("seed", range(40))
def test_budgets_hold_exactly_and_pairs_are_masked_on_one_side(seed):
    rng = gen(1000 + seed)
    n_tokens = int(torch.randint(1, 62, (1,), generator=rng))
    candidates = list(range(1, n_tokens + 1))
    pairs = random_pairs(rng, n_tokens, int(torch.randint(0, 12, (1,), generator=rng)))
    plan_ = plan(candidates, pairs, seed)
    assert len(plan_.text) == len(set(plan_.text)) <= text_budget(n_tokens)
    assert set(plan_.text) <= set(candidates)
    for level, budget in BUDGETS.items():
        chosen = plan_.patches[level]
        assert len(chosen) == len(set(chosen)) == budget  # plenty of free patches: the budget is always met
        assert all(0 <= p < level * level for p in chosen)
    for pair in pairs:
        text_masked = bool(set(pair.tokens) & set(plan_.text))
        patch_masked = pair.patch in plan_.patches[pair.level]
        assert not (text_masked and patch_masked), pair


def test_without_pairs_the_text_budget_is_filled():
    assert len(plan(list(range(1, 41)), [], 0).text) == text_budget(40) == 6


def test_aligned_pairs_are_used_first():
    candidates = list(range(1, 31))
    pairs = [AlignedPair((3,), 5, 7), AlignedPair((9, 10), 4, 2), AlignedPair((12,), 3, 4)]
    hits = 0
    for seed in range(50):
        plan_ = plan(candidates, pairs, seed)
        for p in pairs:
            hits += bool(set(p.tokens) & set(plan_.text)) or p.patch in plan_.patches[p.level]
    assert hits == 150  # every pair has one side masked in every draw
    # both sides get chosen over many draws
    sides = {"text": 0, "patch": 0}
    for seed in range(50):
        sides["text" if 3 in plan(candidates, pairs[:1], seed).text else "patch"] += 1
    assert sides["text"] > 10 and sides["patch"] > 10


def test_random_strategy_ignores_alignments():
    candidates = list(range(1, 31))
    pairs = [AlignedPair((3,), 5, 7)]
    with_pair = sum(3 in plan(candidates, pairs, s, use_alignments=False).text for s in range(200))
    # 4 of 30 tokens are masked at random: about 13%, far from the ~50% of alignment-guided masking
    assert 10 < with_pair < 50


def test_description_shorter_than_the_budget():
    plan_ = plan([1], [AlignedPair((1,), 3, 0)], 0)
    assert len(plan_.text) <= 1 and len(plan_.patches[3]) == 1
    assert plan([], [], 0).text == []


def test_same_seed_same_plan_and_different_seed_differs():
    candidates = list(range(1, 50))
    pairs = random_pairs(gen(7), 49, 8)
    a = plan(candidates, pairs, 3)
    assert a == plan(candidates, pairs, 3)
    assert any(plan(candidates, pairs, s) != a for s in range(4, 10))


@pytest.mark.parametrize("seed", range(5))
def test_the_array_fill_is_the_planner_without_pairs(seed):
    """Items without pairs skip :func:`plan_masks`: the array path must choose exactly what it would."""
    keys = item_keys(seed, 0, range(64))
    lengths = np.concatenate([[2, 3, 4], 2 + (uniforms(keys, 9, 1)[3:, 0] * 62).astype(np.int64)])
    text_keys = uniforms(keys, 1, 64)
    patch_keys = {level: uniforms(keys, 10 + level, level * level) for level in BUDGETS}
    text_order, patch_order = priority_orders(lengths, text_keys, patch_keys)
    text, patches = random_fill(lengths, text_order, patch_order, budgets=BUDGETS)
    for b, n in enumerate(lengths.tolist()):
        draws = item_draws(b, n, text_order, patch_order, np.zeros(0), np.zeros(0))
        expected = plan_masks(range(1, n - 1), [], draws, budgets=BUDGETS)
        assert np.flatnonzero(text[b]).tolist() == expected.text and len(expected.text) == text_budget(n - 2)
        for level in BUDGETS:
            assert patches[level][b].tolist() == expected.patches[level]
    assert not text[:, 0].any() and not text[np.arange(64), lengths - 1].any()  # never [CLS] or the last [SEP]


def test_80_10_10_within_tolerance():
    ids = torch.arange(1000, 1064).repeat(300, 1)
    positions = list(range(1, 63))
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[:, positions] = True
    replacements = torch.from_numpy(np.setdiff1d(np.arange(30522), [0, 100, 101, 102, 103]))
    counts = {"mask": 0, "random": 0, "same": 0}
    out, labels = mask_tokens(ids, chosen, torch.rand(ids.shape, generator=gen(1)),
                              torch.rand(ids.shape, generator=gen(2)), mask_token_id=103, replacements=replacements)
    assert torch.equal(labels[:, positions], ids[:, positions])
    assert (labels[:, [0, 63]] == IGNORE).all() and torch.equal(out[:, [0, 63]], ids[:, [0, 63]])
    masked = out[:, positions]
    counts["mask"] += int((masked == 103).sum())
    counts["same"] += int((masked == ids[:, positions]).sum())
    counts["random"] += int(((masked != 103) & (masked != ids[:, positions])).sum())
    assert not set(masked.flatten().tolist()) & {0, 100, 101, 102}
    total = sum(counts.values())
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.02)
    assert counts["random"] / total == pytest.approx(0.1, abs=0.015)
    assert counts["same"] / total == pytest.approx(0.1, abs=0.015)


def feats(seed: int, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 55, F, generator=gen(seed))


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_rotation_label_names_the_swapped_feature(turns):
    colour, rotated = feats(1), torch.randn(1, 3, F, generator=gen(2))
    out = rotate_patch(colour, rotated, torch.tensor([turns]))[0]
    assert torch.equal(out[0], colour[0, 0] if turns == 0 else rotated[0, turns - 1])
    assert torch.equal(out[1:], colour[0, 1:])


@pytest.mark.parametrize("label", [0, 5, 17, 23])
def test_jigsaw_label_inverts_the_shuffle(label):
    colour = feats(3)[0]
    out = jigsaw(colour[None], torch.tensor([label]))[0]
    perm = JIGSAW_PERMUTATIONS[label]
    s = level_slice(2)
    restored = torch.empty_like(out[s])
    for slot, source in enumerate(perm):
        restored[source] = out[s][slot]
    assert torch.equal(restored, colour[s])
    assert torch.equal(out[: s.start], colour[: s.start]) and torch.equal(out[s.stop:], colour[s.stop:])
    assert len(set(JIGSAW_PERMUTATIONS)) == 24


def changed(out: torch.Tensor, colour: torch.Tensor) -> list[list[int]]:
    return [(o != c).any(dim=1).nonzero().flatten().tolist() for o, c in zip(out, colour, strict=True)]


def test_camouflage_grey_blank_touch_only_their_patches():
    colour, donor, grey = feats(4, 2), torch.randn(2, F, generator=gen(5)), torch.randn(2, 16, F, generator=gen(6))
    out = camouflage(colour, donor, torch.tensor([6, -1]))
    assert changed(out, colour) == [[level_slice(3).start + 6], []] and torch.equal(out[0, 11], donor[0])
    out = grey_patches(colour, grey, torch.tensor([[0, 15], [3, -1]]))
    assert changed(out, colour) == [[14, 29], [17]]
    assert torch.equal(out[0, 29], grey[0, 15]) and torch.equal(out[1, 17], grey[1, 3])
    out = blank_patches(colour, torch.tensor([[0, 4, 24], [-1, -1, -1]]))
    assert changed(out, colour) == [[30, 34, 54], []] and out[0, 54].abs().sum() == 0


def test_corrupt_patches_in_place_is_the_five_corruptions_in_turn():
    colour, rotated, grey = feats(7, 3), torch.randn(3, 3, F, generator=gen(8)), torch.randn(3, 16, F)
    donor = torch.randn(3, F, generator=gen(9)).half()  # store precision: cast on the way in
    plan = {"turns": torch.tensor([0, 2, 3]), "permutation": torch.tensor([0, 7, 23]),
            "camouflaged": torch.tensor([2, -1, 8]), "greyed": torch.tensor([[1, 9], [4, -1], [-1, -1]]),
            "blanked": torch.tensor([[0, 3, 20], [5, 6, -1], [-1, -1, -1]])}
    expected = rotate_patch(colour, rotated, plan["turns"])
    expected = jigsaw(expected, plan["permutation"])
    expected = camouflage(expected, donor.float(), plan["camouflaged"])
    expected = grey_patches(expected, grey, plan["greyed"])
    expected = blank_patches(expected, plan["blanked"])
    out = corrupt_patches_(colour.clone(), rotated.half(), grey, donor, **plan)
    assert torch.equal(out[:, 5:], expected[:, 5:])
    torch.testing.assert_close(out[:, :5], expected[:, :5], rtol=0, atol=1e-2)  # rotated came in as float16
    assert torch.equal(out[0, 5 + 2], donor[0].float()) and torch.equal(out[0, 0], colour[0, 0])
