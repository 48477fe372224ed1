"""Per-query outcomes and the paired bootstrap of Table 4's contrasts."""

from __future__ import annotations

import numpy as np
import pytest

from kaleido_bert.data.label_scores import classification_metrics
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.bootstrap import available_metrics, load_outcomes, paired_bootstrap
from kaleido_bert.eval.metrics import rank_hits, ranked_recall


def _outcomes(rng, q: int = 37, n: int = 53, shift: float = 0.0) -> dict:
    hits = np.sort(rng.random((q, 3)), axis=1)
    gold = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < 0.6 + shift, gold, rng.integers(0, 7, n))
    return {"sample100": {"itr": np.clip(hits + shift, 0, 1).tolist(), "tir": hits[::-1].tolist()},
            "gallery": {"itr_gallery": (rng.random((q, 3)) < 0.5 + shift).astype(float).tolist()},
            "classifiers": {"sub/image+text": {"gold": gold.tolist(), "pred": pred.tolist()}}}


def test_per_query_hits_average_to_the_reported_metrics():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (11, 9)).astype(float)  # many ties
    positive = np.zeros((11, 9), dtype=bool)
    positive[:, 0] = True
    out: list = []
    means = rank_hits(scores, positive, (1, 5, 10), per_query_out=out)
    assert out[0].shape == (11, 3) and np.allclose(out[0].mean(0), [means[1], means[5], means[10]])
    ranked = [list(rng.permutation(13)) for _ in range(7)]
    positives = [{int(rng.integers(13))} for _ in range(7)]
    out = []
    recall = ranked_recall(ranked, positives, per_query_out=out)
    assert np.allclose(out[0].mean(0), [recall["R@1"], recall["R@5"], recall["R@10"]])


def test_identical_models_differ_by_zero_and_a_better_one_is_above():
    rng = np.random.default_rng(0)
    a = _outcomes(rng)
    assert set(available_metrics(a)) == {"sample100/SumR", "itr_gallery/mean_recall", "sub/image+text/accuracy",
                                         "sub/image+text/macro_f1"}
    for metric in available_metrics(a):
        same = paired_bootstrap(a, a, metric, resamples=200)
        assert same["diff"] == same["low"] == same["high"] == 0.0
    b = _outcomes(np.random.default_rng(0), shift=0.3)
    result = paired_bootstrap(a, b, "sub/image+text/accuracy", resamples=300)
    gold, pred = np.array(a["classifiers"]["sub/image+text"]["gold"]), np.array(a["classifiers"]["sub/image+text"]["pred"])
    assert result["a"] == pytest.approx(100 * np.mean(gold == pred))
    assert result["low"] <= result["diff"] <= result["high"] and result["low"] > 0
    f1 = paired_bootstrap(a, a, "sub/image+text/macro_f1", resamples=10)["a"]
    assert f1 == pytest.approx(classification_metrics(gold, pred, 7)["macro_f1"])
    sumr = paired_bootstrap(a, b, "sample100/SumR", resamples=100)
    assert sumr["a"] == pytest.approx(100 * (np.mean(a["sample100"]["itr"], 0).sum()
                                             + np.mean(a["sample100"]["tir"], 0).sum()))
    assert paired_bootstrap(a, b, "sample100/SumR", resamples=100, seed=4) == \
        paired_bootstrap(a, b, "sample100/SumR", resamples=100, seed=4)


def test_different_units_and_unknown_metrics_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(KaleidoError, match="different units"):
        paired_bootstrap(_outcomes(rng, q=5), _outcomes(rng, q=6), "sample100/SumR")
    with pytest.raises(KaleidoError, match="no bootstrap"):
        paired_bootstrap(_outcomes(rng), _outcomes(rng), "sub/image+text/recall")
    with pytest.raises(KaleidoError, match="no per-query outcomes"):
        load_outcomes(tmp_path)
    (tmp_path / "outcomes.json").write_text("{")
    with pytest.raises(KaleidoError, match="not valid JSON"):
        load_outcomes(tmp_path)


def test_a_reranked_gallery_pairs_with_a_plain_one_and_missing_keys_are_refused():
    rng = np.random.default_rng(2)
    plain = _outcomes(rng)
    model = _outcomes(np.random.default_rng(2))
    model["gallery"]["itr_gallery_rerank"] = np.ones((37, 3)).tolist()  # every query found after re-ranking
    assert "itr_gallery_rerank/mean_recall" in available_metrics(model)
    result = paired_bootstrap(plain, model, "itr_gallery/mean_recall", metric_b="itr_gallery_rerank/mean_recall",
                              resamples=200)
    expected = 100 * (1 - np.mean(plain["gallery"]["itr_gallery"]))
    assert result["b"] == 100.0 and result["diff"] == pytest.approx(expected) and result["low"] > 0
    with pytest.raises(KaleidoError, match="no 'tir_gallery' queries"):
        paired_bootstrap(plain, model, "tir_gallery/mean_recall")
    with pytest.raises(KaleidoError, match="no 'cr/image' classifier"):
        paired_bootstrap(plain, model, "cr/image/accuracy")
    plain["classifiers"]["sub/image+text"]["ids"] = [f"i{k}" for k in range(53)]
    model["classifiers"]["sub/image+text"]["ids"] = [f"i{k}" for k in range(1, 54)]
    with pytest.raises(KaleidoError, match="classified different items"):
        paired_bootstrap(plain, model, "sub/image+text/accuracy")
