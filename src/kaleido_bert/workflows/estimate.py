"""How long a run's training will take on this machine, said before its expensive stages (beyond the paper).

The step counts come from the catalogue and the run's budget (``train.epochs`` / ``finetune.epochs`` made steps
for its training items, the caption fine-tune's own steps); the time per step is measured just before, on this
machine: two pre-training steps (forward, backward, AdamW; the second timed) of the run's model with random
weights on a random batch of its shape (:func:`~kaleido_bert.inputs.synthetic.synthetic_batch`), in the run's
precision. Every fine-tuning step is counted at that price too, a classifier's being cheaper and a captioner's
alike. Feature extraction, the alignment captioner, the probes and the evaluation are not included, and the line
says so. Shapes: the batch ``(B, T)`` text and ``(B, 55, F)`` patches of the run's ``train.batch_size``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kaleido_bert.config import RunConfig


@dataclass(frozen=True)
class TrainingEstimate:
    """Steps of each training stage and the measured seconds per step."""

    pretrain_steps: int
    finetune_steps: dict[str, int]  # part name → steps
    step_seconds: float

    @property
    def seconds(self) -> float:
        return (self.pretrain_steps + sum(self.finetune_steps.values())) * self.step_seconds

    def line(self) -> str:
        parts = ", ".join(f"{name} {steps}" for name, steps in self.finetune_steps.items()) or "none"
        return (f"training ≈ {self.seconds / 60:.0f} min on this machine: pre-training {self.pretrain_steps} steps, "
                f"fine-tuning steps {parts}, at {self.step_seconds:.1f} s per step (one step of this model measured "
                f"just now); feature extraction, the captioner, the probes and evaluation come on top")


def step_seconds(config: RunConfig) -> float:
    """Seconds of one pre-training step of ``config``'s model (random weights) on a random batch of its shape,
    in its precision: the second of two steps."""
    from kaleido_bert import distributed as dist
    from kaleido_bert.inputs.synthetic import synthetic_batch
    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining

    device = dist.device()
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(
        config.model, itm_negatives=config.masking.itm_negatives)).to(device).train()
    batch = {k: v.to(device) for k, v in synthetic_batch(config.model, config.masking, config.train.batch_size).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cast = dist.autocast_dtype(config.train.precision, device)
    took = 0.0
    for _ in range(2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with dist.autocast(device, cast):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
    return took


def estimate_training(config: RunConfig, train_items: int, *, seconds: float | None = None) -> TrainingEstimate:
    """The training stages of ``config`` for ``train_items`` training items; ``seconds`` per step, measured by
    :func:`step_seconds` when None."""
    from kaleido_bert.runs import part_name
    from kaleido_bert.train.finetune import finetune_config
    from kaleido_bert.workflows.stages import finetune_jobs

    resolved = config.with_train_items(train_items)
    finetune = {part_name(task, image_only): finetune_config(resolved, task).train.max_steps
                for task, image_only in finetune_jobs(resolved)}
    return TrainingEstimate(resolved.train.max_steps, finetune,
                            step_seconds(config) if seconds is None else float(seconds))
