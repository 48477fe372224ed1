"""Metric definitions of the evaluation protocols (SPEC §4) against brute-force and hand-written references."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from kaleido_bert.data.label_scores import classification_metrics
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval import caption_metrics as caption_metrics_module
from kaleido_bert.eval import metrics as metrics
from kaleido_bert.eval.caption_metrics import CaptionScorer, caption_metrics, ptb_tokenize
from kaleido_bert.eval.metrics import (
    expected_rank_chance,
    gallery_recall,
    rank_hits,
    sum_cls,
    sum_r,
)

# ------------------------------------------------------------------------------------------------ rank_hits


def _documented_rule(scores: np.ndarray, positive: np.ndarray, ks) -> dict[int, float]:
    """Plain-loop reference of the documented rule: the best positive sits uniformly in its tie group."""
    out = {}
    for k in ks:
        total = 0.0
        for row, pos in zip(scores.tolist(), positive.tolist(), strict=True):
            best = max(s for s, p in zip(row, pos, strict=True) if p)
            higher = sum(1 for s in row if s > best)
            tied_others = sum(1 for s in row if s == best) - 1
            slots = tied_others + 1
            total += sum(1 for j in range(slots) if higher + 1 + j <= k) / slots
        out[k] = total / len(scores)
    return out


def _enumerated(scores: np.ndarray, positive: np.ndarray, ks) -> dict[int, float]:
    """Exact expectation over every tie-breaking order: P(some positive in the top K), all C! orders."""
    q, c = scores.shape
    out = {k: 0.0 for k in ks}
    for row, pos in zip(scores.tolist(), positive.tolist(), strict=True):
        hits = {k: 0 for k in ks}
        perms = list(itertools.permutations(range(c)))
        for perm in perms:
            order = sorted(range(c), key=lambda j, perm=perm, row=row: (-row[j], perm[j]))
            first = min(order.index(j) for j in range(c) if pos[j]) + 1
            for k in ks:
                hits[k] += first <= k
        for k in ks:
            out[k] += hits[k] / len(perms)
    return {k: v / q for k, v in out.items()}


def test_rank_hits_matches_plain_loop_reference_with_ties_and_several_positives():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(50, 13)).astype(float)  # four values over 13 candidates: many ties
    positive = rng.random((50, 13)) < 0.15
    positive[np.arange(50), rng.integers(0, 13, size=50)] = True
    ks = (1, 2, 5, 10, 13)
    got = rank_hits(scores, positive, ks)
    ref = _documented_rule(scores, positive, ks)
    assert set(got) == set(ks)
    for k in ks:
        assert got[k] == pytest.approx(ref[k], abs=1e-12)
        assert isinstance(got[k], float)
    assert got[13] == 1.0


def test_rank_hits_exact_under_random_tie_breaking_for_one_positive_and_conservative_for_several():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, size=(12, 6)).astype(float)
    ks = (1, 2, 3, 5)
    one = np.zeros((12, 6), dtype=bool)
    one[np.arange(12), rng.integers(0, 6, size=12)] = True
    got, exact = rank_hits(scores, one, ks), _enumerated(scores, one, ks)
    for k in ks:
        assert got[k] == pytest.approx(exact[k], abs=1e-12)

    several = one | (rng.random((12, 6)) < 0.3)
    got, exact = rank_hits(scores, several, ks), _enumerated(scores, several, ks)
    assert any(got[k] < exact[k] - 1e-9 for k in ks)  # the tied-positives case does occur here
    for k in ks:
        assert got[k] <= exact[k] + 1e-12


def test_rank_hits_hand_cases():
    assert rank_hits([[0.9, 0.1, 0.5]], [[True, False, False]], ks=(1,)) == {1: 1.0}
    assert rank_hits(np.ones((1, 4)), [[False, True, False, False]], ks=(1, 2, 5)) == {
        1: 0.25,
        2: 0.5,
        5: 1.0,
    }
    # last of 101 strictly ordered candidates: never in the top 10; 0/1 integers work as the positive mask
    scores = np.arange(101, dtype=float)[None, ::-1]
    pos = np.zeros((1, 101), dtype=int)
    pos[0, -1] = 1
    assert rank_hits(scores, pos) == {1: 0.0, 5: 0.0, 10: 0.0}
    # second of two queries: 3 above, tied with 1 other -> P(rank<=5) = (5-3)/2 = 1
    two = rank_hits([[5, 1, 1, 1], [9, 8, 7, 6]], [[1, 0, 0, 0], [0, 0, 0, 1]], ks=(1, 4))
    assert two == {1: 0.5, 4: 1.0}
    # -inf is an ordinary (lowest) score
    assert rank_hits([[-np.inf, 0.0, -np.inf]], [[True, False, False]], ks=(1, 2, 3)) == {
        1: 0.0,
        2: 0.5,
        3: 1.0,
    }


def test_rank_hits_vectorised_and_chunked(monkeypatch):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 50, size=(1000, 10_000)).astype(np.float32)
    positive = np.zeros(scores.shape, dtype=bool)
    positive[:, 0] = True
    whole = rank_hits(scores, positive)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 3 * 10_000 + 7)  # 3 rows per chunk, a ragged last chunk
    assert rank_hits(scores, positive) == pytest.approx(whole, abs=1e-12)


def test_rank_hits_tie_rule_is_unbiased():
    # averaged over which candidate is the positive, the expected-rank rule gives exactly chance K / C
    scores = np.random.default_rng(6).integers(0, 5, size=(20, 50)).astype(float)
    for k in (1, 5, 10):
        mean = np.mean([rank_hits(scores, np.eye(50, dtype=bool)[[j] * 20], ks=(k,))[k] for j in range(50)])
        assert mean == pytest.approx(expected_rank_chance(50, k), abs=1e-12)


def test_rank_hits_bad_input():
    with pytest.raises(KaleidoError, match=r"positive has shape \(2, 3\) but scores has shape \(2, 4\)"):
        rank_hits(np.zeros((2, 4)), np.ones((2, 3), dtype=bool))
    with pytest.raises(KaleidoError, match="query 1 has no positive"):
        rank_hits(np.zeros((3, 4)), [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(KaleidoError, match="query 0 contain NaN"):
        rank_hits([[np.nan, 1.0]], [[True, False]])
    with pytest.raises(KaleidoError, match="K=0"):
        rank_hits([[1.0, 0.0]], [[True, False]], ks=(0,))
    with pytest.raises(KaleidoError, match="matrix"):
        rank_hits([1.0, 0.0], [True, False])
    with pytest.raises(KaleidoError, match="boolean"):
        rank_hits([[1.0, 0.0]], [[0.5, 0.0]])


# ------------------------------------------------------------------------------------------- gallery_recall


def test_gallery_recall_matches_brute_force():
    rng = np.random.default_rng(4)
    q, g = 40, 30
    sim = rng.standard_normal((q, g))  # continuous: no ties
    positives = [set(rng.choice(g, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(q)]
    got = gallery_recall(sim, positives)
    assert list(got) == ["R@1", "R@5", "R@10", "mean_recall"]
    for k in (1, 5, 10):
        hits = 0
        for i in range(q):
            top = np.argsort(-sim[i])[:k]
            hits += any(int(j) in positives[i] for j in top)
        assert got[f"R@{k}"] == pytest.approx(hits / q, abs=1e-12)
    assert got["mean_recall"] == pytest.approx((got["R@1"] + got["R@5"] + got["R@10"]) / 3)
    custom = gallery_recall(sim, [sorted(p) for p in positives], ks=(1, 3))
    assert list(custom) == ["R@1", "R@3", "mean_recall"]
    assert custom["R@1"] == got["R@1"]


def test_gallery_recall_bad_input():
    sim = np.zeros((2, 3))
    with pytest.raises(KaleidoError, match="positives has 1 entries but similarity has 2"):
        gallery_recall(sim, [{0}])
    with pytest.raises(KaleidoError, match="query 1 has no positive"):
        gallery_recall(sim, [{0}, set()])
    with pytest.raises(KaleidoError, match=r"query 0 has gallery index 3 outside \[0, 3\)"):
        gallery_recall(sim, [{3}, {0}])


def test_sum_r_and_chance():
    itr = {1: 0.5, 5: 0.7, 10: 0.9}
    tir = {1: 0.25, 5: 0.5, 10: 0.75}
    assert sum_r(itr, tir) == pytest.approx(360.0)
    with pytest.raises(KaleidoError, match="tir lacks R@10"):
        sum_r(itr, {1: 0.1, 5: 0.2})
    assert expected_rank_chance(101, 1) == pytest.approx(1 / 101)
    assert expected_rank_chance(101, 10) == pytest.approx(10 / 101)
    assert expected_rank_chance(4, 10) == 1.0
    with pytest.raises(KaleidoError):
        expected_rank_chance(0, 1)


# ------------------------------------------------------------------------------------------- classification


def _macro_f1_by_hand(y_true, y_pred, num_labels):
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / num_labels


def test_classification_metrics_counts_absent_classes_as_zero():
    y = [0, 1, 2, 2, 1, 0]
    assert classification_metrics(y, y, num_labels=5) == {"accuracy": 1.0, "macro_f1": pytest.approx(3 / 5)}
    rng = np.random.default_rng(5)
    yt = rng.integers(0, 7, size=200)
    yp = np.where(rng.random(200) < 0.6, yt, rng.integers(0, 9, size=200))
    got = classification_metrics(yt, yp, num_labels=10)
    assert got["accuracy"] == pytest.approx(float(np.mean(yt == yp)))
    assert got["macro_f1"] == pytest.approx(_macro_f1_by_hand(yt.tolist(), yp.tolist(), 10), abs=1e-12)
    assert all(isinstance(v, float) for v in got.values())


def test_classification_metrics_bad_input():
    with pytest.raises(KaleidoError, match=r"y_pred\[3\] = 7 is outside the label map \[0, 5\)"):
        classification_metrics([0, 1, 2, 3], [0, 1, 2, 7], num_labels=5)
    with pytest.raises(KaleidoError, match=r"y_true\[0\] = -1"):
        classification_metrics([-1, 1], [0, 1], num_labels=5)
    with pytest.raises(KaleidoError, match="y_true has 2 labels but y_pred has 3"):
        classification_metrics([0, 1], [0, 1, 1], num_labels=5)
    with pytest.raises(KaleidoError, match="integer"):
        classification_metrics([0.5, 1], [0, 1], num_labels=5)


def test_sum_cls():
    cat = {"accuracy": 0.8, "macro_f1": 0.6}
    sub = {"accuracy": 0.5, "macro_f1": 0.25}
    assert sum_cls(cat, sub) == pytest.approx(215.0)
    with pytest.raises(KaleidoError, match="subcategory metrics lack 'macro_f1'"):
        sum_cls(cat, {"accuracy": 0.5})


# ----------------------------------------------------------------------------------------------- captioning

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="caption metrics need Java (pycocoevalcap)"
)

REFS = {
    "p1": ["A red cotton dress with short sleeves and a round neck."],
    "p2": ["Slim-fit blue denim jeans, five pockets and a zip fly."],
    "p3": ["Black leather ankle boots with a block heel."],
    "p4": ["White linen shirt, long sleeves, button-down collar."],
}


@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("pycocoevalcap", reason="caption metrics need the [metrics] extra")
    if shutil.which("java") is None:
        pytest.skip("caption metrics need Java (pycocoevalcap)")
    with CaptionScorer() as s:  # one METEOR process (its start-up takes seconds) for the whole module
        yield s


@needs_java
def test_ptb_tokenize_lowercases_and_drops_punctuation_like_coco():
    pytest.importorskip("pycocoevalcap", reason="caption metrics need the [metrics] extra")
    got = ptb_tokenize(
        {"a": ["Black T-shirt, slim-fit.", "", "Don't   STOP!\nNow (really)"], "b": [], "c": ["..."]}
    )
    assert got == {
        "a": ["black t-shirt slim-fit", "", "do n't stop now -lrb- really -rrb-"],
        "b": [],
        "c": [""],
    }


@needs_java
def test_caption_metrics_identical_and_unrelated(scorer):
    same = caption_metrics(REFS, {k: v[0] for k, v in REFS.items()}, scorer=scorer)
    assert list(same) == ["bleu4", "meteor", "rouge_l", "cider", "sum_cap"]
    assert same["bleu4"] > 99
    assert same["rouge_l"] > 99
    assert same["meteor"] > 90
    assert same["cider"] > 100
    assert same["sum_cap"] == pytest.approx(same["bleu4"] + same["meteor"] + same["rouge_l"] + same["cider"])

    other = {k: "quantum physics lecture on tuesday morning" for k in REFS}
    far = caption_metrics(REFS, other, scorer=scorer)
    assert far["bleu4"] < 1
    assert far["rouge_l"] < 1
    assert far["cider"] < 1
    assert far["meteor"] < 5


@needs_java
def test_caption_metrics_ignore_case_and_punctuation(scorer):
    raw = caption_metrics({"a": ["Red Dress."]}, {"a": "red dress"}, scorer=scorer)
    clean = caption_metrics({"a": ["red dress"]}, {"a": "red dress"}, scorer=scorer)
    assert raw == pytest.approx(clean)
    refs = {k: v for k, v in REFS.items()}
    hyps = {
        "p1": "A RED dress, with SHORT sleeves!",
        "p2": "Blue jeans.",
        "p3": "Black boots",
        "p4": "A shirt",
    }
    lowered = {k: v.lower().replace(",", "").replace(".", "").replace("!", "") for k, v in hyps.items()}
    assert caption_metrics(refs, hyps, scorer=scorer) == pytest.approx(
        caption_metrics(refs, lowered, scorer=scorer)
    )


@needs_java
def test_caption_metrics_empty_hypothesis_scores_low_without_crashing(scorer):
    hyps = {k: v[0] for k, v in REFS.items()}
    hyps["p1"], hyps["p3"] = "", "..."
    got = caption_metrics(REFS, hyps, scorer=scorer)
    assert all(np.isfinite(v) for v in got.values())
    full = caption_metrics(REFS, {k: v[0] for k, v in REFS.items()}, scorer=scorer)
    assert got["rouge_l"] == pytest.approx(50.0, abs=1)  # two of four captions perfect, two share no word
    assert got["sum_cap"] < full["sum_cap"]


def test_caption_metrics_bad_ids_name_the_id():
    with pytest.raises(KaleidoError, match="hypothesis missing for id 'p2'"):
        caption_metrics({"p1": ["a"], "p2": ["b"]}, {"p1": "a"})
    with pytest.raises(KaleidoError, match="references missing for id 'zz'"):
        caption_metrics({"p1": ["a"]}, {"p1": "a", "zz": "b"})


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(caption_metrics_module.shutil, "which", lambda name: None)
    with pytest.raises(KaleidoError, match="apt install default-jre-headless"):
        caption_metrics({"p1": ["a"]}, {"p1": "a"})
    with pytest.raises(KaleidoError, match="need Java"):
        ptb_tokenize({"p1": ["a"]})


@needs_java
def test_caption_metrics_closes_its_meteor_process(monkeypatch):
    pytest.importorskip("pycocoevalcap", reason="caption metrics need the [metrics] extra")
    seen = []

    def fake_score(self, references, hypotheses):  # skip METEOR's slow table load; keep the real process
        seen.append((self, self._meteor.meteor_p))
        return {"bleu4": 0.0}

    monkeypatch.setattr(CaptionScorer, "score", fake_score)
    assert caption_metrics({"p1": ["a"]}, {"p1": "a"}) == {"bleu4": 0.0}
    ((own, proc),) = seen
    assert proc.poll() is not None  # the Java process has ended
    assert own._meteor is None
    own.close()  # idempotent
    monkeypatch.undo()
    with pytest.raises(KaleidoError, match="closed"):
        own.score({"p1": ["a"]}, {"p1": "a"})
