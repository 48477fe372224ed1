"""Captioning by retrieval in a dual-encoder space (beyond the paper's FC protocol, §4.2 task 4; Devlin et al. 2015,
"Exploring Nearest Neighbor Approaches for Image Captioning").

Gallery: one description per training product (those with an image in the feature store, product ids sorted, as
the frozen baseline's), embedded by the text side; queries: the FC protocol's items, embedded by the image side.

* ``nearest``: the caption is the description of the training product nearest to the image (cosine).
* ``consensus``: among the k nearest training products, the description with the highest mean similarity to the
  other k − 1 candidates. The similarity between two texts is CIDEr-like and needs no Java: lower-cased ``\\w+``
  words, for n = 1…4 the cosine of the two texts' n-gram TF-IDF vectors (term frequency = count, IDF = log(G / df)
  over the G gallery texts), averaged over n (a text without a weighted n-gram has similarity 0). Scores within
  :data:`TIE_TOLERANCE` of the best count as ties and go to the nearer neighbour; k = 1 (or a gallery of one) is
  ``nearest``; k is capped at G.

With ``eval.caption_retrieval_grid`` (a list of k), k is chosen on the **validation** split instead: each k's
SumCAP on the first ``eval.caption_items`` validation images (k = 1 is ``nearest``; the first k on a tie), made by
``kaleido calibrate`` and kept in the retrieval model's calibration record (:mod:`kaleido_bert.model.calibration`)
so the evaluation and the service read the same k (:func:`caption_k`; ``eval.caption_retrieval_k`` when the record
has no choice).

Shapes: query embeddings ``(Q, D)``, gallery embeddings ``(G, D)``, neighbour indices ``(Q, k)``, chosen ``(Q,)``.
:func:`evaluate_caption_retrieval` scores both methods with :func:`~kaleido_bert.eval.caption_metrics.caption_metrics`
on a run's retrieval model (``eval.caption_retrieval_k``); :class:`~kaleido_bert.eval.baseline.FrozenBaseline`'s
captions are :func:`nearest_descriptions` of its own embeddings.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kaleido_bert.errors import KaleidoError

if TYPE_CHECKING:
    from kaleido_bert.config import RunConfig
    from kaleido_bert.data.catalogue import Catalogue
    from kaleido_bert.eval.caption_metrics import CaptionScorer
    from kaleido_bert.patches.store import FeatureStore

MAX_N = 4
"""The longest n-gram of the consensus similarity."""
TIE_TOLERANCE = 1e-9
"""Consensus scores this close to the best are ties (they go to the nearer neighbour)."""
_CHUNK = 512  # query rows per similarity block: (512, G) float32


# ---------------------------------------------------------------------------------------------- neighbours
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check(query_emb: np.ndarray, gallery_emb: np.ndarray, texts: list[str] | None = None) -> None:
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise KaleidoError(f"caption retrieval needs (Q, D) queries and (G, D) gallery embeddings, got "
                           f"{tuple(query_emb.shape)} and {tuple(gallery_emb.shape)}")
    if len(gallery_emb) == 0:
        raise KaleidoError("caption retrieval needs a non-empty gallery of training descriptions")
    if texts is not None and len(texts) != len(gallery_emb):
        raise KaleidoError(f"caption retrieval got {len(texts)} gallery texts for {len(gallery_emb)} embeddings")


def nearest_neighbours(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int) -> np.ndarray:
    """The ``min(k, G)`` gallery rows most cosine-similar to each query, nearest first (ties → lower row): ``(Q, k)``."""
    query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
    _check(query_emb, gallery_emb)
    if k < 1:
        raise KaleidoError(f"caption retrieval needs k ≥ 1, got {k}")
    k = min(k, len(gallery_emb))
    gallery = _unit(gallery_emb)
    out = np.empty((len(query_emb), k), np.int64)
    for lo in range(0, len(query_emb), _CHUNK):
        sims = _unit(query_emb[lo:lo + _CHUNK]) @ gallery.T
        out[lo:lo + _CHUNK] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out


def nearest_descriptions(query_emb: np.ndarray, gallery_emb: np.ndarray, texts: list[str]) -> list[str]:
    """Each query's caption = the text of its most cosine-similar gallery row (ties → the lower row)."""
    _check(np.asarray(query_emb), np.asarray(gallery_emb), texts)
    return [texts[j] for j in nearest_neighbours(query_emb, gallery_emb, 1)[:, 0]]


