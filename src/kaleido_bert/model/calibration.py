"""The choices made on validation after training, kept in one record with the model they were made for (beyond
the paper).

Three settings of a trained model are not learned by any training step; ``kaleido calibrate``
(:mod:`kaleido_bert.workflows.calibrate`) chooses them on the validation split:

- ``rerank``: whether the cross-encoder (§3.5's ITM) re-ranks the dual encoder's shortlist
  (:mod:`kaleido_bert.eval.rerank_choice`);
- ``query_bank``: ``β`` of full-gallery search's query-bank normalisation (:mod:`kaleido_bert.eval.query_bank`;
  the banks' embeddings are ``query_bank.safetensors`` beside the record);
- ``caption_k``: the consensus k of captions by retrieval (:mod:`kaleido_bert.eval.caption_retrieval`).

The record is ``calibration.json`` in the checkpoint: ``{"fingerprint", "settings", "data", "rerank",
"query_bank", "caption_k"}``, a choice None where it does not apply. The fingerprint hashes what the choices depend
on: the model (``config.json``, the weights, the vocabulary, the frozen member) and the eval settings that define
the choices (:data:`SETTINGS`). Evaluation, indexing and serving only read the record: a record whose fingerprint
differs (the model was trained or its member refitted since, or the grids changed) is a one-line error naming
``kaleido calibrate``, as is a missing one where the config asks for a choice (a non-empty grid).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaleido_bert.atomic import atomic_write_json, read_json
from kaleido_bert.data.catalogue import file_sha256
from kaleido_bert.errors import KaleidoError
from kaleido_bert.runs import WEIGHTS

if TYPE_CHECKING:
    from kaleido_bert.config import RunConfig

CALIBRATION_FILE = "calibration.json"
CHOICES = ("rerank", "query_bank", "caption_k")
SETTINGS = ("rerank_k", "pair_score", "query_bank_betas", "caption_retrieval_grid", "caption_retrieval_k")
"""The ``eval`` fields that define the choices: a record made under other values is stale."""
MODEL_FILES = ("config.json", "vocab.txt", "itc_member.json", "itc_member.safetensors")
"""Besides the weights, the checkpoint files a model's behaviour depends on (those present are hashed)."""


def model_hash(checkpoint: str | Path) -> str:
    """SHA-256 over the checkpoint's weights and :data:`MODEL_FILES` (those present).

    Raises:
        KaleidoError: the checkpoint has no weights file.
    """
    checkpoint = Path(checkpoint)
    weights = checkpoint / WEIGHTS
    if not weights.is_file():
        raise KaleidoError(f"checkpoint {checkpoint} has no {WEIGHTS}")
    digest = hashlib.sha256(file_sha256(weights).encode())
    for name in MODEL_FILES:
        if (checkpoint / name).is_file():
            digest.update(f"{name}:{file_sha256(checkpoint / name)}".encode())
    return digest.hexdigest()


def settings(config: RunConfig) -> dict[str, Any]:
    """The :data:`SETTINGS` of ``config.eval``, as JSON values."""
    return {key: json.loads(json.dumps(getattr(config.eval, key))) for key in SETTINGS}


def fingerprint(checkpoint: str | Path, config: RunConfig) -> str:
    """16 hex digits: :func:`model_hash` and :func:`settings`."""
    body = json.dumps({"model": model_hash(checkpoint), "settings": settings(config)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def asks_for_choices(config: RunConfig) -> bool:
    """Whether ``config`` asks for a choice among values (a non-empty β or caption-k grid)."""
    return bool(config.eval.query_bank_betas or config.eval.caption_retrieval_grid)


def write_calibration(checkpoint: str | Path, config: RunConfig, choices: dict[str, Any],
                      data: dict[str, Any]) -> dict[str, Any]:
    """Write the record (atomically) and return it; ``choices`` maps each of :data:`CHOICES` to its report or
    None, ``data`` says what it was chosen on (catalogue, store, validation items)."""
    unknown = set(choices) - set(CHOICES)
    if unknown:
        raise ValueError(f"unknown calibration choices {sorted(unknown)}")
    record = {"fingerprint": fingerprint(checkpoint, config), "settings": settings(config), "data": data,
              **{name: choices.get(name) for name in CHOICES}}
    atomic_write_json(Path(checkpoint) / CALIBRATION_FILE, record)
    return record


def read_calibration(checkpoint: str | Path) -> dict[str, Any] | None:
    """The record kept in ``checkpoint`` as written, not checked against the model (see :func:`current_calibration`);
    None without one.

    Raises:
        KaleidoError: an unreadable or malformed record (one line naming it).
    """
    path = Path(checkpoint) / CALIBRATION_FILE
    if not path.is_file():
        return None
    again = "run `kaleido calibrate` on the run again"
    record = read_json(path, dict, fix=again)
    missing = [key for key in ("fingerprint", *CHOICES) if key not in record]
    if missing:
        raise KaleidoError(f"{path} lacks {', '.join(missing)}: {again}")
    for name in CHOICES:
        if record[name] is not None and not isinstance(record[name], dict):
            raise KaleidoError(f"{path}: {name} must be an object or null, got {type(record[name]).__name__}: "
                               f"{again}")
    return record


def current_calibration(checkpoint: str | Path, config: RunConfig, *, run: str | Path | None = None
                        ) -> dict[str, Any] | None:
    """The record of ``checkpoint`` when it was made for this model under ``config``'s :data:`SETTINGS`; None
    when there is none and ``config`` asks for no choice (the defaults apply).

    Raises:
        KaleidoError: a stale record, or none where ``config`` asks for a choice; one line naming the checkpoint
            and the command (``kaleido calibrate RUN``, ``run`` defaulting to the checkpoint).
    """
    record = read_calibration(checkpoint)
    command = f"run `kaleido calibrate {run or checkpoint}` first"
    if record is None:
        if asks_for_choices(config):
            raise KaleidoError(f"checkpoint {checkpoint} has no validation choices ({', '.join(CHOICES)}), which "
                               f"its config asks for: {command}")
        return None
    if record["fingerprint"] != fingerprint(checkpoint, config):
        raise KaleidoError(f"{Path(checkpoint) / CALIBRATION_FILE} was made for other weights or eval settings "
                           f"({', '.join(SETTINGS)}): {command}, with the --config and --set you evaluate with")
    return record


def current_choice(checkpoint: str | Path, config: RunConfig, name: str) -> dict[str, Any] | None:
    """The ``name`` choice (one of :data:`CHOICES`) of ``checkpoint``'s :func:`current_calibration`; None when
    the record has none.

    Raises:
        KaleidoError: as :func:`current_calibration`.
    """
    record = current_calibration(checkpoint, config)
    return record[name] if record is not None else None
