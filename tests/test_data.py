"""Pre-training dataset and collate: catalogue + store + alignments + masking → batches (paper §3.4–3.5)."""

from __future__ import annotations

import pytest
import torch

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.config import MaskingConfig, load_config
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.data.synth import synthesize
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.inputs.masking import IGNORE
from kaleido_bert.inputs.pretraining import PretrainDataset, collate
from kaleido_bert.patches.extraction import extract_features
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


def test_negatives_come_from_the_same_subcategory(world):
    cat, store, tok = world
    ds = PretrainDataset(cat, store, tok, masking=MaskingConfig(itm_negative_ratio=1.0))
    by_product = {it.product_id: it for it in ds.items}
    for pid, pool in ds.negative_pool.items():
        source_sub = {by_product[p].subcategory for p in pool}
        if ds.product_of[pid].subcategory in source_sub:
            assert source_sub == {ds.product_of[pid].subcategory} and pid not in pool
    assert sum(ds.negative_sources.values()) == len(ds.product_of)
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["itm_label"] == 0
        original = torch.where(sample["mlm_labels"] != IGNORE, sample["mlm_labels"], sample["text_ids"])
        sources = [p for p, ids in ds.text_ids.items() if torch.equal(ids, original)]
        item = ds.items[index]
        assert sources and item.product_id not in sources
        assert any(ds.product_of[p].subcategory == item.subcategory for p in sources) or \
            ds.negative_pool[item.product_id][0] not in {it.product_id for it in ds.items
                                                         if it.subcategory == item.subcategory}


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
    ds.items = [it for it in ds.items if it.subcategory != sub or it.product_id == keep]
    ds._index_negatives()
    assert ds.negative_sources["category"] + ds.negative_sources["anywhere"] >= 1
    assert all(ds.product_of[p].subcategory != sub for p in ds.negative_pool[keep])