# ---------------------------------------------------------------------------------------------- consensus
def words(text: str) -> list[str]:
    """The consensus similarity's tokens: lower-cased ``\\w+`` runs."""
    return re.findall(r"\w+", text.lower())


class NgramSimilarity:
    """CIDEr-like similarity between the texts of a gallery: mean over n = 1…4 of n-gram TF-IDF cosines.

    Args:
        texts: the G gallery texts; they give the IDF (log(G / document frequency)).
    """

    def __init__(self, texts: list[str]) -> None:
        from scipy import sparse

        tokens = [words(t) for t in texts]
        blocks = []
        for n in range(1, MAX_N + 1):
            counts = [Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1)) for w in tokens]
            df = Counter(g for c in counts for g in c)
            vocab = {g: j for j, g in enumerate(df)}
            rows, cols, vals = [], [], []
            for r, c in enumerate(counts):
                weights = {vocab[g]: tf * math.log(len(texts) / df[g]) for g, tf in c.items()}
                norm = math.sqrt(sum(v * v for v in weights.values()))
                if norm > 0:
                    for j, v in weights.items():
                        rows.append(r)
                        cols.append(j)
                        vals.append(v / norm / math.sqrt(MAX_N))  # so one dot product = the mean of the cosines
            blocks.append(sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), len(vocab))))
        self.vectors = sparse.hstack(blocks, format="csr")
        """``(G, V)``: the per-n unit TF-IDF vectors side by side, each scaled by 1/√4."""

    def pairwise(self, rows: np.ndarray) -> np.ndarray:
        """Similarities between gallery ``rows``: ``(k,)`` → ``(k, k)`` float64 in [0, 1]."""
        sub = self.vectors[np.asarray(rows, np.int64)]
        return np.asarray((sub @ sub.T).todense(), np.float64)


def consensus_rows(query_emb: np.ndarray, gallery_emb: np.ndarray, texts: list[str], k: int) -> np.ndarray:
    """The gallery row chosen for each query by consensus among its k nearest neighbours: ``(Q,)``."""
    query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
    _check(query_emb, gallery_emb, texts)
    neighbours = nearest_neighbours(query_emb, gallery_emb, k)
    if neighbours.shape[1] == 1:
        return neighbours[:, 0].copy()
    similarity = NgramSimilarity(texts)
    return np.array([consensus_pick(rows, similarity) for rows in neighbours], np.int64)


def consensus_pick(rows: np.ndarray, similarity: NgramSimilarity) -> int:
    """The consensus among one query's neighbours ``rows`` ``(k,)``, nearest first: the row whose text has the
    highest mean similarity to the other k − 1 (ties → the nearer); a single row is itself."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 1:
        return int(rows[0])
    sims = similarity.pairwise(rows)
    score = (sims.sum(1) - np.diag(sims)) / (len(rows) - 1)  # mean similarity to the other candidates
    return int(rows[int(np.flatnonzero(score >= score.max() - TIE_TOLERANCE)[0])])


def consensus_descriptions(query_emb: np.ndarray, gallery_emb: np.ndarray, texts: list[str], k: int) -> list[str]:
    """Each query's caption = the consensus text of its k nearest gallery rows (see the module docstring)."""
    return [texts[j] for j in consensus_rows(query_emb, gallery_emb, texts, k)]


