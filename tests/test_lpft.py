"""LP-FT for the dual encoder: ITC mean pooling with a skip, the probe start, clean views, pair scores.

A tiny 14-product synthetic pipeline (ResNet-18 random-weight store, F = 512) with a pre-training model whose ITC
head pools by the mean; odd sizes everywhere (D = 32, text lengths vary).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"


def _config(root, *extra: str):
    return load_config("tiny", ["model.vocab_size=30522", "model.patch_feature_size=512",
                                f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                TASKS, "model.itc_pool=mean", *extra])


@pytest.fixture(scope="module")
def tiny(lpft_store):
    return lpft_store


def _model_and_data(root, *extra: str):
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.train.pretrain import build_datasets, build_model

    config = _config(root, *extra)
    tokenizer = load_tokenizer(config.data.tokenizer)
    train_set, _ = build_datasets(config, tokenizer)
    model, _ = build_model(config)
    return config, tokenizer, train_set, model


def test_mean_pooled_itc_reads_real_tokens_attended_patches_and_the_skip(tiny):
    from kaleido_bert.model.encoder import KaleidoBertOutput

    _, _, _, model = _model_and_data(tiny, "model.patch_levels=[2,4]")
    itc = model.heads.itc
    hidden = torch.randn(3, 1 + 55, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    text = KaleidoBertOutput(hidden=hidden[:, :5], pooled=torch.zeros(3, 32), num_text=5)
    expected = torch.stack([hidden[b, :int(mask[b].sum())].mean(0) for b in range(3)])
    assert torch.allclose(itc.text_embedding(text, mask), F.normalize(itc.text(expected), dim=-1), atol=1e-6)
    keep = model.bert.patch_embeddings.keep
    assert int(keep.sum()) == 4 + 16  # levels 2 and 4 only
    feats = torch.randn(3, 55, 512)
    image = KaleidoBertOutput(hidden=hidden, pooled=torch.zeros(3, 32), num_text=1)
    used = keep.bool()
    want = F.normalize(itc.image(hidden[:, 1:][:, used].mean(1)) + itc.skip(feats[:, used].mean(1)), dim=-1)
    assert torch.allclose(itc.image_embedding(image, feats, keep), want, atol=1e-5)


def test_pretraining_batches_carry_clean_views_and_products(tiny):
    from kaleido_bert.patches.features import NUM_COLOUR

    _, tokenizer, train_set, _ = _model_and_data(tiny)
    batch = train_set.__getitems__(list(range(7)))
    rows = train_set.item_row[:7]
    clean = torch.from_numpy(np.asarray(train_set.store.arrays["features"][rows, :NUM_COLOUR], np.float32))
    assert torch.equal(batch["clean_patch_features"], clean)
    assert not torch.equal(batch["patch_features"], clean)  # the corrupted view differs somewhere
    assert (batch["clean_text_ids"] != tokenizer.mask_token_id).all()
    masked = batch["mlm_labels"] != -100
    assert masked.any() and torch.equal(batch["clean_text_ids"][masked], batch["mlm_labels"][masked])
    assert torch.equal(batch["product"], torch.from_numpy(train_set.item_product[:7]))


def test_itc_trains_on_the_clean_views(tiny):
    _, _, train_set, model = _model_and_data(tiny)
    model.eval()
    batch = train_set.__getitems__(list(range(6)))
    text, image = model.itc_embeddings(batch)
    corrupted = {k: v for k, v in batch.items() if not k.startswith("clean_")}
    text_c, image_c = model.itc_embeddings(corrupted)
    assert not torch.allclose(image, image_c) and not torch.allclose(text, text_c)
    batch["clean_patch_features"] = batch["clean_patch_features"] + 1.0  # the clean views are what ITC reads
    assert not torch.allclose(model.itc_embeddings(batch)[1], image)
    model.train()
    out = model(train_set.__getitems__(list(range(6))))
    out.loss.backward()
    assert model.heads.itc.skip.weight.grad is not None and model.heads.itc.skip.weight.grad.abs().sum() > 0


def test_probe_start_makes_the_dual_encoder_the_probe(tiny):
    from kaleido_bert.model.dual_encoder import DualEncoder, store_patches
    from kaleido_bert.model.linear_probe import image_features, standardiser, train_projection
    from kaleido_bert.train.pretrain import probe_init

    config, tokenizer, train_set, model = _model_and_data(tiny, "train.probe_init=true")
    report = probe_init(model, train_set, config, progress=False)
    assert report["loss_after"] < report["loss_before"] and report["pairs"] == len(train_set)
    assert float(model.heads.itc.image.weight.abs().sum()) == 0.0  # the deep image map starts at zero
    # the probe refitted by hand on the same features, with the same seed, gives the same embeddings
    encoder = DualEncoder(model, tokenizer, max_text_len=config.model.max_text_len, batch_size=4)
    ids = [it.id for it in train_set.items]
    texts = {it.product_id: it.description for it in train_set.items}
    model.eval()
    with torch.no_grad():
        enc = tokenizer([texts[it.product_id] for it in train_set.items], padding=True, truncation=True,
                        max_length=config.model.max_text_len, return_tensors="pt")
        hidden = model.bert(text_ids=enc["input_ids"], text_mask=enc["attention_mask"]).hidden
        m = enc["attention_mask"][..., None].float()
        text = ((hidden * m).sum(1) / m.sum(1)).numpy()
    raw = image_features(train_set.store, ids, "mean")
    (tm, ts), (im, is_) = standardiser(text), standardiser(raw)
    probe, _ = train_projection((raw - im) / is_, (text - tm) / ts, seed=config.train.seed)
    with torch.no_grad():
        want_text = probe.embed(torch.from_numpy((text - tm) / ts).float(), "text").numpy()
        want_image = probe.embed(torch.from_numpy((raw - im) / is_).float(), "image").numpy()
    got_text = encoder.embed_texts([texts[it.product_id] for it in train_set.items])
    got_image = encoder.embed_patches(*store_patches(train_set.store, ids))
    assert np.allclose(got_text, want_text, atol=2e-4) and np.allclose(got_image, want_image, atol=2e-4)
    assert encoder.itc_scale == pytest.approx(float(probe.logit_scale.exp()), rel=1e-5)


def test_probe_start_needs_mean_pooling(tiny):
    from kaleido_bert.train.pretrain import probe_init

    config, _, train_set, model = _model_and_data(tiny, "model.itc_pool=cls")
    with pytest.raises(KaleidoError, match="itc_pool=mean"):
        probe_init(model, train_set, config, progress=False)


def test_itm_plus_itc_pair_score_is_the_log_odds_plus_the_contrastive_logit(tiny):
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches

    config, tokenizer, train_set, model = _model_and_data(tiny)
    encoder = DualEncoder(model, tokenizer, max_text_len=config.model.max_text_len, batch_size=3)
    descriptions = product_descriptions(train_set.items)
    items = train_set.items[:5]
    pairs = [(it.id, other.product_id) for it in items for other in items[:3]]
    combined = PairScorer(encoder, train_set.store, descriptions, pair_score="itm+itc").itm_logits(pairs, progress=False)
    plain = PairScorer(encoder, train_set.store, descriptions).itm_logits(pairs, progress=False)
    feats, pos = store_patches(train_set.store, [i for i, _ in pairs])
    texts = [descriptions[p] for _, p in pairs]
    model.eval()
    with torch.no_grad():
        ids, mask = encoder.tokenize(texts)
        logits = model.heads.itm(model.bert(text_ids=ids, text_mask=mask, patch_features=feats,
                                            patch_positions=pos).pooled).double()
    cosine = (encoder.embed_texts(texts) * encoder.embed_patches(feats, pos)).sum(1)
    want = (logits[:, 1] - logits[:, 0]).numpy() + encoder.itc_scale * cosine
    assert np.allclose(combined, want, atol=1e-4)
    assert np.allclose(plain, logits[:, 1].numpy(), atol=1e-5)


def test_new_fields_are_validated_and_the_real_preset_uses_them():
    from kaleido_bert.config import ConfigError
    from kaleido_bert.workflows.stages import finetune_jobs

    for bad in ("model.itc_pool=max", "eval.pair_score=itc", "finetune.head=deep", "finetune.tasks=['rerank']"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config("tiny", [bad])
    real = load_config("real")
    assert real.model.itc_pool == "mean" and real.train.probe_init and real.finetune.probe
    assert real.eval.pair_score == "itm+itc" and real.eval.caption_retrieval_k > 0
    assert finetune_jobs(real) == [("caption", False), ("category", False), ("category", True),
                                   ("subcategory", False), ("subcategory", True)]
    assert [t for t, _ in finetune_jobs(load_config("tiny"))][:2] == ["retrieval", "caption"]


def test_demo_on_a_catalogue_runs_the_lpft_recipe_end_to_end(tiny, tmp_path):
    """`kaleido demo --catalogue` with the `real` recipe's switches on the tiny model: probe-started ITC, probe-started
    wide classifiers, no retrieval/caption fine-tune, captions by retrieval, the ITM+ITC pair score, the dual
    encoder's frozen member chosen on validation and the baseline column; outcomes for the bootstrap."""
    import json
    import shutil

    from kaleido_bert.cli import main
    from kaleido_bert.eval.bootstrap import available_metrics, load_outcomes
    from kaleido_bert.runs import resolve_checkpoint

    real = load_config("real")
    switches = {"model.itc_pool": real.model.itc_pool, "train.probe_init": str(real.train.probe_init).lower(),
                "finetune.head": real.finetune.head, "finetune.probe": str(real.finetune.probe).lower(),
                "finetune.sentence": str(real.finetune.sentence).lower(),
                "finetune.probe_c": "[" + ",".join(map(str, real.finetune.probe_c)) + "]",
                "finetune.tasks": "['subcategory']", "finetune.inputs": "['image+text','image']",
                "eval.pair_score": real.eval.pair_score, "eval.caption_retrieval_k": "3",
                "eval.caption_retrieval_grid": "[1,3]",
                "eval.query_bank_betas": "[" + ",".join(f"{b:g}" for b in real.eval.query_bank_betas) + "]",
                "masking.itm_negatives": "mined", "eval.baseline_seeds": "[0]",
                "masking.itm_negative_ratio": str(real.masking.itm_negative_ratio),
                "train.probe_mix": "[" + ",".join(map(str, real.train.probe_mix)) + "]"}
    args = ["demo", "--catalogue", str(tiny / "catalogue"), "--out", str(tmp_path / "run"), "--config", "tiny",
            "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512", "--set", TASKS, "--set", "align.epochs=1", "--set", "finetune.max_steps=2",
            "--set", "finetune.batch_size=8", "--set", "eval.caption_items=4", "--set", "eval.num_queries=5",
            *[a for k, v in switches.items() for a in ("--set", f"{k}={v}")]]
    assert main(args) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "finetune").iterdir()) == ["subcategory", "subcategory-image"]
    for name in ("subcategory", "subcategory-image"):
        probe = json.loads((run / "finetune" / name / "probe.json").read_text())
        assert 0 <= probe["val_accuracy"] <= 1 and probe["c"] in real.finetune.probe_c
        assert [g["c"] for g in probe["grid"]] == real.finetune.probe_c
        config = json.loads((resolve_checkpoint(run / "finetune" / name) / "config.json").read_text())
        assert ("classifier_sentence" in config) == (name == "subcategory")  # image only: no text to embed
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert "sample100/SumR" in metrics and "sub/image/accuracy" in metrics and "sub/image+text/accuracy" in metrics
    member = json.loads((resolve_checkpoint(run / "pretrain") / "itc_member.json").read_text())  # WiSE-FT
    assert [g["mix"] for g in member["grid"]] == real.train.probe_mix and member["mix"] in real.train.probe_mix
    assert metrics.get("dual_encoder/member_mix", 1.0) == member["mix"]
    record = json.loads((resolve_checkpoint(run / "pretrain") / "calibration.json").read_text())  # on validation
    choice = record["rerank"]
    assert choice["rerank"] == (choice["validation"]["reranked"] > choice["validation"]["dual_encoder"])
    assert metrics["gallery/reranks"] == choice["rerank"]
    assert metrics["sample100/ranked_by"].startswith("itm+itc" if choice["rerank"] else "dual encoder")
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    assert summary["itm_shortlists"]["train"]["fit"].startswith("cross-fitted")
    bank = record["query_bank"]  # gallery search
    assert [g["beta"] for g in bank["grid"]] == real.eval.query_bank_betas and bank["mix"] == member["mix"]
    assert metrics["gallery/query_bank_beta"] == bank["beta"]
    if shutil.which("java"):
        assert "fc/consensus/sum_cap" in metrics and "fc/nearest/sum_cap" in metrics
        chosen = record["caption_k"]
        assert [g["k"] for g in chosen["grid"]] == [1, 3] and metrics["fc/consensus/k"] == chosen["k"]
    report = (run / "report" / "report.md").read_text()
    assert "frozen dual-encoder baseline" in report
    assert {"sample100/SumR", "sub/image/accuracy"} <= set(available_metrics(load_outcomes(run / "report")))


def test_the_probe_that_starts_an_itc_head_takes_the_heads_width():
    """An ITC head of an odd width (7, not the probe's default 256) is started from a probe of that width: its
    text map is the probe's with the standardisation folded in, and its deep image map starts at zero."""
    from kaleido_bert.model.heads import ContrastiveHead
    from kaleido_bert.model.linear_probe import BaselineSettings, init_itc_from_probe

    rng = np.random.default_rng(3)
    text, images = rng.normal(2.0, 3.0, (40, 9)).astype(np.float32), rng.normal(size=(40, 11)).astype(np.float32)
    head = ContrastiveHead(9, dim=7, pool="mean", feature_size=11)
    history = init_itc_from_probe(head, text, images, seed=0, settings=BaselineSettings(epochs=1, batch_size=16))
    assert history["pairs"] == 40 and head.text.weight.shape == (7, 9)
    assert float(head.image.weight.abs().sum()) == 0.0
    before = head.text.weight.detach().clone()
    init_itc_from_probe(head, text, images, seed=1, settings=BaselineSettings(dim=256, epochs=1, batch_size=16))
    assert head.text.weight.shape == (7, 9) and not torch.equal(head.text.weight, before)  # a 256 asked: still 7
