"""Kaleido-BERT in PyTorch: fashion vision-language pre-training (Zhuge et al., CVPR 2021) and its product uses.

The public API, as HF-style libraries offer it::

    from kaleido_bert import KaleidoBertForPreTraining, KaleidoBertPipeline, load_catalogue, load_config

Model classes load from a checkpoint, a stage directory or a run directory (their latest checkpoint). The model
and pipeline classes are imported on first use, so ``import kaleido_bert`` stays light (no torch, no FAISS).
"""

from __future__ import annotations

import importlib
from typing import Any

from kaleido_bert.config import RunConfig, load_config
from kaleido_bert.data.catalogue import Catalogue, Item, load_catalogue
from kaleido_bert.errors import KaleidoError

__version__ = "0.1.0"

_LAZY = {
    "KaleidoBertConfig": "kaleido_bert.model.encoder",
    "KaleidoBertModel": "kaleido_bert.model.encoder",
    "KaleidoBertForPreTraining": "kaleido_bert.model.heads",
    "KaleidoBertForClassification": "kaleido_bert.model.classification",
    "KaleidoBertForCaptioning": "kaleido_bert.model.captioning",
    "DualEncoder": "kaleido_bert.model.dual_encoder",
    "FeatureStore": "kaleido_bert.patches.store",
    "KaleidoBertPipeline": "kaleido_bert.serve.pipeline",
}

__all__ = ["Catalogue", "DualEncoder", "FeatureStore", "Item", "KaleidoBertConfig", "KaleidoBertForCaptioning",
           "KaleidoBertForClassification", "KaleidoBertForPreTraining", "KaleidoBertModel", "KaleidoBertPipeline",
           "KaleidoError", "RunConfig", "load_catalogue", "load_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kaleido_bert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