# ---------------------------------------------------------------------------------------------- the protocol
def evaluate_caption_retrieval(checkpoint: Path, config: RunConfig, *, k: int, scorer: CaptionScorer,
                               progress: bool, data: tuple[Catalogue, FeatureStore] | None = None,
                               gallery: CaptionGallery | None = None) -> dict[str, Any]:
    """FC by retrieval with a run's dual encoder: ``nearest`` and ``consensus`` (k) captions of the FC items.

    Args:
        checkpoint: the retrieval model (a pre-training or retrieval fine-tuned checkpoint).
        config: the run config (``eval.split``, ``eval.caption_items``, ``eval.batch_size``).
        k: candidates of the consensus (≥ 1).
        scorer: an open :class:`~kaleido_bert.eval.caption_metrics.CaptionScorer`.
        data: the open catalogue and feature store (opened from ``config`` when None).
        gallery: the checkpoint's :func:`caption_gallery`, already embedded (embedded here when None).

    Returns:
        ``{"items", "nearest": metrics, "consensus": metrics, "examples": {method: {id: caption}}}``, each
        metrics dict as :func:`~kaleido_bert.eval.caption_metrics.caption_metrics` plus ``seconds`` (the nearest
        method's include embedding gallery and queries) and ``gallery`` (training descriptions) or ``k``.

    Raises:
        KaleidoError: no training product or no FC item has features.
    """
    from kaleido_bert.eval.caption_metrics import caption_metrics

    start = time.perf_counter()
    gallery = gallery or caption_gallery(checkpoint, config, data=data, progress=progress)
    texts, gallery_emb = gallery.texts, gallery.embeddings
    items, query_emb = gallery.queries(config.eval.split, config.eval.caption_items)
    if not items:
        raise KaleidoError(f"caption retrieval: the {config.eval.split} split has no items with features")
    references = {it.id: [it.description] for it in items}
    out: dict[str, Any] = {"items": len(items), "examples": {}}
    for name, choose in (("nearest", lambda: nearest_descriptions(query_emb, gallery_emb, texts)),
                         ("consensus", lambda: consensus_descriptions(query_emb, gallery_emb, texts, k))):
        captions = choose()
        hyps = {it.id: caption for it, caption in zip(items, captions, strict=True)}
        out[name] = caption_metrics(references, hyps, scorer=scorer)
        out[name]["seconds"] = time.perf_counter() - start
        out["examples"][name] = {key: hyps[key] for key in list(hyps)[:8]}
        start = time.perf_counter()
    out["nearest"]["gallery"] = len(texts)
    out["consensus"]["k"] = min(k, len(texts))
    out["examples"]["reference"] = {key: references[key][0] for key in list(references)[:8]}
    return out


@dataclass
class CaptionGallery:
    """The training descriptions a retrieval model captions from, embedded once and shared by the choice of k on
    validation and the test protocol.

    Attributes:
        texts: the gallery's descriptions ``(G,)`` (one per training product with features, product ids sorted).
        embeddings: their text embeddings ``(G, D)``.
        scorer: the model's :class:`~kaleido_bert.eval.retrieval.PairScorer`, which embeds the queries.
        catalogue, store: the open catalogue and feature store.
    """

    texts: list[str]
    embeddings: np.ndarray
    scorer: Any
    catalogue: Catalogue
    store: FeatureStore

    def queries(self, split: str, limit: int) -> tuple[list[Any], np.ndarray]:
        """The first ``limit`` (0 = all) captioned items of ``split`` and their image embeddings ``(Q, D)``
        (no items: nothing is embedded)."""
        from kaleido_bert.inputs.downstream import CaptionDataset

        encoder = self.scorer.encoder
        dataset = CaptionDataset(self.catalogue, self.store, encoder.tokenizer, split=split,
                                 max_text_len=encoder.max_text_len)
        items = dataset.items[:limit or None]
        if not items:
            return [], np.empty((0, 0))
        return items, self.scorer.embed_images([it.id for it in items], progress=False)


