"""Checkpoint directories: round trip, keep_last, atomic saves on a full disk, corrupt files, config check."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from kaleido_bert.checkpoint import (
    capture_rng,
    check_model_config,
    load_model_weights,
    load_train_state,
    restore_rng,
    save_checkpoint,
    unwrap_model,
)
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.heads import KaleidoBertForPreTraining
from kaleido_bert.runs import LATEST, latest_checkpoint, list_checkpoints
from model_fixtures import random_batch, tiny_model


def _save(out, step, model=None, **kwargs):
    model = model or tiny_model()
    return save_checkpoint(
        out,
        step,
        model=model,
        run_config=load_config("tiny"),
        train_state={"step": step, "history": [{"step": step}]},
        **kwargs,
    )


def _one_line_error(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model().eval()
    with torch.no_grad():  # perturb the weights so they differ from a fresh initialisation
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    path = _save(tmp_path, 7, model)
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "run.yaml",
        "train_state.pt",
    }
    batch = random_batch(3)
    loaded = KaleidoBertForPreTraining.from_pretrained(str(path)).eval()
    into = tiny_model().eval()
    load_model_weights(into, path)
    with torch.no_grad():
        expected = model(batch).losses
        for other in (loaded, into):
            got = other(batch).losses
            assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert into.heads.mlm.decoder.weight is into.bert.embeddings.word_embeddings.weight  # still tied
    assert load_train_state(path)["history"] == [{"step": 7}]


def test_keep_last_and_the_latest_pointer(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        _save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert (tmp_path / LATEST).read_text().strip() == "step-000005"
    (tmp_path / LATEST).unlink()  # a lost pointer falls back to the newest directory
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_a_full_disk_keeps_the_previous_checkpoint_and_fails_in_one_line(tmp_path, monkeypatch):
    model = tiny_model()
    _save(tmp_path, 3, model)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as fh:  # half a file made it to disk, then the device filled up
            fh.truncate(max(1, fh.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(KaleidoError) as err:
        _save(tmp_path, 6, model)
    message = _one_line_error(err)
    assert "step-000006" in message and "No space left" in message and "step-000003 is intact" in message
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left
    assert latest_checkpoint(tmp_path).name == "step-000003"
    load_model_weights(tiny_model(), tmp_path / "step-000003")
    assert load_train_state(tmp_path / "step-000003")["step"] == 3


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_give_one_line_errors_naming_the_file(tmp_path, name, damage):
    path = _save(tmp_path, 1)
    target = path / name
    data = target.read_bytes()
    target.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 40, "empty": b""}[damage]
    )
    with pytest.raises(KaleidoError) as err:
        if name == "model.safetensors":
            load_model_weights(tiny_model(), path)
        else:
            load_train_state(path)
    assert name in _one_line_error(err)


def test_train_state_is_read_with_weights_only(tmp_path):
    path = _save(tmp_path, 1)
    torch.save({"step": 1, "payload": _Unsafe()}, path / "train_state.pt")
    with pytest.raises(KaleidoError) as err:
        load_train_state(path)
    assert "train_state.pt" in _one_line_error(err)


class _Unsafe:
    """An arbitrary class: ``weights_only`` unpickling must refuse it."""


def test_a_checkpoint_from_another_model_config_is_refused_naming_the_field(tmp_path):
    path = _save(tmp_path, 1)
    check_model_config(path, load_config("tiny").model)
    with pytest.raises(KaleidoError) as err:
        check_model_config(path, load_config("tiny", ["model.hidden_size=48"]).model)
    assert "model.hidden_size=32" in _one_line_error(err) and "model.hidden_size=48" in str(err.value)
    with pytest.raises(KaleidoError) as err:
        check_model_config(path, load_config("tiny", ["model.tasks=['mlm', 'itm']"]).model)
    assert "model.tasks" in _one_line_error(err)
    with pytest.raises(KaleidoError) as err:  # regression: patch_levels was missing from the compared fields
        check_model_config(path, load_config("tiny", ["model.patch_levels=[5]"]).model)
    assert "model.patch_levels=[1, 2, 3, 4, 5]" in _one_line_error(err) and "model.patch_levels=[5]" in str(err.value)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KaleidoError) as err:
        check_model_config(path, load_config("tiny").model)
    assert "model.num_layers=3" in _one_line_error(err)


def test_weights_from_another_model_are_refused(tmp_path):
    path = _save(tmp_path, 1, tiny_model(["mlm", "itm"]))
    with pytest.raises(KaleidoError) as err:
        load_model_weights(tiny_model(), path)
    assert "model.safetensors" in _one_line_error(err)


def test_rng_capture_and_restore_replays_every_generator():
    import random

    import numpy as np

    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_unwrap_model_strips_compile_and_ddp_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Compiled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Compiled()) is inner and unwrap_model(inner) is inner
