"""The documentation's examples run as a newcomer pastes them: every ```python block of README.md and docs/*.md,
against a tiny ``kaleido demo``.

The demo run lives at ``runs/demo`` under a temporary working directory (the path the examples use), built with the
tiny preset and a few fine-tuning steps. Also checks that the run describes itself: ``kaleido evaluate runs/demo``
needs no ``--config`` nor ``--set data.…`` (it reads ``runs/demo/run.yaml``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from kaleido_bert.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
TINY_DEMO = ["--config", "tiny", "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512",
             "--set", "align.epochs=1", "--set", "finetune.max_steps=2", "--set", "finetune.caption_max_steps=2",
             "--set", "finetune.batch_size=8", "--set", "eval.caption_items=4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


EXAMPLES = [(f"{doc.relative_to(ROOT).as_posix()} python block {index}", code)
            for doc in DOCUMENTS for index, code in enumerate(python_blocks(doc.read_text()), 1)]
"""(where, code) of every ```python block of README.md and docs/*.md, in document order."""


@pytest.fixture(scope="module")
def demo_cwd(tmp_path_factory):
    """A working directory holding a finished tiny demo run at ``runs/demo`` and what it printed (``demo.out``)."""
    root = tmp_path_factory.mktemp("readme")
    before = Path.cwd()
    os.chdir(root)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["demo", "--out", "runs/demo", *TINY_DEMO]) == 0
        (root / "demo.out").write_text(printed.getvalue())
        yield root
    finally:
        os.chdir(before)


def test_the_readme_and_the_docs_have_python_examples():
    assert python_blocks(README.read_text()), "the README shows no Python example"
    assert len(EXAMPLES) >= 5 and len({where.split()[0] for where, _ in EXAMPLES}) >= 3


@pytest.mark.parametrize("where, code", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_every_python_example_runs(demo_cwd, where, code, monkeypatch, capsys):
    monkeypatch.chdir(demo_cwd)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})
    capsys.readouterr()


def test_evaluate_reads_the_run_config_of_the_run(demo_cwd, monkeypatch, capsys):
    monkeypatch.chdir(demo_cwd)
    assert main(["evaluate", "runs/demo", "--out", "runs/demo/report-again", "--no-gallery"]) == 0
    assert (demo_cwd / "runs/demo/report-again/report.md").is_file()
    capsys.readouterr()


def test_a_missing_checkpoint_path_is_named_with_the_latest_one(demo_cwd, monkeypatch):
    from kaleido_bert import KaleidoBertForPreTraining, KaleidoError

    monkeypatch.chdir(demo_cwd)
    latest = (demo_cwd / "runs/demo/pretrain/latest").read_text().strip()
    with pytest.raises(KaleidoError) as err:
        KaleidoBertForPreTraining.from_pretrained("runs/demo/pretrain/step-000300")
    assert str(err.value) == f"no checkpoint at runs/demo/pretrain/step-000300 (latest: {latest})"


def test_every_checkpoint_of_the_demo_has_a_model_card_with_its_metrics(demo_cwd):
    """`kaleido demo` ends with `kaleido card`: each part's checkpoint holds a README.md with the report's numbers."""
    import json

    import yaml

    from kaleido_bert.runs import FINETUNED_PARTS, run_parts

    run = demo_cwd / "runs/demo"
    parts = run_parts(run)
    assert set(parts) == {"pretrain", *FINETUNED_PARTS}
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for part, checkpoint in parts.items():
        front = yaml.safe_load((checkpoint / "README.md").read_text().split("---\n")[1])
        values = [m["value"] for result in front["model-index"][0]["results"] for m in result["metrics"]]
        assert values and front["library_name"] == "kaleido-bert", part
    card = (parts["category"] / "README.md").read_text()
    assert f"| {metrics['cr/image+text/accuracy']:.2f} |" in card and "Frozen baseline" in card


def test_the_demo_names_its_recipe_and_ends_with_the_baseline_comparison(demo_cwd):
    """The demo's first line names the recipe; at the end it prints the report's baseline section (intervals
    included) and says that the tiny test split cannot tell the model from the baseline."""
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.eval.baseline_report import BEGIN, END

    printed = (demo_cwd / "demo.out").read_text()
    assert printed.splitlines()[0] == "[demo] recipe: tiny (--config)"
    report = (demo_cwd / "runs/demo/report/report.md").read_text()
    section = report.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert "kaleido − baseline [95% interval]" in section and section in printed
    assert printed.index(section) > printed.index("Table 3 (classification and captioning)")
    items = len(load_catalogue(demo_cwd / "runs/demo/catalogue").split("test"))
    assert f"[demo] the test split has {items} items: too few to tell the model from the baseline (" in printed
