"""Kaleido-BERT in PyTorch: fashion vision-language pre-training (Zhuge et al., CVPR 2021) and its product uses."""

from kaleido_bert.config import RunConfig, load_config
from kaleido_bert.data.catalogue import Catalogue, Item, load_catalogue
from kaleido_bert.errors import KaleidoError

__version__ = "0.1.0"
__all__ = ["Catalogue", "Item", "KaleidoError", "RunConfig", "load_catalogue", "load_config", "__version__"]
