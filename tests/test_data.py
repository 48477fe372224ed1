"""Pre-training dataset and collate: catalogue + store + alignments + masking → batches (paper §3.4–3.5)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.config import MaskingConfig, load_config
from kaleido_bert.data.catalogue import Item, load_catalogue
from kaleido_bert.data.synth import synthesize
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.inputs.masking import IGNORE, JIGSAW_PERMUTATIONS, MASKED_LEVELS, text_budget
from kaleido_bert.inputs.negatives import NegativePool
from kaleido_bert.inputs.pretraining import PretrainDataset, collate
from kaleido_bert.inputs.rows import RowReader, read_ahead
from kaleido_bert.patches.extraction import extract_features
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synthesize(root / "cat", products=14, seed=3, progress=False, val_fraction=0.0, test_fraction=0.0)
    extract_features(root / "cat", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    return load_catalogue(root / "cat"), FeatureStore(root / "store"), load_tokenizer()


def test_batch_shapes_and_labels(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, max_text_len=64, masking=MaskingConfig(itm_negative_ratio=0.5))
    batch = collate([ds[i] for i in range(5)])
    b, t = batch["text_ids"].shape
    assert b == 5 and t <= 64
    assert batch["patch_features"].shape == (5, 55, store.feature_size)
    assert batch["patch_positions"].shape == (5, 55, 5)
    assert batch["grey_index"].shape == (5, 2) and batch["grey_target"].shape == (5, 2, store.feature_size)
    assert batch["blank_index"].shape == (5, 3) and batch["blank_target"].shape == (5, 3, store.feature_size)
    assert set(batch["itm_label"].tolist()) <= {0, 1}
    assert ((batch["rotation_label"] >= 0) & (batch["rotation_label"] < 4)).all()
    assert ((batch["jigsaw_label"] >= 0) & (batch["jigsaw_label"] < 24)).all()
    assert ((batch["camouflage_label"] >= 0) & (batch["camouflage_label"] < 9)).all()
    # padding is not attended and carries no MLM label
    assert (batch["mlm_labels"][batch["text_mask"] == 0] == IGNORE).all()
    masked = (batch["mlm_labels"] != IGNORE).sum(dim=1)
    assert (masked >= 1).all() and (masked <= 10).all()


def test_targets_are_the_clean_colour_features(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok)
    sample = ds[2]
    clean = store[sample["id"]]["colour"]
    for k, i in enumerate(sample["blank_index"].tolist()):
        assert torch.equal(sample["blank_target"][k], clean[30 + i])
        assert sample["patch_features"][30 + i].abs().sum() == 0
    for k, i in enumerate(sample["grey_index"].tolist()):
        assert torch.equal(sample["grey_target"][k], clean[14 + i])
        assert torch.equal(sample["patch_features"][14 + i], store[sample["id"]]["grey"][i])


def test_resampled_every_epoch_but_deterministic(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, seed=1)
    first = ds[0]
    again = ds[0]
    assert torch.equal(first["text_ids"], again["text_ids"])
    assert torch.equal(first["patch_features"], again["patch_features"])
    ds.set_epoch(1)
    changed = [not torch.equal(first["patch_features"], ds[0]["patch_features"]) for _ in range(1)]
    assert any(changed)


def source_product(ds: PretrainDataset, sample: dict) -> list[str]:
    """The products whose description the sample's (unmasked) text is."""
    original = torch.where(sample["mlm_labels"] != IGNORE, sample["mlm_labels"], sample["text_ids"])
    n = len(original)
    return [p for r, p in enumerate(ds.negatives.products)
            if ds.lengths[r] == n and torch.equal(ds.tokens[r, :n], original)]


def test_negatives_come_from_the_same_subcategory(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, masking=MaskingConfig(itm_negative_ratio=1.0))
    by_product = {it.product_id: it for it in ds.items}
    for pid in ds.negatives.products:
        tier, pool = ds.negatives.group_of(pid)
        assert pool and pid not in pool
        if tier == "subcategory":
            assert {by_product[p].subcategory for p in pool} == {by_product[pid].subcategory}
    assert sum(ds.negatives.sources.values()) == len(ds.negatives.products)
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["itm_label"] == 0
        item = ds.items[index]
        tier, pool = ds.negatives.group_of(item.product_id)
        sources = source_product(ds, sample)
        assert sources and item.product_id not in sources and set(sources) & set(pool)


