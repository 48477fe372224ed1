"""Cross-modal retrieval: the paper's sample-100 protocol (§4.2 tasks 1–2, Table 2) and full-gallery search (beyond the paper).

**Sample-100** (as the released ``run_i2t.sh``/``run_t2i.sh``, no retrieval fine-tuning needed): each query gets its
positive and ``num_negatives`` negatives, drawn from the same sub-category first, then the same category, then
anywhere in the split, then (only when the split is too small) from the other splits; every tier used is counted.
A negative never shares the positive's description (ITR) or image file (TIR), since real catalogues repeat titles.
Candidates are ranked by the raw class-1 ITM logit of the cross-encoder, as the original (or by ``eval.pair_score``;
with ``eval.sample100_shortlist`` = k only each query's top k by the dual encoder are scored, ALBEF/BLIP-style).

    ITR (image → text): query = an image id, candidates = product ids (their descriptions)
    TIR (text → image): query = a product id (its description), candidates = image ids, one per product

**Full gallery**: the same encoder run on text alone and on patches alone (a lone ``[CLS]`` in front) gives
``[CLS]`` embeddings (through the ITC projections when the model has them), exact top-k by inner product with FAISS,
then the top ``rerank_k`` re-ranked by the ITM logit. Every test image is ranked against every test product's
description and vice versa. With a query bank (:mod:`kaleido_bert.eval.query_bank`) the inner product is
``cos − offset(gallery item)``, searched as ``[q, 1] · [g, −offset]``.

Shapes: pairs are scored in batches of B (text ``(B, T)``, patches ``(B, 55, F)``); embeddings are ``(N, D)`` float32,
L2-normalised.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_write_json, read_json
from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.metrics import expected_rank_chance, rank_hits, ranked_recall, sum_r
from kaleido_bert.eval.query_bank import QueryBank, as_queries, with_offsets
from kaleido_bert.model.dual_encoder import DualEncoder, store_patches
from kaleido_bert.patches.store import FeatureStore

PROTOCOL = "sample-100"
TIERS = ("subcategory", "category", "split", "other_splits_subcategory", "other_splits_category", "other_splits")


# ---------------------------------------------------------------------------------------------- candidates
def _tiered_pool(target: Item, products: dict[str, Item], split: str) -> list[tuple[str, list[str]]]:
    """Product ids by tier, nearest first; each product appears in its first tier only."""
    seen: set[str] = {target.product_id}
    tiers = []
    for name in TIERS:
        other = name.startswith("other_splits")
        key = "subcategory" if name.endswith("subcategory") else "category" if name.endswith("category") else None
        pool = [pid for pid, it in products.items() if pid not in seen and (it.split != split) == other
                and (key is None or getattr(it, key) == getattr(target, key))]
        seen.update(pool)
        tiers.append((name, sorted(pool)))
    return tiers


def _draw(target: Item, products: dict[str, Item], split: str, n: int, rng: np.random.Generator,
          accept, sources: Counter) -> list[str]:
    out: list[str] = []
    for tier, pool in _tiered_pool(target, products, split):
        for j in rng.permutation(len(pool)):
            if len(out) == n:
                return out
            if accept(pool[j]):
                out.append(pool[j])
                sources[tier] += 1
    if len(out) < n:
        sources["short"] += n - len(out)
    return out


def build_candidates(catalogue: Catalogue, available: set[str], *, split: str = "test", num_queries: int = 1000,
                     num_negatives: int = 100, seed: int = 0) -> dict[str, Any]:
    """Sample-100 query sets for both directions.

    Args:
        catalogue: the evaluation catalogue.
        available: item ids with features (others are never drawn).
        split: where queries come from (negatives too, topped up from other splits only when it is too small).
        num_queries: queries per direction (all the split has, if fewer).
        num_negatives: negatives per query.
        seed: the draw's seed (written into the file with everything needed to re-use it).

    Returns:
        ``{"protocol", "split", "seed", "num_negatives", "catalogue_hash", "itr": [...], "tir": [...], "sources"}``
        where each query is ``{"query", "positive", "candidates"}`` with the positive first among the candidates.
    """
    items = [it for it in catalogue.items if it.id in available]
    images_of: dict[str, list[Item]] = {}
    for it in items:
        images_of.setdefault(it.product_id, []).append(it)
    products = {pid: group[0] for pid, group in images_of.items()}
    queries = [it for it in items if it.split == split]
    if not queries:
        raise KaleidoError(f"the catalogue has no {split} items with features to evaluate")
    rng = np.random.default_rng(seed)
    sources = {"itr": Counter(), "tir": Counter()}

    itr = []
    for j in sorted(rng.choice(len(queries), min(num_queries, len(queries)), replace=False)):
        query = queries[j]
        text = products[query.product_id].description
        negatives = _draw(query, products, split, num_negatives, rng,
                          lambda pid, text=text: products[pid].description != text, sources["itr"])
        itr.append({"query": query.id, "positive": query.product_id, "candidates": [query.product_id, *negatives]})

    split_products = sorted({it.product_id for it in queries})
    tir = []
    for j in sorted(rng.choice(len(split_products), min(num_queries, len(split_products)), replace=False)):
        pid = split_products[j]
        group = [it for it in images_of[pid] if it.split == split]
        positive = group[int(rng.integers(len(group)))]
        text = products[pid].description

        def accept(other: str, text: str = text, image: str = positive.image) -> bool:
            return products[other].description != text and all(it.image != image for it in images_of[other])

        negatives = _draw(positive, products, split, num_negatives, rng, accept, sources["tir"])
        images = [images_of[n][int(rng.integers(len(images_of[n])))].id for n in negatives]
        tir.append({"query": pid, "positive": positive.id, "candidates": [positive.id, *images]})
    return {"protocol": PROTOCOL, "split": split, "seed": seed, "num_negatives": num_negatives,
            "catalogue_hash": catalogue.hash(), "itr": itr, "tir": tir,
            "sources": {k: dict(v) for k, v in sources.items()}}


def save_candidates(candidates: dict[str, Any], path: str | Path) -> None:
    atomic_write_json(path, candidates)


def load_candidates(path: str | Path, catalogue: Catalogue, available: set[str]) -> dict[str, Any]:
    """Read a candidate file and check every id against the catalogue and the feature store.

    Raises:
        KaleidoError: unreadable file, missing fields, or an id the catalogue (or store) does not know.
    """
    path = Path(path)
    data = read_json(path, dict, what="a sample-100 candidate file (a JSON object)")
    try:
        itr, tir = data["itr"], data["tir"]
        for q in (*itr, *tir):
            q["query"], q["positive"], q["candidates"][0]  # noqa: B018 - the shape of every query, checked once
    except (KeyError, TypeError, IndexError) as err:
        raise KaleidoError(f"candidate file {path} is not a sample-100 file ({type(err).__name__})") from None
    products = {it.product_id for it in catalogue.items}
    for direction, queries, query_ids, cand_ids in (("itr", itr, available, products), ("tir", tir, products, available)):
        for q in queries:
            if q["query"] not in query_ids:
                raise KaleidoError(f"candidate file {path} names unknown {direction} query {q['query']!r}")
            if q["positive"] != q["candidates"][0]:
                raise KaleidoError(f"candidate file {path}: {direction} query {q['query']!r} does not list its "
                                   "positive first")
            for c in q["candidates"]:
                if c not in cand_ids:
                    raise KaleidoError(f"candidate file {path} names unknown {direction} candidate {c!r} "
                                       f"(query {q['query']!r})")
    return data


# ---------------------------------------------------------------------------------------------- scoring


class PairScorer:
    """The protocols' view of a :class:`DualEncoder`: catalogue ids in, ITM logits and embeddings out.

    Args:
        encoder: the retrieval model as a dual encoder and cross-encoder.
        store: the feature store of the evaluated catalogue (image ids → patches).
        descriptions: product id → description (:func:`product_descriptions`).
    """

    def __init__(self, encoder: DualEncoder, store: FeatureStore, descriptions: dict[str, str], *,
                 pair_score: str = "itm") -> None:
        self.encoder, self.store, self.descriptions = encoder, store, descriptions
        self.pair_score = pair_score  # eval.pair_score: "itm" or "itm+itc"

    def _map(self, n: int, fn, desc: str, progress: bool, empty: np.ndarray) -> np.ndarray:
        """``fn(start, stop)`` over batches of ``encoder.batch_size``, shared out over the ranks under torchrun."""
        parts = dist.map_chunks(n, self.encoder.batch_size, fn, desc=desc, progress=progress)
        return np.concatenate([empty, *parts])

    @property
    def has_itc(self) -> bool:
        """Whether the encoder has ITC projections (a dual-encoder space that can shortlist candidates)."""
        return self.encoder.has_itc

    def cosines(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """The dual-encoder cosine of each ``(image id, product id)`` pair, each image and text embedded once:
        ``(N,)`` float64."""
        if not pairs:
            return np.zeros(0)
        images, pids = sorted({i for i, _ in pairs}), sorted({p for _, p in pairs})
        image_emb = dict(zip(images, self.embed_images(images, progress=False), strict=True))
        text_emb = dict(zip(pids, self.embed_texts(pids, progress=False), strict=True))
        return np.array([float(image_emb[i] @ text_emb[p]) for i, p in pairs])

    def itm_logits(self, pairs: list[tuple[str, str]], *, desc: str = "ITM", progress: bool = True,
                   cosine: np.ndarray | None = None) -> np.ndarray:
        """The pair scores of ``(image id, product id)`` pairs, in order: ``(N,)`` float64. ``pair_score = "itm"``:
        the raw class-1 ITM logit; ``"itm+itc"`` (with an ITC head): the ITM log-odds plus the ITC logit
        (scale · the pairs' :meth:`cosines`, or ``cosine`` when given)."""
        if cosine is None:
            fused = self.pair_score == "itm+itc" and self.encoder.has_itc
            cosine = self.cosines(pairs) if fused else np.zeros(len(pairs))

        def score(start: int, stop: int) -> np.ndarray:
            chunk = pairs[start:stop]
            feats, pos = store_patches(self.store, [i for i, _ in chunk])
            return self.encoder.pair_scores([self.descriptions[p] for _, p in chunk], feats, pos,
                                            cosine[start:stop], pair_score=self.pair_score)

        return self._map(len(pairs), score, desc, progress, np.empty(0))

    def embed_texts(self, pids: list[str], *, progress: bool = True) -> np.ndarray:
        """Text-only embeddings of the products' descriptions: ``(N, D)``."""
        texts = [self.descriptions[p] for p in pids]
        return self._map(len(texts), lambda a, b: self.encoder.embed_texts(texts[a:b]), "embed text", progress,
                         np.empty((0, self.encoder.dim), np.float32))

    def embed_images(self, image_ids: list[str], *, progress: bool = True) -> np.ndarray:
        """Patch-only embeddings of store rows: ``(N, D)``."""
        return self._map(len(image_ids),
                         lambda a, b: self.encoder.embed_patches(*store_patches(self.store, image_ids[a:b])),
                         "embed image", progress, np.empty((0, self.encoder.dim), np.float32))


# ---------------------------------------------------------------------------------------------- protocols
SHORTLIST_OFFSET = 1e6
"""What a candidate outside the shortlist loses: more than any pair score (ITM log-odds + a logit ≤ 100) spans."""


def shortlist_scores(scorer: PairScorer, pairs: list[tuple[str, str]], widths: list[int], shortlist: int, *,
                     desc: str, progress: bool) -> np.ndarray:
    """Pair scores of consecutive candidate lists (``widths``: each query's count) where only each list's top
    ``shortlist`` by dual-encoder cosine go through the cross-encoder (ALBEF/BLIP's re-ranking); the rest score
    ``cosine − 1e6``, below every shortlisted pair and in their cosine order. ``(N,)`` float64."""
    cosine = scorer.cosines(pairs)
    keep, start = [], 0
    for n in widths:
        keep.extend(start + np.argsort(-cosine[start:start + n], kind="stable")[:shortlist])
        start += n
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    scores = cosine - SHORTLIST_OFFSET
    scores[keep] = scorer.itm_logits([pairs[i] for i in keep], cosine=cosine[keep], desc=desc, progress=progress)
    return scores


def evaluate_sample100(scorer: PairScorer, candidates: dict[str, Any], *, progress: bool = True,
                       ks: tuple[int, ...] = (1, 5, 10), shortlist: int = 0, rerank: bool = True) -> dict[str, Any]:
    """Rank@K of both directions and SumR, keys named by protocol (``itr_sample100/R@1`` …), in %.

    ``shortlist`` > 0 (``eval.sample100_shortlist``, with an ITC head): each query's candidates are ranked by the
    dual encoder and only its top ``shortlist`` are scored by the cross-encoder (:func:`shortlist_scores`); 0
    scores every candidate, the paper's protocol. ``rerank`` False (with an ITC head): the dual encoder's cosine
    ranks every candidate and the cross-encoder is not run (a model whose validation choice is not to re-rank)."""
    shortlist = shortlist if shortlist and scorer.has_itc else 0
    rerank = rerank or not scorer.has_itc
    metrics: dict[str, Any] = {}
    ranked: dict[str, Any] = {}
    outcomes: dict[str, list] = {}  # per query: P(rank ≤ K) for each K, what a paired bootstrap resamples
    hits_by_direction: dict[str, dict[int, float]] = {}
    for direction in ("itr", "tir"):
        queries = candidates[direction]
        if direction == "itr":
            pairs = [(q["query"], c) for q in queries for c in q["candidates"]]
        else:
            pairs = [(c, q["query"]) for q in queries for c in q["candidates"]]
        desc = f"{direction.upper()} sample-100"
        if not rerank:
            flat = scorer.cosines(pairs)
        elif shortlist:
            flat = shortlist_scores(scorer, pairs, [len(q["candidates"]) for q in queries], shortlist, desc=desc,
                                    progress=progress)
        else:
            flat = scorer.itm_logits(pairs, desc=desc, progress=progress)
        width = max(len(q["candidates"]) for q in queries)
        scores = np.full((len(queries), width), -np.inf)
        positive = np.zeros((len(queries), width), dtype=bool)
        start = 0
        for row, q in enumerate(queries):
            n = len(q["candidates"])
            scores[row, :n], positive[row, 0] = flat[start:start + n], True
            start += n
        per_query: list = []
        hits = rank_hits(scores, positive, ks, per_query_out=per_query)
        hits_by_direction[direction] = hits
        outcomes[direction] = per_query[0].tolist()
        for k in ks:
            metrics[f"{direction}_sample100/R@{k}"] = 100 * hits[k]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        ranked[direction] = [{"query": q["query"], "positive": q["positive"],
                              "top": [q["candidates"][j] for j in order[row] if j < len(q["candidates"])]}
                             for row, q in enumerate(queries)]
    metrics["sample100/SumR"] = sum_r(hits_by_direction["itr"], hits_by_direction["tir"])
    metrics["sample100/queries"] = {d: len(candidates[d]) for d in ("itr", "tir")}
    width = 1 + int(candidates["num_negatives"])
    metrics["sample100/candidates_per_query"] = width
    metrics["sample100/shortlist"] = shortlist
    score = getattr(scorer, "pair_score", "cosine")
    metrics["sample100/ranked_by"] = ("dual encoder" if not rerank else
                                      f"{score} on the dual encoder's top {shortlist}" if shortlist else score)
    chance = {k: expected_rank_chance(width, k) for k in ks}
    metrics["sample100/chance_SumR"] = sum_r(chance, chance)
    return {"metrics": metrics, "ranked": ranked, "outcomes": outcomes}


def _search(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k with FAISS: ``(Q, D) × (G, D)`` → indices ``(Q, k)``."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(gallery)))
    return idx


def _rerank(scorer: PairScorer, top: np.ndarray, pair_of, *, desc: str, progress: bool,
            cosine: np.ndarray | None = None) -> list[list[int]]:
    """Each query's ``top`` ``(Q, k)`` gallery rows re-ordered by the pair score; ``cosine`` ``(Q, k)``: the
    dual-encoder score the pair score uses in place of the pairs' cosine (the query-bank normalised one)."""
    pairs = [pair_of(q, int(g)) for q, row in enumerate(top) for g in row]
    extra = {} if cosine is None else {"cosine": np.asarray(cosine, np.float64).reshape(-1)}
    logits = scorer.itm_logits(pairs, desc=desc, progress=progress, **extra).reshape(top.shape)
    order = np.argsort(-logits, axis=1, kind="stable")
    return [[int(top[q, j]) for j in order[q]] for q in range(len(top))]


def evaluate_gallery(scorer: PairScorer, catalogue: Catalogue, available: set[str], *, split: str = "test",
                     rerank_k: int = 100, progress: bool = True, bank: QueryBank | None = None,
                     cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full-gallery ITR/TIR over a split: dual-encoder recall, then ITM re-ranking of the top ``rerank_k``.

    A description shared word for word by several products counts as correct for all of them (both directions).
    With an active ``bank`` (:mod:`kaleido_bert.eval.query_bank`) the dual-encoder score is the normalised
    ``cos − offset(gallery item)``, in the search and in the re-ranked pairs' ITC logit. ``cache``: a dict that
    keeps the split's embeddings between calls (one embedding for several banks). Keys: ``itr_gallery/R@1`` … and
    ``itr_gallery_rerank/R@1`` …, in %, plus the gallery sizes and ``gallery/query_bank_beta``.
    """
    items = [it for it in catalogue.split(split) if it.id in available]
    if not items:
        raise KaleidoError(f"the catalogue has no {split} items with features to evaluate")
    pids = sorted({it.product_id for it in items})
    text_of = {pid: next(it.description for it in items if it.product_id == pid) for pid in pids}
    same_text: dict[str, set[int]] = {}
    for j, pid in enumerate(pids):
        same_text.setdefault(text_of[pid], set()).add(j)
    image_ids = [it.id for it in items]
    cache = {} if cache is None else cache
    if "text_emb" not in cache:
        cache["text_emb"] = scorer.embed_texts(pids, progress=progress)
        cache["image_emb"] = scorer.embed_images(image_ids, progress=progress)
    text_emb, image_emb = cache["text_emb"], cache["image_emb"]
    text_gallery, image_gallery = text_emb, image_emb
    if bank is not None and bank.active:  # [q, 1] · [g, −offset(g)] = the normalised score
        text_gallery = with_offsets(text_emb, bank.text_offsets(text_emb))
        image_gallery = with_offsets(image_emb, bank.image_offsets(image_emb))
        text_emb, image_emb = as_queries(text_emb), as_queries(image_emb)
    depth = max(10, rerank_k)
    metrics: dict[str, Any] = {"gallery/images": len(image_ids), "gallery/products": len(pids),
                               "gallery/query_bank_beta": bank.beta if bank is not None else 0.0}
    outcomes: dict[str, list] = {}  # per query: hit at each K (0/1)

    images_with_text: dict[str, set[int]] = {}
    for i, it in enumerate(items):
        images_with_text.setdefault(text_of[it.product_id], set()).add(i)
    itr_pos = [same_text[text_of[it.product_id]] for it in items]
    tir_pos = [images_with_text[text_of[pid]] for pid in pids]
    for direction, queries, gallery, positives, pair_of in (
        ("itr", image_emb, text_gallery, itr_pos, lambda q, g: (image_ids[q], pids[g])),
        ("tir", text_emb, image_gallery, tir_pos, lambda q, g: (image_ids[g], pids[q])),
    ):
        top = _search(queries, gallery, depth)
        per_query: list = []
        for name, value in ranked_recall(top.tolist(), positives, per_query_out=per_query).items():
            metrics[f"{direction}_gallery/{name}"] = 100 * value
        outcomes[f"{direction}_gallery"] = per_query[0].tolist()
        if rerank_k > 0:
            head = top[:, :rerank_k]
            normalised = (np.einsum("qd,qkd->qk", queries, gallery[head]) if bank is not None and bank.active
                          else None)  # the pairs' normalised ITC score
            reranked = [r + [int(g) for g in top[q, rerank_k:]]
                        for q, r in enumerate(_rerank(scorer, head, pair_of, desc=f"{direction.upper()} re-rank",
                                                      progress=progress, cosine=normalised))]
            per_query = []
            for name, value in ranked_recall(reranked, positives, per_query_out=per_query).items():
                metrics[f"{direction}_gallery_rerank/{name}"] = 100 * value
            outcomes[f"{direction}_gallery_rerank"] = per_query[0].tolist()
    return {"metrics": metrics, "outcomes": outcomes}
