"""Refusals before the first stage: ``kaleido demo`` writing into the user's data or on a catalogue smaller than one
batch, and every command that reads a run given a path that does not exist (CLI end to end, one line, exit 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.train.loop import full_batches
from kaleido_bert.workflows.demo import check_batches


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, *fragments: str) -> str:
    """The one line of stderr, an ``error:`` naming every fragment (no traceback)."""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def catalogue(catalogue_root, tmp_path) -> Path:
    """A copy of the 12-product synthetic catalogue (27 training images), free to be written into by mistake."""
    return Path(shutil.copytree(catalogue_root, tmp_path / "catalogue"))


# ---------------------------------------------------------------------------------------------- the train split
def test_full_batches_counts_steps_and_names_a_batch_size_that_fits():
    assert full_batches(64, 32) == 2 and full_batches(33, 32) == 1
    with pytest.raises(KaleidoError) as err:
        full_batches(20, 32)
    assert str(err.value) == "the train split has 20 pairs, fewer than train.batch_size=32: --set train.batch_size=20 fits"
    with pytest.raises(KaleidoError, match=r"finetune\.batch_size=32: --set finetune\.batch_size=18 fits"):
        full_batches(20, 32, multiple=6, key="finetune.batch_size")  # a multiple of grad_accum × processes
    with pytest.raises(KaleidoError, match="has 0 pairs.*no batch size fits"):
        full_batches(0, 4)


def test_a_catalogue_smaller_than_a_batch_is_refused_before_anything_is_written(catalogue, tmp_path, capsys):
    before = _snapshot(catalogue)
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "demo", "--catalogue", catalogue, "--out", out)  # the `real` recipe: batches of 32
    assert code == 2 and stdout.splitlines() == [  # the recipe's line, then nothing but the refusal
        "[demo] recipe: real (the default for your own catalogue; --config NAME to choose another)"]
    _one_line(err, "the train split has 27 pairs", "train.batch_size=32", "--set train.batch_size=27 fits")
    assert not out.exists() and _snapshot(catalogue) == before
    code, _, err = _run(capsys, "demo", "--catalogue", catalogue, "--out", out, "--set", "train.batch_size=27")
    assert code == 2  # pre-training fits now; fine-tuning's batch is the next to refuse
    _one_line(err, "27 pairs", "finetune.batch_size=32", "--set finetune.batch_size=27 fits")
    assert not out.exists() and _snapshot(catalogue) == before
    fitting = load_config("real", ["train.batch_size=27", "finetune.batch_size=27"])
    check_batches(fitting, load_catalogue(catalogue))  # the suggested sizes pass the same rule


def test_a_synthetic_catalogue_smaller_than_a_batch_stops_before_the_patches_stage(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "demo", "--out", out, "--config", "tiny", "--set", "data.synthetic_products=4",
                        "--set", "train.batch_size=8")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # stderr also has synth's progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith("has 6 pairs, fewer than train.batch_size=8: --set train.batch_size=6 fits"), err
    assert (out / "catalogue" / "catalogue.jsonl").is_file() and not (out / "features").exists()


# ---------------------------------------------------------------------------------------------- the demo's --out
def test_a_demo_out_inside_the_catalogue_or_the_store_is_refused(catalogue, tmp_path, capsys):
    before = _snapshot(catalogue)
    for out in (catalogue, catalogue / "run", catalogue / "images" / "run"):
        code, _, err = _run(capsys, "demo", "--catalogue", catalogue, "--out", out)
        assert code == 2
        _one_line(err, f"--out {out}", f"the catalogue {catalogue}")
        assert _snapshot(catalogue) == before and not (catalogue / "run").exists()
    store = tmp_path / "store"
    store.mkdir()
    for out in (store, store / "run"):
        code, _, err = _run(capsys, "demo", "--out", out, "--set", f"data.features={store}")
        assert code == 2
        _one_line(err, f"--out {out}", f"the feature store {store}", "data.features")
        assert list(store.iterdir()) == []


def test_a_catalogue_inside_what_the_demo_writes_is_refused(catalogue, tmp_path, capsys):
    out = tmp_path / "run"
    inside = Path(shutil.copytree(catalogue, out / "features" / "catalogue"))
    before = _snapshot(out)
    code, _, err = _run(capsys, "demo", "--catalogue", inside, "--out", out)
    assert code == 2
    _one_line(err, f"the catalogue {inside}", f"{out / 'features'}")
    assert _snapshot(out) == before  # no run.yaml, no store written over it


# ---------------------------------------------------------------------------------------------- a run that is not there
@pytest.mark.parametrize("command, extra", [
    ("evaluate", []), ("baseline", []), ("card", []), ("serve", []),
    ("index", ["--out", "{tmp}/index"]), ("export", ["--out", "{tmp}/export"]),
    ("classify", ["--image", "{tmp}/photo.jpg", "--labels", "striped,plain"]),
])
def test_every_command_that_reads_a_run_says_it_does_not_exist(command, extra, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, stdout, err = _run(capsys, command, missing, *(a.format(tmp=tmp_path) for a in extra))
    assert code == 2 and stdout == ""
    _one_line(err, f"no run at {missing}", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written (no --out, no report)
