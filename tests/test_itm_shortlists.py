"""ITM as a correction to ITC, trained on the probe's cross-fitted shortlists; re-ranking only where validation
chose it; presets built on another preset.

A tiny 14-product synthetic pipeline (ResNet-18 random-weight store, F = 512) for the dataset and model tests, plain
numpy probe inputs for the shortlists; odd sizes everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kaleido_bert.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"


def _probe_inputs(products: int = 41, views: int = 2, seed: int = 0):
    """Product texts (P, 13) and image features (N, 9) that a linear map explains up to noise."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(products, 13)).astype(np.float32)
    mix = rng.normal(size=(13, 9)).astype(np.float32)
    product = np.repeat(np.arange(products), views)
    images = (text[product] @ mix + 0.8 * rng.normal(size=(len(product), 9))).astype(np.float32)
    return text, images, product


def test_cross_fitted_shortlists_err_as_on_new_products_and_skip_the_same_description():
    from kaleido_bert.train.shortlists import probe_shortlists

    text, images, product = _probe_inputs()
    text[7] = text[3]  # two products with one description
    found = probe_shortlists((text, images), product, 5, seed=0)
    n, p = len(images), len(text)
    assert found.texts.shape == found.text_logits.shape == (n, 5)
    assert found.images.shape == found.image_logits.shape == (p, 5)
    assert found.positive_logits.shape == (n,)
    for i in range(n):  # never the image's own product, nor one with the same description
        mine = {product[i]} | ({3, 7} if product[i] in (3, 7) else set())
        assert not mine & set(found.texts[i].tolist())
        assert (np.diff(found.text_logits[i]) <= 1e-6).all()  # best first
    for q in range(p):
        assert not (product[found.images[q]] == q).any()
    assert not (product[found.images[3]] == 7).any() and not (product[found.images[7]] == 3).any()
    # the probe fitted on every pair ranks its own training positives higher than the cross-fitted probes do
    in_sample = probe_shortlists((text, images), product, 5, seed=0, apply_to=((text, images), product))
    assert in_sample.report["positive_mean_rank"] < found.report["positive_mean_rank"]
    assert found.report["fit"].startswith("cross-fitted")
    deep = probe_shortlists((text, images), product, 500, seed=0)
    assert deep.texts.shape[1] == p and (deep.texts[:, -1] == -1).all()  # fewer than k: -1 padding
    assert np.isneginf(deep.text_logits[:, -1]).all()


@pytest.fixture(scope="module")
def tiny(lpft_store):
    return lpft_store


def _setup(root, *extra: str):
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.train.pretrain import build_datasets, build_model, probe_inputs, set_itm_shortlists

    config = load_config("tiny", ["model.vocab_size=30522", "model.patch_feature_size=512",
                                  f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                  TASKS, "model.itc_pool=mean", "masking.itm_negatives=mined",
                                  "masking.itm_negative_ratio=0.0", "eval.rerank_k=3", *extra])
    tokenizer = load_tokenizer(config.data.tokenizer)
    train_set, val_set = build_datasets(config, tokenizer)
    model, _ = build_model(config)
    reports = set_itm_shortlists(model, train_set, val_set, config, probe_inputs(model, train_set, config,
                                                                                  progress=False), progress=False)
    return config, train_set, model, reports


def test_batches_carry_a_shortlisted_negative_of_each_kind_and_its_itc_logits(tiny):
    from kaleido_bert.patches.features import NUM_COLOUR

    _, train_set, _, reports = _setup(tiny)
    assert set(reports) <= {"train", "val"} and reports["train"]["k"] == 3
    index = list(range(9))
    batch = train_set.__getitems__(index)
    s = train_set.shortlists
    assert batch["itm_prior"].shape == (9, 3) and batch["shortlist_valid"].all()
    for b, i in enumerate(index):
        p = train_set.item_product[i]
        n = int(batch["shortlist_text_mask"][b].sum())
        drawn_text = [q for q in s.texts[i] if q >= 0 and torch.equal(train_set.tokens[q, :n],
                                                                      batch["shortlist_text_ids"][b, :n])]
        assert drawn_text, "the negative description is one of the item's shortlist"
        assert float(batch["itm_prior"][b, 0]) == pytest.approx(float(s.positive_logits[i]))
        j = list(s.texts[i]).index(drawn_text[0])
        assert float(batch["itm_prior"][b, 1]) == pytest.approx(float(s.text_logits[i, j]))
        rows = train_set.item_row[s.images[p][s.images[p] >= 0]]
        feats = torch.from_numpy(np.asarray(train_set.store.arrays["features"][rows, :NUM_COLOUR], np.float32))
        assert any(torch.equal(f, batch["shortlist_patch_features"][b]) for f in feats)
    again = train_set.__getitems__(index)  # the draws are fixed by (seed, epoch, index)
    assert torch.equal(again["itm_prior"], batch["itm_prior"])


