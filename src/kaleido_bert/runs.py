"""The run-directory layout: where every stage writes, how checkpoints are named, and how a path is resolved.

Every command that writes or reads a run goes through this module, so the layout has one owner::

    RUN/
        run.yaml                    the resolved run config of the whole pipeline (``kaleido demo``)
        catalogue/ features/ alignments/ captioner/      data stages (``kaleido demo``)
        pretrain/                   pre-training: step-000123/ … + latest
        finetune/<part>/            one directory per fine-tuned part (retrieval, caption, category[-image] …)
        report/                     ``kaleido evaluate``
        index/                      ``kaleido index``

A checkpoint directory ``step-000123/`` holds ``config.json``, ``model.safetensors``, the tokenizer,
``run.yaml`` and ``train_state.pt``; ``latest`` names the newest complete one.
"""

from __future__ import annotations

import re
from pathlib import Path

from kaleido_bert.errors import KaleidoError

LATEST = "latest"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run.yaml"
STEP_DIR = re.compile(r"^step-(\d+)$")

PRETRAIN = "pretrain"
FINETUNE = "finetune"
FINETUNE_TASKS = ("category", "subcategory", "caption", "retrieval")
"""The fine-tuning tasks of ``kaleido finetune`` (paper §4.2)."""
CLASSIFIERS = {("category", "image+text"): "category", ("category", "image"): "category-image",
               ("subcategory", "image+text"): "subcategory", ("subcategory", "image"): "subcategory-image"}
"""(label field, classifier input) → the part name of its fine-tuned classifier under ``RUN/finetune/``."""
FINETUNED_PARTS = ("retrieval", "caption", *CLASSIFIERS.values())


def part_name(task: str, image_only: bool = False) -> str:
    """The directory name of a fine-tuned part: ``category`` or, from the image alone, ``category-image``."""
    return f"{task}-image" if image_only else task


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step a ``step-000123`` directory was saved at."""
    match = STEP_DIR.match(Path(checkpoint).name)
    if match is None:
        raise KaleidoError(f"{checkpoint} is not a checkpoint directory (step-NNNNNN)")
    return int(match.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories in ``out_dir``, oldest first (renames are atomic: each is whole)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest ``step-*`` directory, else None."""
    pointer = Path(out_dir) / LATEST
    if pointer.is_file():
        named = Path(out_dir) / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named.is_dir() and STEP_DIR.match(named.name):
            return named
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory itself, a stage directory's latest checkpoint, or a run's pre-trained one."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    for stage in (path, path / PRETRAIN):
        found = latest_checkpoint(stage) if stage.is_dir() else None
        if found is not None and (found / CONFIG).is_file():
            return found
    return None


def require_run(path: str | Path) -> Path:
    """``path`` as a ``Path`` when something exists there: the check every command that reads a run (or a
    checkpoint) makes first, so a mistyped path is named as such, not as a setting the run would have given.

    Raises:
        KaleidoError: ``no run at PATH: the path does not exist``.
    """
    if not Path(path).exists():
        raise KaleidoError(f"no run at {path}: the path does not exist")
    return Path(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (``config.json`` inside), a stage directory (its latest checkpoint) or a run
    directory (its pre-trained model's latest checkpoint).

    Raises:
        KaleidoError: none of these, in one line naming the path (and the latest checkpoint nearby, if any).
    """
    found = find_checkpoint(path)
    if found is not None:
        return found
    path = Path(path)
    if not path.exists():
        sibling = latest_checkpoint(path.parent) if path.parent.is_dir() else None
        hint = f" (latest: {sibling.name})" if sibling is not None else " (the path does not exist)"
        raise KaleidoError(f"no checkpoint at {path}{hint}")
    raise KaleidoError(f"no checkpoint at {path}: neither a checkpoint ({CONFIG} + {WEIGHTS}) nor a run or "
                       "stage directory holding one")


def is_local_path(name: str | Path) -> bool:
    """Whether ``from_pretrained(name)`` means a local path rather than a hub repository id (``org/name``).

    Local: it exists, is absolute, starts with ``.`` or ``~``, or has more than one ``/`` (a hub id has at most one).
    """
    text = str(name)
    return Path(text).exists() or Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1


def training_state(out_dir: str | Path, max_steps: int) -> str:
    """``done`` (a checkpoint at ``max_steps`` or later), ``resume`` (an earlier one) or ``fresh``."""
    found = latest_checkpoint(out_dir)
    if found is None:
        return "fresh"
    return "done" if checkpoint_step(found) >= max_steps else "resume"


def run_parts(run: str | Path) -> dict[str, Path]:
    """The checkpoints a run directory holds, by part name (``pretrain``, ``retrieval``, ``category`` …).

    A checkpoint or a stage directory stands for a run holding only a pre-trained model.
    """
    run = Path(run)
    if (run / CONFIG).is_file() or latest_checkpoint(run) is not None:
        return {PRETRAIN: resolve_checkpoint(run)}
    found = latest_checkpoint(run / PRETRAIN)
    if found is None:
        raise KaleidoError(f"{run} holds no pre-trained model: expected {run / PRETRAIN} with a checkpoint, "
                           "or pass a checkpoint directory")
    parts = {PRETRAIN: found}
    for name in FINETUNED_PARTS:
        found = latest_checkpoint(run / FINETUNE / name)
        if found is not None:
            parts[name] = found
    return parts


def run_config_file(path: str | Path) -> Path | None:
    """The ``run.yaml`` that describes a run, stage or checkpoint directory, if any.

    In order: ``path/run.yaml`` (a run written by ``kaleido demo``, or a checkpoint), the one of the checkpoint
    ``path`` resolves to (a stage directory or a run holding ``pretrain/``), then the enclosing directories'.
    """
    path = Path(path)
    found = find_checkpoint(path)
    candidates = [path / RUN_CONFIG, *([found / RUN_CONFIG] if found is not None else []),
                  *(parent / RUN_CONFIG for parent in list(path.parents)[:3])]
    return next((c for c in candidates if c.is_file()), None)
