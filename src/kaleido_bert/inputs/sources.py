"""The data a run reads (its config's ``data`` section): the catalogue and the feature store its config names, opened together.

Every stage after feature extraction (pre-training, fine-tuning, evaluation) opens its inputs here, so the checks
that a store fits its catalogue and the model live in one place.
"""

from __future__ import annotations

from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import Catalogue, load_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.store import FeatureStore


def open_data(config: RunConfig) -> tuple[Catalogue, FeatureStore]:
    """The catalogue and feature store named by ``data.catalogue`` / ``data.features``."""
    if not config.data.catalogue or not config.data.features:
        raise KaleidoError("fine-tuning and evaluation need data.catalogue and data.features "
                           "(--set data.catalogue=DIR --set data.features=STORE)")
    catalogue = load_catalogue(config.data.catalogue)
    store = FeatureStore(config.data.features, expect={"feature_size": config.model.patch_feature_size})
    store.require_catalogue(catalogue)
    return catalogue, store
