"""Alignment-guided masking and the five patch corruptions (paper §3.4–3.5)."""

from __future__ import annotations

import pytest
import torch

from kaleido_bert.inputs.masking import (
    IGNORE,
    JIGSAW_PERMUTATIONS,
    AlignedPair,
    MaskPlan,
    blank_patches,
    camouflage,
    corrupt_patches,
    grey_patches,
    jigsaw,
    mask_text,
    plan_masks,
    rotate_patch,
    text_budget,
)
from kaleido_bert.patches.grid import level_slice

BUDGETS = {3: 1, 4: 2, 5: 3}
F = 11


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
    plan = plan_masks(candidates, pairs, budgets=BUDGETS, generator=gen(seed))
    assert len(plan.text) == len(set(plan.text)) <= text_budget(n_tokens)
    assert set(plan.text) <= set(candidates)
    for level, budget in BUDGETS.items():
        chosen = plan.patches[level]
        assert len(chosen) == len(set(chosen)) == budget  # plenty of free patches: the budget is always met
        assert all(0 <= p < level * level for p in chosen)
    for pair in pairs:
        text_masked = bool(set(pair.tokens) & set(plan.text))
        patch_masked = pair.patch in plan.patches[pair.level]
        assert not (text_masked and patch_masked), pair


def test_without_pairs_the_text_budget_is_filled():
    plan = plan_masks(list(range(1, 41)), [], budgets=BUDGETS, generator=gen())
    assert len(plan.text) == text_budget(40) == 6


def test_aligned_pairs_are_used_first():
    candidates = list(range(1, 31))
    pairs = [AlignedPair((3,), 5, 7), AlignedPair((9, 10), 4, 2), AlignedPair((12,), 3, 4)]
    hits = 0
    for seed in range(50):
        plan = plan_masks(candidates, pairs, budgets=BUDGETS, generator=gen(seed))
        for p in pairs:
            hits += bool(set(p.tokens) & set(plan.text)) or p.patch in plan.patches[p.level]
    assert hits == 150  # every pair has one side masked in every draw
    # both sides get chosen over many draws
    sides = {"text": 0, "patch": 0}
    for seed in range(50):
        plan = plan_masks(candidates, pairs[:1], budgets=BUDGETS, generator=gen(seed))
        sides["text" if 3 in plan.text else "patch"] += 1
    assert sides["text"] > 10 and sides["patch"] > 10


def test_random_strategy_ignores_alignments():
    candidates = list(range(1, 31))
    pairs = [AlignedPair((3,), 5, 7)]
    with_pair = sum(3 in plan_masks(candidates, pairs, budgets=BUDGETS, use_alignments=False, generator=gen(s)).text
                    for s in range(200))
    # 4 of 30 tokens are masked at random: about 13%, far from the ~50% of alignment-guided masking
    assert 10 < with_pair < 50


def test_description_shorter_than_the_budget():
    plan = plan_masks([1], [AlignedPair((1,), 3, 0)], budgets=BUDGETS, generator=gen())
    assert len(plan.text) <= 1 and len(plan.patches[3]) == 1
    assert plan_masks([], [], budgets=BUDGETS, generator=gen()).text == []


def test_same_seed_same_plan_and_different_seed_differs():
    candidates = list(range(1, 50))
    pairs = random_pairs(gen(7), 49, 8)
    a = plan_masks(candidates, pairs, budgets=BUDGETS, generator=gen(3))
    b = plan_masks(candidates, pairs, budgets=BUDGETS, generator=gen(3))
    assert a == b
    assert any(plan_masks(candidates, pairs, budgets=BUDGETS, generator=gen(s)) != a for s in range(4, 10))


def test_80_10_10_within_tolerance():
    ids = torch.arange(1000, 1064)
    positions = list(range(1, 63))
    counts = {"mask": 0, "random": 0, "same": 0}
    for seed in range(300):
        out, labels = mask_text(ids, positions, mask_token_id=103, vocab_size=30522, special_ids={0, 100, 101, 102, 103},
                                generator=gen(seed))
        assert torch.equal(labels[positions], ids[positions])
        assert (labels[[0, 63]] == IGNORE).all() and out[0] == ids[0] and out[63] == ids[63]
        masked = out[positions]
        counts["mask"] += int((masked == 103).sum())
        counts["same"] += int((masked == ids[positions]).sum())
        counts["random"] += int(((masked != 103) & (masked != ids[positions])).sum())
        assert not set(masked.tolist()) & {0, 100, 101, 102}
    total = sum(counts.values())
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.02)
    assert counts["random"] / total == pytest.approx(0.1, abs=0.015)
    assert counts["same"] / total == pytest.approx(0.1, abs=0.015)


def feats(seed: int) -> torch.Tensor:
    return torch.randn(55, F, generator=gen(seed))


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_rotation_label_names_the_swapped_feature(turns):
    colour, rotated = feats(1), torch.randn(3, F, generator=gen(2))
    out = rotate_patch(colour, rotated, turns)
    assert torch.equal(out[0], colour[0] if turns == 0 else rotated[turns - 1])
    assert torch.equal(out[1:], colour[1:])


@pytest.mark.parametrize("label", [0, 5, 17, 23])
def test_jigsaw_label_inverts_the_shuffle(label):
    colour = feats(3)
    out = jigsaw(colour, label)
    perm = JIGSAW_PERMUTATIONS[label]
    s = level_slice(2)
    restored = torch.empty_like(out[s])
    for slot, source in enumerate(perm):
        restored[source] = out[s][slot]
    assert torch.equal(restored, colour[s])
    assert torch.equal(out[: s.start], colour[: s.start]) and torch.equal(out[s.stop:], colour[s.stop:])
    assert len(set(JIGSAW_PERMUTATIONS)) == 24


def test_camouflage_grey_blank_touch_only_their_patches():
    colour, donor, grey = feats(4), feats(5), torch.randn(16, F, generator=gen(6))
    out = camouflage(colour, donor, 6)
    changed = (out != colour).any(dim=1).nonzero().flatten().tolist()
    assert changed == [level_slice(3).start + 6] and torch.equal(out[11], donor[11])
    out = grey_patches(colour, grey, [0, 15])
    assert (out != colour).any(dim=1).nonzero().flatten().tolist() == [14, 29]
    assert torch.equal(out[29], grey[15])
    out = blank_patches(colour, [0, 4, 24])
    assert (out != colour).any(dim=1).nonzero().flatten().tolist() == [30, 34, 54] and out[54].abs().sum() == 0


def test_corrupt_patches_labels_invert_the_corruption():
    colour, rotated, grey, donor = feats(7), torch.randn(3, F, generator=gen(8)), torch.randn(16, F), feats(9)
    plan = MaskPlan(text=[], patches={3: [2], 4: [1, 9], 5: [0, 3, 20]})
    out, labels = corrupt_patches(colour, rotated, grey, donor, plan, generator=gen(10))
    assert labels["camouflage"] == 2 and torch.equal(out[level_slice(3).start + 2], donor[level_slice(3).start + 2])
    turns = int(labels["rotation"])
    assert torch.equal(out[0], colour[0] if turns == 0 else rotated[turns - 1])
    no_donor, labels = corrupt_patches(colour, rotated, grey, None, plan, generator=gen(10))
    assert labels["camouflage"] == IGNORE
