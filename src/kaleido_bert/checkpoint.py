"""Checkpoints: BERT weight import, self-describing checkpoint directories, training state and RNG capture.

Pre-training (paper §3.5–3.6) starts from a BERT checkpoint directory (``model.init``) and writes one
directory per saved step::

    step-000123/
        config.json, model.safetensors     the model (``save_pretrained``; loads with ``from_pretrained``)
        vocab.txt, tokenizer*.json         the tokenizer the run used
        run.yaml                           the whole run config
        train_state.pt                     optimizer, scheduler, step, epoch, position, RNG, loss history
        README.md                          the model card (:mod:`kaleido_bert.model_card`); loading ignores it
    latest                                 the name of the newest complete checkpoint

A checkpoint is built in a hidden sibling directory, fsynced and renamed into place, then ``latest`` is
replaced atomically and only then are checkpoints beyond ``keep_last`` deleted: a crash or a full disk at any
moment leaves the previous checkpoint usable. ``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from kaleido_bert.atomic import atomic_directory, atomic_write_text, read_json
from kaleido_bert.config import ModelConfig, RunConfig
from kaleido_bert.data.tokenizer import resolve_bert_dir
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import MODEL_CONFIG_FIELDS, KaleidoBertConfig, KaleidoBertModel
from kaleido_bert.model.loading import quiet_transformers
from kaleido_bert.model_card import write_card
from kaleido_bert.runs import (
    LATEST,
    TRAIN_STATE,
    WEIGHTS,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: saved keys get no prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------- BERT import
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors or ``.bin`` state dict; an unreadable file is a one-line KaleidoError naming it."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip and unpickling errors have no common base class
        first = (str(err).splitlines() or [""])[0][:120]
        raise KaleidoError(f"{path} is corrupt or truncated ({type(err).__name__}: {first})") from None


def load_bert_weights(model: KaleidoBertModel, bert_dir: str | Path) -> dict[str, list[str]]:
    """Copy a BERT checkpoint's embeddings, encoder and pooler into ``model`` (paper §4.1: BERT init).

    Args:
        model: the encoder (for the pre-training model pass ``model.bert``).
        bert_dir: ``minilm`` or a directory holding ``model.safetensors`` or ``pytorch_model.bin`` of any BERT
            checkpoint (``BertModel``, ``BertForPreTraining`` with a ``bert.`` prefix, or one of ours).

    Returns:
        ``loaded`` (our keys that were set), ``missing`` (our keys left as initialised: only
        ``patch_embeddings.*`` for a plain BERT checkpoint) and ``unexpected`` (source keys with no place in
        the model). Head keys (``cls.*``, ``heads.*``) and source copies of our derived buffers
        (``embeddings.position_ids``) are dropped without being reported.

    Raises:
        KaleidoError: no weights file, an unreadable file, or a shape that differs (names the key and both
            shapes).
    """
    directory = resolve_bert_dir(str(bert_dir))
    for name in (WEIGHTS, "pytorch_model.bin"):
        if (directory / name).is_file():
            source = _read_state_dict(directory / name)
            break
    else:
        raise KaleidoError(f"BERT directory {directory} has neither {WEIGHTS} nor pytorch_model.bin")
    ours = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    loaded, unexpected, update = [], [], {}
    for key, value in source.items():
        key = key.removeprefix("bert.")
        if key.startswith(("cls.", "heads.")) or (key in buffers and key not in ours):
            continue
        if key not in ours:
            unexpected.append(key)
            continue
        if ours[key].shape != value.shape:
            raise KaleidoError(f"BERT weights {directory}: {key} has shape {tuple(value.shape)} there but "
                               f"{tuple(ours[key].shape)} in the model (the hidden size or vocabulary of the "
                               "config differs)")
        update[key] = value
        loaded.append(key)
    model.load_state_dict(update, strict=False)
    missing = sorted(set(ours) - set(update))
    return {"loaded": sorted(loaded), "missing": missing, "unexpected": sorted(unexpected)}


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- saving


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, *, model: nn.Module, run_config: RunConfig,
                    train_state: dict[str, Any], tokenizer: Any = None, keep_last: int = 3) -> Path:
    """Write ``step-XXXXXX/`` atomically, point ``latest`` at it, then delete all but the last ``keep_last``.

    Raises:
        KaleidoError: the write failed (e.g. the disk is full); nothing partial is left and the previous
            checkpoint and ``latest`` are untouched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".step-*.partial"):  # left behind by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    previous = latest_checkpoint(out_dir)
    try:
        with atomic_directory(out_dir / name, overwrite=True) as tmp:
            with quiet_transformers():
                unwrap_model(model).save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            run_config.save(tmp / "run.yaml")
            torch.save(train_state, tmp / TRAIN_STATE)
            write_card(tmp, training=train_state, location=out_dir / name)  # README.md: "not evaluated yet"
            _fsync_tree(tmp)
        atomic_write_text(out_dir / LATEST, name + "\n")
    except (OSError, RuntimeError) as err:
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise KaleidoError(f"saving checkpoint {name} in {out_dir} failed ({reason}); {kept}") from None
    for old in list_checkpoints(out_dir)[: -max(1, keep_last)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir / name


# ---------------------------------------------------------------------------------------------- loading


def read_model_config(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict (read before transformers sees it, for a one-line error).

    Raises:
        KaleidoError: the file is missing, not JSON, not an object, or its ``tasks`` is not a list of names.
    """
    path = Path(checkpoint) / "config.json"
    corrupt = "the checkpoint is corrupt, use another one"
    found = read_json(path, dict, what="a Kaleido-BERT model config (a JSON object)", fix=corrupt)
    tasks = found.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise KaleidoError(f"{path} does not describe a Kaleido-BERT model (expected a JSON object with a task "
                           f"list): {corrupt}")
    return found


def check_model_config(checkpoint: str | Path, model_config: ModelConfig) -> None:
    """Refuse a checkpoint whose ``config.json`` disagrees with the run's ``model`` section (names the field).

    Raises:
        KaleidoError: ``config.json`` is missing or unreadable, or a field of :data:`MODEL_CONFIG_FIELDS` differs.
    """
    found = read_model_config(checkpoint)
    wanted = KaleidoBertConfig.from_model_config(model_config).to_dict()
    defaults = KaleidoBertConfig().to_dict()  # a field newer than the checkpoint reads as its default
    for field, key in MODEL_CONFIG_FIELDS.items():
        if found.get(key, defaults.get(key)) != wanted[key]:
            raise KaleidoError(f"checkpoint {Path(checkpoint)} was trained with "
                               f"model.{field}={found.get(key)!r} but the run config has "
                               f"model.{field}={wanted[key]!r}")


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's ``model.safetensors`` into ``model`` in place (tied copies are not in the file).

    Raises:
        KaleidoError: the file is missing, corrupt or truncated, or its keys do not fit the model.
    """
    path = Path(checkpoint) / WEIGHTS
    if not path.is_file():
        raise KaleidoError(f"checkpoint {Path(checkpoint)} has no {WEIGHTS}")
    state = _read_state_dict(path)
    target = unwrap_model(model)
    tied = getattr(target, "all_tied_weights_keys", None) or getattr(target, "_tied_weights_keys", None) or {}
    result = target.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        key = (missing or result.unexpected_keys)[0]
        what = "lacks" if missing else "has the unknown key"
        raise KaleidoError(f"{path} {what} {key}: it was saved from another model")


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read ``train_state.pt`` with ``weights_only=True``.

    Raises:
        KaleidoError: the file is missing, corrupt or truncated (names the file).
    """
    path = Path(checkpoint) / TRAIN_STATE
    if not path.is_file():
        raise KaleidoError(f"checkpoint {Path(checkpoint)} has no {TRAIN_STATE}")
    state = _read_state_dict(path)
    if not isinstance(state, dict) or "step" not in state:
        raise KaleidoError(f"{path} is not a training state (no step)")
    return state
