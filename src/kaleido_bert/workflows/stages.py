"""The pipeline's stages as resumable steps, shared by ``kaleido demo`` and ``kaleido ablate``.

Each stage reads the run config and skips itself when its output is complete: a training stage resumes from
its last checkpoint (:func:`kaleido_bert.runs.training_state`), the alignment stage re-uses a trained captioner.
:class:`Stages` times each stage for the closing summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import LABEL_FIELDS
from kaleido_bert.runs import FINETUNE, PRETRAIN, WEIGHTS, part_name, training_state


class Stages:
    """Run named stages in order, printing a header and recording each one's wall time (seconds)."""

    def __init__(self, tag: str) -> None:
        self.tag, self.timings = tag, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"\n[{self.tag}] === {name} ===", flush=True)
        start = time.perf_counter()
        result = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return result

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())


def extract_store(config: RunConfig, catalogue: str | Path, features: str | Path) -> dict[str, Any]:
    """Kaleido patches and their features for every image (resumes a partial store)."""
    from kaleido_bert import distributed as dist
    from kaleido_bert.patches.extraction import extract_features

    return extract_features(catalogue, features, config.features, seed=config.train.seed,
                            num_workers=config.data.num_workers, device=str(dist.device()))


def align(config: RunConfig, catalogue: str | Path, features: str | Path, captioner: str | Path,
          alignments: str | Path) -> dict[str, Any]:
    """Train the alignment captioner (unless done) with ``config.align``, then write the token↔patch alignments.

    Token positions come from ``data.tokenizer``, the vocabulary pre-training uses, at ``model.max_text_len``.
    """
    from kaleido_bert.align.alignment import extract_alignments
    from kaleido_bert.align.captioner import train_captioner

    if not (Path(captioner) / WEIGHTS).is_file():
        history = train_captioner(catalogue, features, captioner, config.align, seed=config.train.seed)
        print(json.dumps({k: v for k, v in history.items() if not isinstance(v, list)}))
    return extract_alignments(catalogue, features, captioner, alignments, tokenizer=config.data.tokenizer,
                              max_text_len=config.model.max_text_len, max_len=config.align.max_len,
                              batch_size=config.align.decode_batch_size, decode=config.align.decode)


def pretrain_stage(run: RunConfig, root: str | Path, *, progress: bool = True) -> dict[str, Any] | None:
    """Pre-train into ``root/pretrain`` unless it holds the final step (resumes an earlier checkpoint), then fit
    the dual encoder's frozen member when ``train.probe_mix`` asks for one and the checkpoint lacks it."""
    from kaleido_bert.train.pretrain import pretrain

    target = Path(root) / PRETRAIN
    state = training_state(target, run.train.max_steps)
    summary = None if state == "done" else pretrain(run, target, resume=state == "resume", progress=progress)
    member = itc_member_stage(run, target, progress=progress)
    if member is not None:
        summary = {**(summary or {}), "itc_member": member}
    return summary


def calibrate_stage(run: RunConfig, root: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """The validation choices of the run in ``root`` (:mod:`kaleido_bert.workflows.calibrate`), kept where a
    checkpoint's record is current; part name → record."""
    from kaleido_bert.workflows.calibrate import calibrate_run

    return calibrate_run(root, run, progress=progress, redo=False)


def itc_member_stage(run: RunConfig, pretrained: str | Path, *, progress: bool = True) -> dict[str, Any] | None:
    """Fit the frozen member into the latest checkpoint of ``pretrained`` (:mod:`kaleido_bert.workflows.itc_member`)
    unless ``train.probe_mix`` is ``[1.0]`` or the checkpoint already has one; its report, else None."""
    from kaleido_bert.model.itc_member import MEMBER_CONFIG
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.workflows.itc_member import fit_itc_member

    if not run.train.itc_member:
        return None
    checkpoint = resolve_checkpoint(pretrained)
    if (checkpoint / MEMBER_CONFIG).is_file():
        return None
    return fit_itc_member(checkpoint, run, progress=progress)


def finetune_jobs(run: RunConfig, *, retrieval: bool = True, caption: bool = True,
                  classifiers: bool = True) -> list[tuple[str, bool]]:
    """(task, image_only) of the fine-tuned parts a run needs among ``finetune.tasks``: retrieval, caption, and
    per label field the classifier inputs of ``finetune.inputs``."""
    wanted = set(run.finetune.tasks)
    jobs = [("retrieval", False)] if retrieval and "retrieval" in wanted else []
    jobs += [("caption", False)] if caption and "caption" in wanted else []
    if classifiers:
        jobs += [(task, source == "image") for task in LABEL_FIELDS if task in wanted
                 for source in run.finetune.inputs]
    return jobs


def finetune_stage(run: RunConfig, root: str | Path, task: str, image_only: bool, *,
                   progress: bool = True) -> dict[str, Any] | None:
    """Fine-tune ``task`` from ``root/pretrain`` into ``root/finetune/<part>`` unless done (resumes)."""
    from kaleido_bert.train.finetune import finetune, finetune_config

    root = Path(root)
    target = root / FINETUNE / part_name(task, image_only)
    state = training_state(target, finetune_config(run, task).train.max_steps)
    print(f"[stage] fine-tune {target.name}: {state}", flush=True)
    if state == "done":
        return None
    return finetune(task, run, root / PRETRAIN, target, image_only=image_only, resume=state == "resume",
                    progress=progress)
