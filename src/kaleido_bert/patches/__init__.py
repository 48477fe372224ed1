"""The Kaleido Patch Generator (paper §3.2): grids, saliency, backbones, patch features, the feature store."""
