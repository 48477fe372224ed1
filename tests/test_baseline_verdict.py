"""The demo explains itself: the recipe line (:func:`demo_recipe`) and the verdict on the model against the frozen
baseline (:func:`baseline_verdict`, :func:`baseline_summary`), on hand-made intervals and report files."""

from __future__ import annotations

import json

from kaleido_bert.eval.baseline_report import BASELINE_FILE, BEGIN, END, baseline_section
from kaleido_bert.eval.baseline_verdict import MIN_TEST_ITEMS, baseline_summary, baseline_verdict
from kaleido_bert.workflows.demo import demo_recipe

SPANS = {"CR ACC, image only": {"diff": 2.0, "low": -3.0, "high": 7.0}}
ABOVE = {"CR ACC, image only": {"diff": 5.0, "low": 1.0, "high": 9.0},
         "SUB ACC, image only": {"diff": -4.0, "low": -8.0, "high": -0.5},
         "CR macro-F1, image only": {"diff": 1.0, "low": -1.0, "high": 3.0}}


def test_the_recipe_line_names_the_recipe_and_why():
    assert demo_recipe(None, None) == (
        "demo", "[demo] recipe: demo (the synthetic catalogue's preset; --config NAME to choose another)")
    assert demo_recipe(None, "data/shop") == (
        "real", "[demo] recipe: real (the default for your own catalogue; --config NAME to choose another)")
    assert demo_recipe("tiny", "data/shop") == ("tiny", "[demo] recipe: tiny (--config)")
    assert demo_recipe("my.yaml", None) == ("my.yaml", "[demo] recipe: my.yaml (--config)")


def test_a_small_split_is_too_small_whatever_the_intervals_say():
    small = MIN_TEST_ITEMS - 1
    assert baseline_verdict(30, SPANS) == ("the test split has 30 items: too few to tell the model from the baseline "
                                           f"(every interval spans 0; at least {MIN_TEST_ITEMS} needed)")
    assert baseline_verdict(small, ABOVE).startswith(f"the test split has {small} items: too few")
    assert "2 of 3 intervals exclude 0" in baseline_verdict(small, ABOVE)
    assert "outcome files are missing" in baseline_verdict(small, {}, split="val")
    assert baseline_verdict(small, {}, split="val").startswith("the val split")


def test_a_large_split_lets_the_intervals_decide():
    assert baseline_verdict(MIN_TEST_ITEMS, SPANS) == (
        f"the test split has {MIN_TEST_ITEMS} items and every interval spans 0: the model and the baseline cannot "
        "be told apart on it")
    assert baseline_verdict(500, ABOVE) == ("the test split has 500 items; 2 of 3 intervals exclude 0 (in bold "
                                            "above): CR ACC, image only better, SUB ACC, image only worse")
    assert "untested" in baseline_verdict(500, {})


def test_the_summary_is_the_reports_section_without_its_markers(tmp_path):
    metrics = {"cr/image/accuracy": 61.0, "sub/image/accuracy": 40.0}
    baseline = {"seeds": [0, 1], "image_pool": "mean", "text_model_from": "bert",
                "mean": {"cr/image/accuracy": 55.0, "sub/image/accuracy": 42.0},
                "std": {"cr/image/accuracy": 1.0}, "chance": {"cr/image/accuracy": 25.0}}
    assert baseline_summary(tmp_path, 10) is None  # no baseline yet
    (tmp_path / BASELINE_FILE).write_text(json.dumps(baseline))
    assert baseline_summary(tmp_path, 10) is None  # no metrics yet
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    section, verdict = baseline_summary(tmp_path, 10)
    assert section == [line for line in baseline_section(metrics, baseline) if line not in (BEGIN, END)]
    assert "| CR ACC, image only | 25.0 | 55.0 ± 1.0 | **61.0** |" in section
    assert verdict == baseline_verdict(10, {})  # no outcome files: no intervals