def test_alignments_guide_masking_of_positive_pairs(world):
    cat, store, tok = world
    item = cat.split("train")[0]
    pairs = [AlignedPair((2,), 5, 12), AlignedPair((4,), 4, 3)]
    ds = PretrainDataset(cat, store, tok, alignments={item.id: pairs}, masking=MaskingConfig(itm_negative_ratio=0.0))
    index = ds.items.index(item)
    for epoch in range(10):
        ds.set_epoch(epoch)
        s = ds[index]
        blanked = set(s["blank_index"].tolist())
        greyed = set(s["grey_index"].tolist())
        text = set((s["mlm_labels"] != IGNORE).nonzero().flatten().tolist())
        assert (2 in text) != (12 in blanked)  # exactly one side of each aligned pair
        assert (4 in text) != (3 in greyed)
    assert ds.counts()["without_alignments"] == len(ds.items) - 1


def test_missing_features_and_single_product_subcategories_are_counted(world, tmp_path):
    cat, store, tok = world
    extra_store_ids = set(store.available_ids())
    ds = PretrainDataset(cat, store, tok, split="train")
    assert ds.counts()["skipped_missing_features"] == sum(1 for it in cat.split("train") if it.id not in extra_store_ids)
    # drop all but one product of a sub-category: its negatives must come from elsewhere, and be counted
    sub = ds.items[0].subcategory
    keep = ds.items[0].product_id
    pool = NegativePool([it for it in ds.items if it.subcategory != sub or it.product_id == keep])
    assert pool.sources["category"] + pool.sources["anywhere"] >= 1
    tier, others = pool.group_of(keep)
    assert tier in ("category", "anywhere") and others and keep not in others
    assert all(it.subcategory != sub for it in ds.items if it.product_id in others)
    alone = NegativePool(ds.items[:1])  # one product: nowhere to take a negative from
    assert not alone.has_negative(np.array([0]))[0] and sum(alone.sources.values()) == 0


