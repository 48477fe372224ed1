"""Rules between fields of a run config (beyond the paper), checked when the config is built.

Each section checks its own values; :func:`broken_rule` checks the settings that need another section's, so that a
config asking for something its other fields rule out is refused when it is loaded (``--set``, a preset, a
``run.yaml``), not after hours of pre-training when the feature is first used. :class:`RunConfig.__post_init__
<kaleido_bert.config.sections.RunConfig>` raises the returned line as a ``ConfigError``.

=============================  =====================================================================================
setting                        needs
=============================  =====================================================================================
``masking.itm_negatives``      ``mined`` draws ITM negatives from ITC similarities: ``itc`` in ``model.tasks``
``train.probe_init``           the ITC head to start, pooled by means: ``itc`` in ``model.tasks``, ``itc_pool=mean``
``train.probe_mix`` below 1    the ITC head the frozen member is ensembled with: ``itc`` in ``model.tasks``
``eval.query_bank_betas``      a dual encoder to normalise: ``itc`` in ``model.tasks`` or ``retrieval`` in
                               ``finetune.tasks`` (the fine-tuned retrieval model always has ITC)
``train.grad_accum``           divides ``train.batch_size`` and ``finetune.batch_size`` (fine-tuning accumulates
                               as pre-training does); the number of processes is checked when training starts
=============================  =====================================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: sections.py imports this module
    from kaleido_bert.config.sections import RunConfig


def broken_rule(config: RunConfig) -> str | None:
    """The first rule between fields that ``config`` breaks, as one line naming the fields; None when it keeps them."""
    tasks, train = config.model.tasks, config.train
    itc = "itc" in tasks
    if config.masking.itm_negatives == "mined" and not itc:
        return ("masking.itm_negatives=mined draws ITM negatives from ITC similarities: add itc to model.tasks, or "
                "use masking.itm_negatives=sampled")
    if train.probe_init and not (itc and config.model.itc_pool == "mean"):
        return (f"train.probe_init starts the ITC head from a linear probe: it needs itc in model.tasks and "
                f"model.itc_pool=mean (model.tasks={list(tasks)}, model.itc_pool={config.model.itc_pool})")
    if train.itc_member and not itc:
        return (f"train.probe_mix={train.probe_mix} ensembles the ITC head with a frozen member: add itc to "
                f"model.tasks, or set train.probe_mix=[1.0]")
    if config.eval.query_bank_betas and not (itc or "retrieval" in config.finetune.tasks):
        return ("eval.query_bank_betas normalises the dual encoder's gallery scores, which needs an ITC head: add itc "
                "to model.tasks or retrieval to finetune.tasks, or set eval.query_bank_betas=[]")
    for section, batch in (("train", train.batch_size), ("finetune", config.finetune.batch_size)):
        if batch % train.grad_accum:
            return (f"{section}.batch_size={batch} must be divisible by train.grad_accum={train.grad_accum} "
                    f"(each optimizer step accumulates that many equal micro-batches)")
    return None