def test_itm_starts_as_the_prior_and_learns_a_correction(tiny):
    _, train_set, model, _ = _setup(tiny)
    batch = train_set.__getitems__(list(range(10)))
    text_emb, image_emb = model.itc_embeddings(batch)
    loss, accuracy = model.itm_ranking(batch, text_emb, image_emb)
    prior = batch["itm_prior"]
    score = torch.stack([prior[:, 0], torch.cat([prior[:5, 1], prior[5:, 2]])], 1)  # ITM is zero at the start
    assert loss.item() == pytest.approx(F.cross_entropy(score, torch.zeros(10, dtype=torch.long)).item(), rel=1e-5)
    assert accuracy.item() == pytest.approx((score[:, 0] > score[:, 1]).float().mean().item())
    loss.backward()
    assert model.heads.itm.weight.grad.abs().sum() > 0  # only the zero head learns at the first step
    projection = model.bert.patch_embeddings.projections[0].weight
    assert not projection.grad.any()
    model.zero_grad()
    with torch.no_grad():
        model.heads.itm.weight.normal_()
    loss, _ = model.itm_ranking(batch, text_emb.detach(), image_emb.detach())
    loss.backward()
    assert projection.grad.abs().sum() > 0  # then the cross-encoder's own inputs learn
    assert model.heads.itc.text.weight.grad is None  # the prior is fixed: ITM does not move the dual encoder


def test_rerank_choice_decides_how_evaluation_ranks(tiny, tmp_path):
    from kaleido_bert.checkpoint import save_checkpoint
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.eval.baseline_report import shown_key
    from kaleido_bert.eval.rerank_choice import choose_rerank
    from kaleido_bert.eval.retrieval import PairScorer, build_candidates, evaluate_sample100
    from kaleido_bert.model.calibration import write_calibration
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.patches.store import FeatureStore

    config, train_set, model, _ = _setup(tiny, "eval.pair_score=itm+itc")
    with torch.no_grad():
        model.heads.itm.weight.normal_()  # a correction that is noise
    path = save_checkpoint(tmp_path, 1, model=model, run_config=config, train_state={"step": 1},
                           tokenizer=load_tokenizer(config.data.tokenizer))
    choice = choose_rerank(path, config, progress=False)
    assert choice is not None and DualEncoder.from_checkpoint(path).rerank_choice is None  # not kept yet
    write_calibration(path, config, {"rerank": choice}, {})
    assert choice["rerank"] == (choice["validation"]["reranked"] > choice["validation"]["dual_encoder"])
    encoder = DualEncoder.from_checkpoint(path)
    assert encoder.rerank == choice["rerank"] and encoder.rerank_choice == choice
    catalogue, store = load_catalogue(tiny / "catalogue"), FeatureStore(tiny / "store")
    cands = build_candidates(catalogue, set(store.available_ids()), split="train", num_queries=6, num_negatives=4)
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items), pair_score="itm+itc")
    plain = evaluate_sample100(scorer, cands, progress=False, rerank=False)["metrics"]
    assert plain["sample100/ranked_by"] == "dual encoder"
    pairs = [(q["query"], c) for q in cands["itr"] for c in q["candidates"]]
    cosine = scorer.cosines(pairs).reshape(len(cands["itr"]), -1)
    want = 100 * np.mean(1 + (cosine[:, 1:] > cosine[:, :1]).sum(1) <= 1)
    assert plain["itr_sample100/R@1"] == pytest.approx(want)
    keys = ("itr_gallery_rerank/mean_recall", "itr_gallery/mean_recall")
    metrics = {k: 1.0 for k in keys}
    assert shown_key(metrics, keys) == keys[0]
    assert shown_key({**metrics, "gallery/reranks": False}, keys) == keys[1]


def test_a_preset_built_on_another_takes_its_sections_and_overrides_them(tmp_path):
    from kaleido_bert.config import ConfigError

    demo, real = load_config("demo"), load_config("real")
    assert demo.model == real.model and demo.masking == real.masking and demo.finetune.tasks == real.finetune.tasks
    assert demo.data.synthetic_products != real.data.synthetic_products or demo.data.test_fraction != real.data.test_fraction
    assert demo.train.lr == real.train.lr and demo.train.epochs != real.train.epochs
    own = tmp_path / "mine.yaml"
    own.write_text("base: demo\ntrain:\n  lr: 0.001\n")
    mine = load_config(own)
    assert mine.train.lr == 0.001 and mine.train.epochs == demo.train.epochs and mine.model == demo.model
    own.write_text("base: nowhere\n")
    with pytest.raises(ConfigError, match="base 'nowhere' must be another preset"):
        load_config(own)