def aligned(ds: PretrainDataset, every: int = 2) -> dict[str, list[AlignedPair]]:
    """Valid random pairs (a word of 1–2 positions at each of the levels 3–5) for every ``every``-th item."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for it in ds.items[::every]:
        n = int(ds.lengths[ds.negatives.rank[it.product_id]])
        pairs = []
        for _ in range(3):
            start = int(torch.randint(1, n - 1, (1,), generator=g))
            tokens = tuple(range(start, min(start + 2, n - 1)))
            pairs += [AlignedPair(tokens, level, int(torch.randint(0, level * level, (1,), generator=g)))
                      for level in (3, 4, 5)]
        out[it.id] = pairs
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_a_batch_is_its_items_collated_and_each_item_is_fixed_by_seed_epoch_and_index(world):
    cat, store, tok = world
    masking = MaskingConfig(itm_negative_ratio=0.5, itm_hard_ratio=0.5)
    ds = PretrainDataset(cat, store, tok, masking=masking, seed=4)
    ds = PretrainDataset(cat, store, tok, masking=masking, seed=4, alignments=aligned(ds))
    ds.set_epoch(2)
    order = [5, 0, 9, 3, 17, 11]
    batch = ds.__getitems__(order)
    assert same(batch, collate([ds[i] for i in order], pad_id=tok.pad_token_id))
    assert collate(batch) is batch  # the DataLoader hands __getitems__' batch to the collate function
    loader = DataLoader(ds, batch_sampler=[order], collate_fn=collate)
    assert same(next(iter(loader)), batch)
    # item 9 in another batch (other neighbours, another text width) is the same sample
    other = ds.__getitems__([9, 1])
    n = int(other["text_mask"][0].sum())
    for key in batch:
        if isinstance(batch[key], torch.Tensor):
            a, b = batch[key][2], other[key][0]
            if key in ("text_ids", "mlm_labels", "text_mask"):
                a, b = a[:n], b[:n]
            assert torch.equal(a, b), key
    again = PretrainDataset(cat, store, tok, masking=masking, seed=4, alignments=aligned(ds))
    again.set_epoch(2)
    assert same(again.__getitems__(order), batch)
    again.seed = 5
    assert not same(again.__getitems__(order), batch)


@pytest.mark.parametrize("epoch", range(3))
def test_budgets_and_labels_hold_for_every_item_of_a_batch(world, epoch):
    cat, store, tok = world
    m = MaskingConfig(itm_negative_ratio=0.5, itm_hard_ratio=0.5)
    ds = PretrainDataset(cat, store, tok, masking=m)
    pairs = aligned(ds)
    ds = PretrainDataset(cat, store, tok, masking=m, alignments=pairs)
    ds.set_epoch(epoch)
    batch = ds.__getitems__(list(range(len(ds))))
    special = set(tok.all_special_ids)
    for b, item in enumerate(ds.items):
        n = int(batch["text_mask"][b].sum())
        sample = {k: v[b][:n] if k in ("text_ids", "mlm_labels") else v[b] for k, v in batch.items() if k != "ids"}
        (source,) = source_product(ds, sample)
        original = ds.tokens[ds.negatives.rank[source], :n]
        assert (batch["itm_label"][b] == 1) == (source == item.product_id)
        masked = (sample["mlm_labels"] != IGNORE).nonzero().flatten().tolist()
        guided = bool(pairs.get(item.id)) and source == item.product_id
        assert len(masked) == text_budget(n - 2) if not guided else 1 <= len(masked) <= text_budget(n - 2)
        assert all(1 <= p <= n - 2 for p in masked) and (batch["mlm_labels"][b, n:] == IGNORE).all()
        assert torch.equal(sample["mlm_labels"][masked], original[masked])
        unmasked = [p for p in range(n) if p not in masked]
        assert torch.equal(sample["text_ids"][unmasked], original[unmasked])
        assert all(t == tok.mask_token_id or t not in special for t in sample["text_ids"][masked].tolist())
        clean = store[item.id]
        features = sample["patch_features"]
        touched = {0, 1, 2, 3, 4}
        turns, perm = int(sample["rotation_label"]), int(sample["jigsaw_label"])
        assert torch.equal(features[0], clean["colour"][0] if turns == 0 else clean["rotated"][turns - 1])
        assert torch.equal(features[1:5], clean["colour"][1 + torch.tensor(JIGSAW_PERMUTATIONS[perm])])
        for level, key, budget in ((4, "grey", m.grey), (5, "blank", m.blank)):
            index = [i for i in sample[f"{key}_index"].tolist() if i != IGNORE]
            assert len(index) == len(set(index)) and (len(index) == budget if not guided else len(index) <= budget)
            start = level_slice(level).start
            for k, i in enumerate(index):
                assert torch.equal(sample[f"{key}_target"][k], clean["colour"][start + i])
                assert torch.equal(features[start + i], clean["grey"][i] if key == "grey" else torch.zeros_like(
                    features[0]))
                touched.add(start + i)
            assert (sample[f"{key}_target"][len(index):] == 0).all()
        camo = int(sample["camouflage_label"])
        if camo != IGNORE:
            patch = features[level_slice(3).start + camo]
            donors = [it for it in ds.items if it.product_id != item.product_id
                      and torch.equal(store[it.id]["colour"][level_slice(3).start + camo], patch)]
            assert donors and 0 <= camo < 9
            touched.add(level_slice(3).start + camo)
        else:
            assert guided  # a donor exists for every item here, so only an aligned pair can use up the budget
        rest = [i for i in range(55) if i not in touched]
        assert torch.equal(features[rest], clean["colour"][rest])
        assert torch.equal(sample["patch_positions"], clean["positions"])
        if guided:
            text = set(masked)
            for p in pairs[item.id]:
                index = sample[f"{MASKED_LEVELS[p.level]}_index"] if p.level > 3 else sample["camouflage_label"][None]
                assert not (set(p.tokens) & text and p.patch in index.tolist())  # never both sides


def test_negatives_are_never_the_products_own_description(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, masking=MaskingConfig(itm_negative_ratio=1.0, itm_hard_ratio=0.5))
    kinds = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        batch = ds.__getitems__(list(range(len(ds))))
        assert (batch["itm_label"] == 0).all()
        for b, item in enumerate(ds.items):
            n = int(batch["text_mask"][b].sum())
            sample = {"mlm_labels": batch["mlm_labels"][b, :n], "text_ids": batch["text_ids"][b, :n]}
            sources = source_product(ds, sample)
            assert sources and item.product_id not in sources
            _, pool = ds.negatives.group_of(item.product_id)
            kinds.add("pool" if set(sources) & set(pool) else "elsewhere")
    assert kinds == {"pool", "elsewhere"}  # itm_hard_ratio=0.5 mixes hard negatives and any-product ones


def test_clean_pairs_are_uncorrupted(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, corrupt=False, masking=MaskingConfig(itm_negative_ratio=0.5))
    batch = ds.__getitems__(list(range(8)))
    for b, item_id in enumerate(batch["ids"]):
        assert torch.equal(batch["patch_features"][b], store[item_id]["colour"])
    for key in ("mlm_labels", "rotation_label", "jigsaw_label", "camouflage_label", "grey_index", "blank_index"):
        assert (batch[key] == IGNORE).all(), key
    assert batch["grey_target"].shape == (8, 2, store.feature_size) and (batch["grey_target"] == 0).all()
    assert set(batch["itm_label"].tolist()) <= {0, 1}


def test_row_reader_reads_what_the_memory_map_holds(world):
    cat, store, tok = world
    mapped = store.arrays["features"]
    direct, fallback = RowReader(mapped), RowReader(np.array(mapped))
    assert direct.direct and not fallback.direct
    rows = np.array([3, 0, 7, 3])
    sub = np.array([5, 73, 0, 13])
    direct.prefetch(rows)
    for reader in (direct, fallback):
        assert np.array_equal(reader.read(rows), mapped[rows])
        assert np.array_equal(reader.read(rows, sub), mapped[rows, sub])
        assert reader.read(rows[:0]).shape == (0, *mapped.shape[1:])
    assert pickle.loads(pickle.dumps(direct)).read(rows[:1]).tobytes() == mapped[3].tobytes()


def test_negative_pool_tiers_and_draws():
    """Sub-category first, then category, then anywhere; a draw is uniform over the others, never the product."""
    layout = {"a": ("TOPS", "shirts"), "b": ("TOPS", "shirts"), "c": ("TOPS", "shirts"), "d": ("TOPS", "vests"),
              "e": ("SHOES", "boots")}
    items = [Item(f"{p}-v{v}", p, "x.jpg", p, p, cat, sub) for p, (cat, sub) in layout.items() for v in range(2)]
    pool = NegativePool(items)
    assert pool.products == list("abcde")
    assert pool.group_of("a") == ("subcategory", ["b", "c"]) and pool.group_of("d") == ("category", ["a", "b", "c"])
    assert pool.group_of("e") == ("anywhere", ["a", "b", "c", "d"])
    assert dict(pool.sources) == {"subcategory": 3, "category": 1, "anywhere": 1}
    products = np.repeat(np.arange(5), 3000)
    picks = np.random.default_rng(0).random(len(products))
    yes, no = np.ones(len(products), bool), np.zeros(len(products), bool)
    hard = pool.sample(products, yes, no, picks)
    easy = pool.sample(products, yes, yes, picks)
    assert np.array_equal(pool.sample(products, no, no, picks), products)
    for r, pid in enumerate(pool.products):
        _, others = pool.group_of(pid)
        drawn = np.bincount(hard[products == r], minlength=5)
        assert drawn[r] == 0 and {pool.products[i] for i in np.flatnonzero(drawn)} == set(others)
        assert drawn[drawn > 0].min() > 0.8 * 3000 / len(others)  # uniform over the group
        spread = np.bincount(easy[products == r], minlength=5)
        assert spread[r] == 0 and (np.delete(spread, r) > 0.8 * 3000 / 4).all()


def test_read_ahead_hints_the_next_batch_and_changes_nothing(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok)
    batches = [[3, 1], [0, 5], [2, 4]]
    hinted = []
    assert list(read_ahead(batches, hinted.append)) == batches and hinted == [[0, 5], [2, 4]]
    keyed = [[(1, 3), (1, 1)], [(1, 0), (1, 5)]]
    hinted.clear()
    assert list(read_ahead(keyed, hinted.append)) == keyed and hinted == [[0, 5]]
    assert list(read_ahead(iter(batches), None)) == batches
    loader = DataLoader(ds, batch_sampler=read_ahead(batches, ds.prefetch), collate_fn=collate)
    assert all(same(a, ds.__getitems__(b)) for a, b in zip(loader, batches, strict=True))