def caption_gallery(checkpoint: str | Path, config: RunConfig, *, data: tuple[Catalogue, FeatureStore] | None = None,
                    progress: bool = False) -> CaptionGallery:
    """Load the retrieval model of ``checkpoint`` and embed its caption gallery (the training descriptions).

    Raises:
        KaleidoError: no training product has features.
    """
    from kaleido_bert import distributed as dist
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions

    catalogue, store = data or open_data(config)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, device=dist.device())
    gallery = product_descriptions(it for it in catalogue.split("train") if it.id in store)
    if not gallery:
        raise KaleidoError("caption retrieval needs training products with features: the train split has none")
    pids = sorted(gallery)
    scorer = PairScorer(encoder, store, gallery)
    return CaptionGallery([gallery[p] for p in pids], scorer.embed_texts(pids, progress=progress), scorer, catalogue,
                          store)


def choose_caption_k(checkpoint: str | Path, config: RunConfig, *, scorer: CaptionScorer, progress: bool,
                     data: tuple[Catalogue, FeatureStore] | None = None,
                     gallery: CaptionGallery | None = None) -> dict[str, Any]:
    """Choose k among ``eval.caption_retrieval_grid`` by validation SumCAP; ``gallery``: the checkpoint's
    :func:`caption_gallery` (embedded here when None).

    Returns:
        ``{"k", "grid": [{"k", "sum_cap"}], "split": "val", "items", "seconds"}``; without validation items with
        features the grid is empty and k is ``eval.caption_retrieval_k``.
    """
    from kaleido_bert.eval.caption_metrics import caption_metrics

    start = time.perf_counter()
    grid: list[dict[str, float]] = []
    gallery = gallery or caption_gallery(checkpoint, config, data=data, progress=progress)
    texts, gallery_emb = gallery.texts, gallery.embeddings
    items, query_emb = gallery.queries("val", config.eval.caption_items)
    if items:
        references = {it.id: [it.description] for it in items}
        for k in config.eval.caption_retrieval_grid:
            rows = consensus_rows(query_emb, gallery_emb, texts, k)
            hyps = {it.id: texts[j] for it, j in zip(items, rows, strict=True)}
            grid.append({"k": int(k), "sum_cap": caption_metrics(references, hyps, scorer=scorer)["sum_cap"]})
    best = max(range(len(grid)), key=lambda j: (grid[j]["sum_cap"], -j)) if grid else None
    return {"k": int(grid[best]["k"]) if best is not None else int(config.eval.caption_retrieval_k), "grid": grid,
            "split": "val", "items": len(items), "seconds": round(time.perf_counter() - start, 1)}


def caption_choice(checkpoint: str | Path, config: RunConfig) -> dict[str, Any] | None:
    """The k choice in ``checkpoint``'s calibration record; None when the record has none or ``config`` asks for
    no choice (``eval.caption_retrieval_grid`` empty).

    Raises:
        KaleidoError: a stale or malformed record, or a missing one where the config asks for a choice (one line).
    """
    from kaleido_bert.model.calibration import CALIBRATION_FILE, current_choice

    choice = current_choice(checkpoint, config, "caption_k") if config.eval.caption_retrieval_grid else None
    if choice is None:
        return None
    k = choice.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise KaleidoError(f"{Path(checkpoint) / CALIBRATION_FILE}: caption_k's k must be a positive integer, got "
                           f"{k!r}: run `kaleido calibrate` again")
    return choice


def caption_k(checkpoint: str | Path, config: RunConfig) -> int:
    """The consensus k of a retrieval model: the one chosen on validation among ``eval.caption_retrieval_grid``
    (:func:`caption_choice`), else ``eval.caption_retrieval_k``."""
    return chosen_k(caption_choice(checkpoint, config), config)


def chosen_k(choice: dict[str, Any] | None, config: RunConfig) -> int:
    """The k of a read :func:`caption_choice` (None: ``eval.caption_retrieval_k``)."""
    return int(choice["k"]) if choice else int(config.eval.caption_retrieval_k)
