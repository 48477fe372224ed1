"""The one training loop, for pre-training (paper §3.5–3.6) and fine-tuning alike.

``model(batch)`` returns an object with ``.losses`` (named scalar losses; the objective is their sum) and
``.loss``. The loop adds what the released scripts had (AdamW β=(0.9, 0.98), ε=1e-6, linear warm-up then
linear decay to 0, global-norm clipping) and what a run needs: gradient accumulation, mixed precision, DDP
under ``torchrun``, validation, checkpoints, exact resume, ``metrics.csv``, TensorBoard and the per-task loss
curves of the paper's Fig. 6.

Data order is a seeded permutation per epoch, sharded by :func:`~kaleido_bert.distributed.shard_batches`;
dropout is seeded per ``(seed, step, rank)``, so a resumed run replays the same batches and randomness.
A dataset with ``__getitems__`` assembles each batch itself (the loader hands it the whole batch of indices).
Every step logs ``data_wait``, the share of its time spent blocked on the loader (``metrics.csv`` and the
progress bar, which says ``data-bound`` when the share of the last steps is above ``DATA_BOUND``).

Exact global means. A task loss is a mean over its own units (masked tokens for MLM, masked patches for the
reconstructions, pairs for ITM), whose number differs between micro-batches and ranks. ``loss_counts(batch)``
says how many units each loss of a micro-batch averages over; the loop all-reduces those counts first and
weights each micro-batch loss by ``n·W/N`` (local units × world size / global units). DDP's gradient average
then equals the gradient of the global-batch mean, and the logged loss is the same global mean, whatever the
number of ranks or micro-batches. Without ``loss_counts`` every loss counts as a per-pair mean.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kaleido_bert import checkpoint as ckpt
from kaleido_bert import distributed as dist
from kaleido_bert import runs
from kaleido_bert.atomic import atomic_path, atomic_write_json
from kaleido_bert.config import RunConfig, TrainConfig
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.rows import read_ahead

CountFn = Callable[[dict[str, Any]], dict[str, float]]
VALIDATION_METRICS = ("itm_accuracy",)
"""Validation measures that are not losses (a model's output ``metrics``), logged and plotted beside them; each is
averaged over the units of the loss its name starts with."""
DATA_BOUND = 0.5
"""Share of the step time spent waiting for the next batch above which a run is reported as data-bound."""


def get_lr(step: int, *, lr: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then linear decay to 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def build_optimizer(model: nn.Module, config: TrainConfig, new: Collection[str] = ()) -> torch.optim.AdamW:
    """AdamW as the released scripts (β=(0.9, 0.98), ε=1e-6); no weight decay on biases and LayerNorm.

    The parameters named in ``new`` (those the text initialisation did not provide) learn at ``config.lr ×
    config.new_lr_scale``; the others at ``config.lr``. Groups: (decay, no decay) × (initialised, new), empty
    ones dropped, always in that order (a resumed run rebuilds the same groups)."""
    new = set(new)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            plain = param.ndim < 2 or "LayerNorm" in name or name.endswith("bias")
            groups.setdefault((plain, name in new), []).append(param)
    return torch.optim.AdamW(
        [{"params": groups[key], "weight_decay": 0.0 if key[0] else config.weight_decay,
          "lr": config.lr * (config.new_lr_scale if key[1] else 1.0)} for key in sorted(groups)],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


class _EpochItems(Dataset):
    """The dataset indexed by ``(epoch, index)``, so DataLoader workers can live for the whole run.

    Whichever process reads an item (a worker or this one) first moves its copy of the dataset to that epoch.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def _at(self, epoch: int) -> Dataset:
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return self._at(epoch)[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> Any:
        """A whole batch (of one epoch: batches never straddle two), from the dataset's ``__getitems__`` if any."""
        dataset = self._at(keys[0][0])
        indices = [index for _, index in keys]
        many = getattr(dataset, "__getitems__", None)
        return many(indices) if many else [dataset[i] for i in indices]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _counts(batch: dict[str, Any], count_fn: CountFn | None) -> dict[str, float]:
    """Units per task from ``count_fn``; ``*`` (any other task) = the pairs of the micro-batch."""
    counts = {k: float(v) for k, v in (count_fn(batch) if count_fn else {}).items()}
    first = next(v for v in batch.values() if isinstance(v, Tensor))
    counts.setdefault("*", float(len(batch["ids"]) if "ids" in batch else first.shape[0]))
    return counts


class _Metrics:
    """Loss history → ``metrics.csv`` (appended), TensorBoard scalars (optional) and ``loss_curves.png``."""

    def __init__(self, out_dir: Path, history: list[dict[str, float]], *, enabled: bool,
                 resumed_at: int) -> None:
        self.out_dir, self.history, self.enabled = out_dir, history, enabled
        self.columns: list[str] | None = None
        self.tb = None
        if not enabled:
            return
        if history:  # drops the rows a killed run logged after its last checkpoint
            self.columns = self._columns(history[0])
            with atomic_path(out_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(history)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_at or None)
        except ImportError:
            self.tb = None

    @staticmethod
    def _columns(row: dict[str, float]) -> list[str]:
        tasks = [k.split("/", 1)[1] for k in row if k.startswith("train/")]
        measures = [m for m in VALIDATION_METRICS if m.split("_", 1)[0] in tasks]
        return ["step", "lr", "data_wait", *[f"train/{t}" for t in tasks], *[f"val/{t}" for t in tasks + measures]]

    def log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        path = self.out_dir / "metrics.csv"
        new = self.columns is None or not path.is_file()
        self.columns = self.columns or self._columns(row)
        with open(path, "w" if new else "a", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    tag = key.replace("train/", "loss/").replace("val/", "val_loss/")
                    self.tb.add_scalar(tag, value, row["step"])
            self.tb.flush()

    def plot(self) -> None:
        """One subplot per task (and the total), train and validation loss against the step (paper Fig. 6)."""
        if not (self.enabled and self.history):
            return
        from kaleido_bert.plots import plt, save_figure

        tasks = [c.split("/", 1)[1] for c in self._columns(self.history[0]) if c.startswith("val/")]
        cols = min(4, len(tasks))
        rows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            for split, style in (("train", "-"), ("val", "o-")):
                points = [(r["step"], r[f"{split}/{task}"]) for r in self.history if f"{split}/{task}" in r]
                if points:
                    ax.plot(*zip(*points, strict=True), style, ms=3, lw=1, label=split)
            ax.set_title(task, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if ax.get_lines():
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, self.out_dir / "loss_curves.png", dpi=100, tight=False)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def validate(model: nn.Module, dataset: Dataset, collate_fn: Callable, *, batch_size: int, tasks: list[str],
             count_fn: CountFn | None = None, device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """Per-task validation losses, each the mean over all its units in the whole set (sharded over ranks).

    The set is read at epoch 0, so its corruptions are the same at every evaluation. ``loss`` is their sum.
    """
    device = device or torch.device("cpu")
    model = ckpt.unwrap_model(model)
    was_training = model.training
    model.eval()
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    mine = list(range(dist.rank(), len(dataset), dist.world_size()))
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    names = [*tasks, *VALIDATION_METRICS]
    totals = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # weighted sums, unit counts
    for batch in DataLoader(dataset, batch_sampler=chunks, collate_fn=collate_fn):
        counts = _counts(batch, count_fn)
        with dist.autocast(device, dtype):
            output = model(_to_device(batch, device))
        values = {**getattr(output, "metrics", {}), **output.losses}
        for i, name in enumerate(names):
            if name in values:
                n = counts.get(name.split("_", 1)[0] if name in VALIDATION_METRICS else name, counts["*"])
                totals[0, i] += float(values[name]) * n
                totals[1, i] += n
    dist.all_reduce_sum(totals)
    model.train(was_training)
    out = {t: float(totals[0, i] / totals[1, i]) for i, t in enumerate(tasks) if totals[1, i] > 0}
    out["loss"] = sum(out.values())
    out.update({m: float(totals[0, i] / totals[1, i]) for i, m in enumerate(names)
                if m in VALIDATION_METRICS and totals[1, i] > 0})
    return out


def _forward_backward(ddp: nn.Module, micro: list[dict[str, Any]], count_fn: CountFn | None, *,
                      device: torch.device, dtype: torch.dtype | None,
                      scaler: torch.amp.GradScaler) -> dict[str, Tensor]:
    """Accumulate one optimizer step's gradient; return each task's local share of the global-batch mean.

    Micro-batch ``m`` of rank ``r`` weights task ``t`` by ``n[t,m,r]·W / N[t]`` (``N`` all-reduced first), so
    the summed, DDP-averaged gradient is that of the mean over all ``N[t]`` units of the global batch.
    """
    world = dist.world_size()
    counts = [_counts(b, count_fn) for b in micro]
    keys = sorted(set().union(*counts))
    local = torch.tensor([sum(c.get(k, c["*"]) for c in counts) for k in keys], dtype=torch.float64)
    global_n = dict(zip(keys, dist.all_reduce_sum(local.to(device)).tolist(), strict=True))
    sums: dict[str, Tensor] = {}
    for m, batch in enumerate(micro):
        last = m == len(micro) - 1 or world == 1
        with contextlib.nullcontext() if last else ddp.no_sync():  # all-reduce gradients once per step
            with dist.autocast(device, dtype):
                losses = ddp(_to_device(batch, device)).losses
            objective = 0.0
            for task, loss in losses.items():
                total = global_n.get(task, global_n["*"])
                share = counts[m].get(task, counts[m]["*"]) / total if total > 0 else 0.0
                objective = objective + loss * (share * world)  # DDP divides by W again
                sums[task] = sums.get(task, 0.0) + loss.detach().float() * share
            scaler.scale(objective).backward()
    return sums


def data_wait_note(waited: float, total: float) -> str:
    """The progress-bar note of the share of step time spent waiting for data, e.g. ``"62% data-bound"``."""
    share = waited / total if total > 0 else 0.0
    return f"{share:.0%}" + (" data-bound" if share > DATA_BOUND else "")


def _stop_on_nonfinite(step: int, what: str, micro: list[dict[str, Any]]) -> None:
    ids = [i for part in dist.all_gather_object([i for b in micro for i in b.get("ids", [])]) for i in part]
    shown = ", ".join(map(str, ids[:12])) + (f", … ({len(ids)} pairs)" if len(ids) > 12 else "")
    raise KaleidoError(f"non-finite {what} at step {step} in the batch with ids [{shown}]; "
                       "training stopped, the last good checkpoint is kept")


def full_batches(pairs: int, batch_size: int, *, multiple: int = 1, key: str = "train.batch_size") -> int:
    """Optimizer steps in one pass over ``pairs`` training pairs (the loop drops the last partial batch).

    The one rule for a train split too small to train on: the loop checks it, and ``kaleido demo`` checks it on
    the catalogue before its first stage.

    Args:
        multiple: what a batch size must be a multiple of (``train.grad_accum`` × processes).
        key: the config key that sets ``batch_size`` (``finetune.batch_size`` for a fine-tuned part).

    Raises:
        KaleidoError: fewer pairs than one batch, in one line naming both numbers and the largest batch size that
            fits.
    """
    steps = pairs // batch_size
    if steps == 0:
        fits = pairs - pairs % multiple
        hint = f"--set {key}={fits} fits" if fits >= 1 else "no batch size fits: add training items"
        raise KaleidoError(f"the train split has {pairs} pairs, fewer than {key}={batch_size}: {hint}")
    return steps


def train(model: nn.Module, train_dataset: Dataset, val_dataset: Dataset | None, collate_fn: Callable,
          config: RunConfig, out_dir: str | Path, *, resume: bool = False, tokenizer: Any = None,
          progress: bool = True, loss_counts: CountFn | None = None,
          new_parameters: Collection[str] = (), part: str = runs.PRETRAIN) -> dict[str, Any]:
    """Train ``model`` for ``config.train.max_steps`` optimizer steps, checkpointing into ``out_dir``.

    Args:
        model: ``model(batch)`` returns ``.losses`` (named scalar losses; their sum is minimised).
        train_dataset: map-style; ``set_epoch(epoch)`` is called when present.
        val_dataset: validated every ``eval_every`` steps and at the end (None or empty: no validation).
        collate_fn: list of samples → batch dict (``batch["ids"]`` names the pairs in error messages).
        config: the run config (``train`` section: optimisation, schedule, precision, checkpoint cadence).
        out_dir: where checkpoints, ``run.yaml``, ``metrics.csv``, ``loss_curves.png``, ``summary.json``
            and TensorBoard go.
        resume: continue exactly from the latest checkpoint in ``out_dir``.
        tokenizer: saved into every checkpoint when given.
        progress: show a progress bar and log lines (main process only).
        loss_counts: batch → units each loss averages over (see the module docstring); None = pairs.
        new_parameters: names of the parameters that learn at ``train.new_lr_scale`` × the lr
            (:func:`build_optimizer`).
        part: what is trained (``pretrain``, ``retrieval``, ``category-image`` …: :func:`kaleido_bert.runs.part_name`);
            recorded in each checkpoint's training state with the machine and the wall time, for its model card.

    Returns:
        Summary: steps, epochs, seconds, pairs/s, the share of the step time spent waiting for data
        (``data_wait``; ``data_bound`` above ``DATA_BOUND``), final and best validation losses per task, the
        last checkpoint.

    Raises:
        KaleidoError: a batch size that does not split over processes and micro-batches, a train split
            smaller than one batch, checkpoints without ``resume`` (or none with it), a checkpoint from
            another model config or data set, a non-finite loss or gradient, or a failed save.
    """
    tc, out_dir, started = config.train, Path(out_dir), time.perf_counter()
    dist.init()
    world, main, device = dist.world_size(), dist.is_main(), dist.device()
    if tc.batch_size % (tc.grad_accum * world):
        raise KaleidoError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum × "
                           f"processes = {tc.grad_accum} × {world}")
    steps_per_epoch = full_batches(len(train_dataset), tc.batch_size, multiple=tc.grad_accum * world,
                                   key="train.batch_size" if part == runs.PRETRAIN else "finetune.batch_size")
    say = (lambda msg: tqdm.write(msg)) if progress and main else (lambda msg: None)
    model.to(device)
    optimizer = build_optimizer(model, tc, new_parameters)
    warmup = round(tc.warmup_ratio * tc.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # a factor of the peak lr
        optimizer, lambda s: get_lr(s, lr=1.0, warmup_steps=warmup, max_steps=tc.max_steps))
    dtype = dist.autocast_dtype(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, epoch, position, history, earlier_seconds = 0, 0, 0, [], 0.0
    if resume:
        checkpoint = runs.latest_checkpoint(out_dir)
        if checkpoint is None:
            raise KaleidoError(f"nothing to resume: {out_dir} holds no checkpoint")
        ckpt.check_model_config(checkpoint, config.model)
        state = ckpt.load_train_state(checkpoint)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise KaleidoError(f"checkpoint {checkpoint} was made with {state['train_items']} train pairs in "
                               f"batches of {state['batch_size']}; this run has {len(train_dataset)} in "
                               f"batches of {tc.batch_size}")
        ckpt.load_model_weights(model, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        step, epoch, position, history = state["step"], state["epoch"], state["position"], state["history"]
        earlier_seconds = float(state.get("seconds", 0.0))  # the wall time of the runs before this one
        say(f"[train] resumed from {checkpoint} at step {step} (epoch {epoch}, batch {position})")
    elif runs.list_checkpoints(out_dir):
        raise KaleidoError(f"{out_dir} already holds checkpoints: pass --resume to continue, "
                           "or use another --out")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "run.yaml")
    metrics = _Metrics(out_dir, history, enabled=main, resumed_at=step)
    ddp = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    plan = dist.shard_batches(len(train_dataset), seed=tc.seed, epoch=epoch, position=position,
                              batch_size=tc.batch_size, grad_accum=tc.grad_accum)
    plan = read_ahead(plan, getattr(train_dataset, "prefetch", None))  # the next batch's store reads start early
    loader = DataLoader(_EpochItems(train_dataset), batch_sampler=plan, collate_fn=collate_fn,
                        num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # not the global RNG: a resume must not shift it
    batches = iter(loader) if step < tc.max_steps else iter(())
    machine = dist.describe_machine(tc.precision)  # the model card's "machine" (CPU, threads, device, precision)

    def save() -> Path:
        state = {"step": step, "epoch": epoch, "position": position, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": ckpt.capture_rng(), "history": history, "steps_per_epoch": steps_per_epoch,
                 "train_items": len(train_dataset), "batch_size": tc.batch_size, "world_size": world,
                 "seed": tc.seed, "part": part, "machine": machine,
                 "seconds": earlier_seconds + time.perf_counter() - started}
        failure = None
        if main:
            try:
                ckpt.save_checkpoint(out_dir, step, model=model, run_config=config, train_state=state,
                                     tokenizer=tokenizer, keep_last=tc.keep_last)
            except KaleidoError as err:
                failure = err
        if dist.all_reduce_sum(torch.tensor([float(failure is not None)], device=device)).item():
            raise failure or KaleidoError(f"rank 0 failed to save the checkpoint of step {step}")
        return out_dir / runs.checkpoint_name(step)

    tasks = [k[6:] for k in (history[0] if history else {}) if k.startswith("train/") and k != "train/loss"]
    has_val = val_dataset is not None and len(val_dataset) > 0
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    last_saved, loop_seconds, wait_seconds, start_step = None, 0.0, 0.0, step
    recent: deque[tuple[float, float]] = deque(maxlen=20)  # (waited, step seconds) of the last steps
    model.train()
    try:
        while step < tc.max_steps:
            tick = time.perf_counter()
            if position == steps_per_epoch:
                epoch, position = epoch + 1, 0
            micro = [next(batches) for _ in range(tc.grad_accum)]
            waited = time.perf_counter() - tick  # blocked on the loader
            torch.manual_seed((tc.seed * 1_000_003 + step) * 1_009 + dist.rank())  # this step's dropout
            lr = scheduler.get_last_lr()[0]
            sums = _forward_backward(ddp, micro, loss_counts, device=device, dtype=dtype, scaler=scaler)
            tasks = tasks or list(sums)
            logged = dist.all_reduce_sum(torch.stack([sums[t] for t in tasks]).double()).tolist()
            if not all(map(math.isfinite, logged)):
                bad = ", ".join(t for t, v in zip(tasks, logged, strict=True) if not math.isfinite(v))
                _stop_on_nonfinite(step + 1, f"loss ({bad})", micro)
            scaler.unscale_(optimizer)
            clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not torch.isfinite(norm) and not scaler.is_enabled():  # fp16 overflow is the scaler's to skip
                _stop_on_nonfinite(step + 1, "gradient", micro)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, position + 1
            seconds = time.perf_counter() - tick
            loop_seconds, wait_seconds = loop_seconds + seconds, wait_seconds + waited
            recent.append((waited, seconds))
            row = {"step": step, "lr": lr, "data_wait": waited / seconds,
                   **{f"train/{t}": v for t, v in zip(tasks, logged, strict=True)}}
            row["train/loss"] = sum(logged)
            postfix = {t: f"{v:.3f}" for t, v in zip(tasks, logged, strict=True)}
            postfix["data"] = data_wait_note(*map(sum, zip(*recent, strict=True)))
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            evaluate = step % tc.eval_every == 0 or step == tc.max_steps
            if has_val and evaluate:
                val = validate(model, val_dataset, collate_fn, batch_size=tc.batch_size // world, tasks=tasks,
                               count_fn=loss_counts, device=device, dtype=dtype)
                row.update({f"val/{k}": v for k, v in val.items()})
                say(f"[train] step {step}: val " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))
            metrics.log(row)
            if evaluate:
                metrics.plot()
            if step % tc.save_every == 0 or step == tc.max_steps:
                last_saved = save()
    finally:
        bar.close()
        metrics.close()
        if world > 1:
            dist.cleanup()
    summary = _summary(history, out_dir, steps=step, epochs=epoch + position / steps_per_epoch,
                       seconds=time.perf_counter() - started, loop_seconds=loop_seconds,
                       wait_seconds=wait_seconds, pairs=(step - start_step) * tc.batch_size,
                       run_steps=step - start_step)
    summary["checkpoint"] = str(last_saved or runs.latest_checkpoint(out_dir) or "")
    if main:
        atomic_write_json(out_dir / "summary.json", summary)
    say("[train] done: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
    return summary


def _summary(history: list[dict[str, float]], out_dir: Path, *, steps: int, epochs: float, seconds: float,
             loop_seconds: float, wait_seconds: float, pairs: int, run_steps: int) -> dict[str, Any]:
    vals = [r for r in history if "val/loss" in r]
    final_val = {k[4:]: round(v, 5) for k, v in vals[-1].items() if k.startswith("val/")} if vals else {}
    best_val = {k: round(min(r[f"val/{k}"] for r in vals if f"val/{k}" in r), 5) for k in final_val}
    last = history[-1] if history else {}
    return {
        "out_dir": str(out_dir), "steps": steps, "steps_this_run": run_steps, "epochs": round(epochs, 3),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(pairs / loop_seconds, 2) if loop_seconds > 0 else None,
        "data_wait": round(wait_seconds / loop_seconds, 4) if loop_seconds > 0 else None,
        "data_bound": loop_seconds > 0 and wait_seconds / loop_seconds > DATA_BOUND,
        "final_train": {k[6:]: round(v, 5) for k, v in last.items() if k.startswith("train/")},
        "final_val": final_val, "best_val": best_val,
    }
