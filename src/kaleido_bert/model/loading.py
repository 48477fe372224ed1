"""Loading Kaleido-BERT models from checkpoints: one-line errors, run and stage directories.

:func:`load_pretrained` is ``cls.from_pretrained`` with transformers' load report silenced, config overrides
(``tasks``, ``num_labels`` …) and our one-line errors; :func:`require_head` refuses a checkpoint that lacks a
head a protocol needs, from the safetensors header alone (no tensor is read); :func:`frozen_bert` and
:func:`copy_bert` build and fill the frozen copies of the text initialisation that the wide classifier head and the
dual encoder's frozen member read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from kaleido_bert.errors import KaleidoError
from kaleido_bert.runs import WEIGHTS, resolve_checkpoint


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its progress bars (``save_pretrained`` draws one per shard; a checkpoint should not
    interrupt the train bar) and without its load reports (errors still print)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if enabled:
            hf_logging.enable_progress_bar()


def weight_names(checkpoint: str | Path) -> set[str]:
    """The tensor names in a checkpoint's ``model.safetensors`` (read from the header, no tensor loaded)."""
    from safetensors import safe_open

    path = Path(checkpoint) / WEIGHTS
    if not path.is_file():
        raise KaleidoError(f"checkpoint {Path(checkpoint)} has no {WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a corrupt header
        raise KaleidoError(f"{path} is corrupt ({type(err).__name__})") from None


def require_head(checkpoint: str | Path, prefix: str, task: str) -> None:
    """Refuse, in one line, a checkpoint that lacks the head ``task`` needs (weights named ``prefix*``)."""
    if not any(name.startswith(prefix) for name in weight_names(checkpoint)):
        raise KaleidoError(f"checkpoint {Path(checkpoint)} has no {prefix.rstrip('.')} head, which {task} needs: "
                           "use a checkpoint trained with it")


def load_pretrained(cls: type, checkpoint: str | Path, **overrides: Any) -> nn.Module:
    """``cls.from_pretrained`` with transformers' load report silenced and our one-line errors.

    ``overrides`` replace config fields (e.g. ``tasks``, ``num_labels``); weights the checkpoint lacks are
    initialised, so callers check for required heads with :func:`require_head` first.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    weight_names(checkpoint)
    with quiet_transformers():
        try:
            config = cls.config_class.from_pretrained(str(checkpoint))
            for key, value in overrides.items():  # new attributes too (from_pretrained would pass those to __init__)
                setattr(config, key, value)
            return cls.from_pretrained(str(checkpoint), config=config)
        except (OSError, ValueError) as err:
            raise KaleidoError(f"cannot load {checkpoint}: {str(err).splitlines()[0][:200]}") from None


def frozen_bert(config: dict[str, Any]) -> nn.Module:
    """A frozen ``transformers.BertModel`` (no pooler, no gradients, eval mode) of a BERT ``config.json`` dict."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_dict(config), add_pooling_layer=False).requires_grad_(False).eval()


def copy_bert(target: nn.Module, bert_dir: str | Path, what: str) -> None:
    """Copy the BERT checkpoint in ``bert_dir`` into ``target`` (a :func:`frozen_bert`).

    Raises:
        KaleidoError: a checkpoint transformers cannot read, or one of another shape (``what`` names the reader).
    """
    import torch
    from transformers import BertModel

    try:
        with quiet_transformers(), torch.no_grad():  # the checkpoint's pooler has no place here: no load report
            source = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False)
            target.load_state_dict(source.state_dict())
    except (OSError, ValueError, RuntimeError) as err:
        raise KaleidoError(f"{what}: cannot read the BERT checkpoint {bert_dir} ({type(err).__name__})") from None
