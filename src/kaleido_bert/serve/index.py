"""A FAISS index over product embeddings for the search service: exact, IVF or HNSW, with string ids.

The embeddings are L2-normalised, so the inner product the index ranks by is the cosine similarity.
Three kinds:

* ``exact``: ``IndexFlatIP``, brute force; the reference the other two are measured against.
* ``ivf``: ``IndexIVFFlat`` with about √N inverted lists, trained (k-means) on the vectors of the first build;
  later :meth:`ProductIndex.add` calls reuse those centroids. ``nprobe`` lists are searched per query.
* ``hnsw``: ``IndexHNSWFlat`` with the inner-product metric (``M`` links per node, ``ef_search`` candidates).

With per-vector ``offsets`` (:mod:`kaleido_bert.eval.query_bank`: one number per gallery vector that a query-bank
normalisation subtracts) the index holds ``[g, −offset(g)]``, one column wider, and a query ``q`` searches as
``[q, 1]``, so every kind ranks by ``cos − offset``; ``normalised=False`` searches as ``[q, 0]``, by the cosine.

FAISS numbers vectors 0, 1, 2, ... in the order they are added; :class:`ProductIndex` keeps the matching list of
string ids. A search can be limited to a set of allowed ids (e.g. one category): FAISS skips the others through
an ``IDSelector``, and a query that still finds fewer than ``k`` allowed results (an approximate index can miss
them) is answered by exact scoring over the allowed vectors, so it gets ``k`` results whenever ``k`` exist.

On disk an index is a directory, written atomically::

    index.faiss   faiss.write_index
    ids.json      the string ids in FAISS order
    meta.json     the caller's meta (including ``config_hash``) plus an ``index`` section: kind, dim (FAISS's,
                  with the offset column), offsets, count, search parameters and the FAISS version
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from kaleido_bert.atomic import atomic_directory, atomic_write_json, read_json
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.query_bank import as_queries, with_offsets

IndexKind = Literal["exact", "ivf", "hnsw"]
KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
META_FILE = "meta.json"
NORM_TOLERANCE = 1e-3
"""How far from 1 an embedding's L2 norm may be."""


class ProductIndexError(KaleidoError):
    """A bad index argument, a duplicate id, or an index directory that is missing, damaged or mismatched."""


def default_nlist(n: int) -> int:
    """About √n inverted lists, but never fewer than 39 training vectors per list (FAISS's k-means minimum)."""
    return max(1, min(round(math.sqrt(n)), n // 39))


class ProductIndex:
    """Product embeddings in a FAISS index, searchable by inner product and addressed by string ids.

    Build one with :meth:`build` or read one with :meth:`load`; the constructor is internal.
    """

    def __init__(self, index: faiss.Index, ids: list[str], kind: str, meta: Mapping[str, Any], *,
                 offsets: bool = False) -> None:
        self._index = index
        self.offsets = offsets
        """Whether the vectors carry an offset column (the last), subtracted from every inner product."""
        self._ids = list(ids)
        self._pos = {id_: i for i, id_ in enumerate(self._ids)}
        self.kind = kind
        self.meta: dict[str, Any] = dict(meta)
        """The caller's metadata (saved to meta.json), e.g. ``config_hash``, model and catalogue facts."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        ids: list[str],
        embeddings: np.ndarray,
        *,
        kind: IndexKind = "exact",
        meta: Mapping[str, Any] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        offsets: np.ndarray | None = None,
    ) -> ProductIndex:
        """Build an index over ``embeddings`` (row ``i`` belongs to ``ids[i]``).

        Args:
            ids: unique, non-empty product (or image) ids.
            embeddings: (N, D) L2-normalised vectors; converted to contiguous float32.
            kind: ``exact``, ``ivf`` or ``hnsw`` (see the module docstring).
            meta: metadata saved with the index; include ``config_hash`` so :meth:`load` can check it.
            nlist: IVF lists (default :func:`default_nlist` of N); IVF needs at least ``nlist`` vectors.
            nprobe: IVF lists searched per query (default a quarter of ``nlist``, at least 1; unclustered
                vectors need more: about half for recall@10 ≥ 0.9 on uniform random vectors).
            hnsw_m: HNSW links per node.
            ef_construction: HNSW candidates while inserting.
            ef_search: HNSW candidates while searching (at least ``k`` are used).
            offsets: ``(N,)`` finite numbers subtracted from each vector's scores (then every :meth:`add` needs
                them too); None: plain inner products.

        Raises:
            ProductIndexError: an unknown kind, mismatched or malformed ids/embeddings, a duplicate id, or
                too few vectors to train IVF.
        """
        if kind not in KINDS:
            raise ProductIndexError(f"unknown index kind {kind!r} (choose {', '.join(KINDS)})")
        meta = dict(meta or {})
        if "index" in meta:
            raise ProductIndexError("meta must not contain the key 'index' (the index's own facts are kept there)")
        vectors = _check_embeddings(ids, embeddings, dim=None)
        if vectors.shape[1] == 0:
            raise ProductIndexError("embeddings have 0 dimensions")
        if offsets is not None:
            vectors = _with_offsets(ids, vectors, offsets)
        n, dim = vectors.shape
        if kind == "exact":
            index: faiss.Index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            if hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
                raise ProductIndexError("hnsw_m must be ≥ 2 and ef_construction, ef_search ≥ 1")
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        else:
            nlist = default_nlist(n) if nlist is None else nlist
            if n == 0 or not 1 <= nlist <= n:
                raise ProductIndexError(
                    f"an IVF index trains on its first build: need ≥ nlist ({nlist}) vectors, got {n}"
                )
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct() for the filtered fallback
            index.train(vectors)
            index.nprobe = nprobe if nprobe is not None else max(1, nlist // 4)
            if not 1 <= index.nprobe <= nlist:
                raise ProductIndexError(f"nprobe must be between 1 and nlist ({nlist}), got {index.nprobe}")
        self = cls(index, [], kind, meta, offsets=offsets is not None)
        self._add(ids, vectors)
        return self

    def add(self, ids: list[str], embeddings: np.ndarray, *, offsets: np.ndarray | None = None) -> None:
        """Append vectors with new ids (an IVF index keeps the centroids of its first build); ``offsets``
        ``(N,)`` exactly when the index was built with them.

        Raises:
            ProductIndexError: a duplicate id (within ``ids`` or already indexed), a dimension mismatch, vectors
                that are not finite and L2-normalised, or offsets missing, unexpected or malformed; nothing is
                added then.
        """
        vectors = _check_embeddings(ids, embeddings, dim=self.dim)
        if (offsets is not None) != self.offsets:
            raise ProductIndexError("this index holds offsets: pass offsets= with the vectors" if self.offsets
                                    else "this index was built without offsets: offsets= cannot be added to it")
        self._add(ids, _with_offsets(ids, vectors, offsets) if offsets is not None else vectors)

    def _add(self, ids: list[str], vectors: np.ndarray) -> None:
        for id_ in ids:
            if id_ in self._pos:
                raise ProductIndexError(f"duplicate id {id_!r}: it is already in the index")
        if len(ids):
            self._index.add(vectors)
        for id_ in ids:
            self._pos[id_] = len(self._ids)
            self._ids.append(id_)

    # ------------------------------------------------------------------ facts

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pos

    @property
    def ids(self) -> list[str]:
        """The string ids in FAISS order (a copy)."""
        return list(self._ids)

    @property
    def dim(self) -> int:
        """The embeddings' width (without the offset column)."""
        return int(self._index.d) - int(self.offsets)

    @property
    def params(self) -> dict[str, int]:
        """The kind's search/build parameters (``nlist``/``nprobe`` or ``M``/``ef_*``)."""
        if self.kind == "ivf":
            return {"nlist": int(self._index.nlist), "nprobe": int(self._index.nprobe)}
        if self.kind == "hnsw":
            hnsw = self._index.hnsw
            return {
                "M": int(hnsw.nb_neighbors(1)),
                "ef_construction": int(hnsw.efConstruction),
                "ef_search": int(hnsw.efSearch),
            }
        return {}

    @property
    def nprobe(self) -> int | None:
        """IVF lists searched per query (None for other kinds); settable."""
        return int(self._index.nprobe) if self.kind == "ivf" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ProductIndexError(f"nprobe applies to an IVF index, not {self.kind}")
        if not 1 <= value <= self._index.nlist:
            raise ProductIndexError(f"nprobe must be between 1 and nlist ({self._index.nlist}), got {value}")
        self._index.nprobe = int(value)

    @property
    def ef_search(self) -> int | None:
        """HNSW candidates per query (None for other kinds); settable."""
        return int(self._index.hnsw.efSearch) if self.kind == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.kind != "hnsw":
            raise ProductIndexError(f"ef_search applies to an HNSW index, not {self.kind}")
        if value < 1:
            raise ProductIndexError(f"ef_search must be ≥ 1, got {value}")
        self._index.hnsw.efSearch = int(value)

    # ------------------------------------------------------------------ search

    def search(
        self, queries: np.ndarray, k: int, *, allowed: Iterable[str] | None = None, normalised: bool = True
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` best ids by inner product (minus each vector's offset) for each query, best first.

        Args:
            queries: (Q, D) L2-normalised vectors (a single (D,) vector is taken as Q = 1).
            k: results per query (fewer only when fewer vectors, or allowed ids, exist).
            allowed: only ids in this set are returned (unknown ids are ignored); None allows all.
            normalised: with offsets, rank by ``cos − offset``; False ranks by the cosine alone.

        Returns:
            For each query, a list of ``(id, score)`` sorted by descending score.

        Raises:
            ProductIndexError: ``k`` < 1 or queries of the wrong shape or dimension.
        """
        if not isinstance(k, int | np.integer) or k < 1:
            raise ProductIndexError(f"k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ProductIndexError(f"queries must have shape (Q, {self.dim}), got {tuple(np.shape(queries))}")
        if not np.isfinite(q).all():
            raise ProductIndexError("queries contain NaN or infinite values")
        if self.offsets:  # [q, 1] · [g, −offset] = cos − offset; [q, 0] · … = cos
            q = np.ascontiguousarray(as_queries(q, float(normalised)))
        if allowed is None:
            positions = None
            pool = len(self)
        else:
            positions = np.array(sorted({self._pos[i] for i in allowed if i in self._pos}), dtype=np.int64)
            pool = positions.size
        k_eff = min(int(k), pool)
        if k_eff == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        params = None
        if positions is not None and pool < len(self):
            params = self._search_params(faiss.IDSelectorBatch(positions))
        scores, labels = self._index.search(q, k_eff, params=params)
        out = []
        for row in range(len(q)):
            found = labels[row] >= 0
            if found.sum() < k_eff:  # an approximate index missed some: score the pool exactly
                s, lab = self._exact(q[row], k_eff, positions)
            else:
                s, lab = scores[row], labels[row]
            out.append([(self._ids[int(i)], float(v)) for v, i in zip(s, lab, strict=True) if i >= 0])
        return out

    def _search_params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(self._index.nprobe))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(self._index.hnsw.efSearch))
        else:
            params = faiss.SearchParameters(sel=selector)
        params._selector = selector  # keep the selector alive as long as the parameters
        return params

    def _exact(self, query: np.ndarray, k: int, positions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-``k`` over ``positions`` (all vectors when None), 65,536 vectors at a time."""
        pool = np.arange(len(self), dtype=np.int64) if positions is None else positions
        best_s, best_i = np.empty(0, np.float32), np.empty(0, np.int64)
        for start in range(0, pool.size, 65536):
            chunk = pool[start : start + 65536]
            s = self._index.reconstruct_batch(chunk) @ query
            best_s, best_i = np.concatenate([best_s, s]), np.concatenate([best_i, chunk])
            if best_s.size > k:
                keep = np.argpartition(-best_s, k - 1)[:k]
                best_s, best_i = best_s[keep], best_i[keep]
        order = np.lexsort((best_i, -best_s))[:k]
        return best_s[order], best_i[order]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write index.faiss, ids.json and meta.json into ``directory``, atomically as a whole.

        Args:
            directory: the index directory (created; an empty one is fine).
            overwrite: replace an existing index there (a non-empty directory that is not an index is never
                replaced).

        Returns:
            The directory.

        Raises:
            KaleidoError: ``directory`` is not empty and ``overwrite`` is false, or it is not an index.
        """
        directory = Path(directory)
        if overwrite and directory.is_dir() and any(directory.iterdir()) and not (directory / INDEX_FILE).is_file():
            raise ProductIndexError(f"{directory} is not empty and holds no {INDEX_FILE}: refusing to replace it")
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            atomic_write_json(tmp / IDS_FILE, self._ids)
            facts = {"kind": self.kind, "dim": int(self._index.d), "offsets": self.offsets, "count": len(self),
                     "params": self.params, "faiss_version": faiss.__version__}
            atomic_write_json(tmp / META_FILE, {**self.meta, "index": facts})
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, expect_hash: str | None = None) -> ProductIndex:
        """Read an index directory written by :meth:`save`.

        Args:
            directory: the index directory.
            expect_hash: the ``config_hash`` the caller's model/config has; a different (or missing) stored hash
                is refused. None skips the check.

        Raises:
            ProductIndexError: a missing or damaged file, a count/dimension mismatch, or a config hash mismatch
                (one line, names the directory).
        """
        directory = Path(directory)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (directory / name).is_file():
                raise ProductIndexError(f"{directory} is not a product index: {name} not found")
        meta = read_json(directory / META_FILE, dict, error=ProductIndexError)
        facts = meta.pop("index", None)
        if not isinstance(facts, dict) or facts.get("kind") not in KINDS:
            raise ProductIndexError(f"{directory / META_FILE}: missing or invalid 'index' section")
        if expect_hash is not None and meta.get("config_hash") != expect_hash:
            stored = meta.get("config_hash")
            raise ProductIndexError(
                f"index {directory} was built for config hash {stored or '(none)'}, not {expect_hash}: rebuild it"
            )
        ids = read_json(directory / IDS_FILE, list, error=ProductIndexError)
        if not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise ProductIndexError(f"{directory / IDS_FILE}: ids must be unique strings")
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as err:
            problem = _first_line(err)
            raise ProductIndexError(f"{directory / INDEX_FILE}: not a readable FAISS index ({problem})") from None
        if index.ntotal != len(ids) or index.d != facts.get("dim"):
            raise ProductIndexError(
                f"index {directory} is inconsistent: {index.ntotal} vectors of dim {index.d}, "
                f"{len(ids)} ids, meta says dim {facts.get('dim')}"
            )
        if facts["kind"] == "ivf" and index.direct_map.type == faiss.DirectMap.NoMap:
            index.make_direct_map()  # read_index returns the concrete IndexIVFFlat
        return cls(index, ids, facts["kind"], meta, offsets=bool(facts.get("offsets", False)))


def _check_embeddings(ids: list[str], embeddings: np.ndarray, *, dim: int | None) -> np.ndarray:
    """Validate ids and (N, D) finite, L2-normalised embeddings; return them as contiguous float32."""
    if isinstance(ids, str) or not all(isinstance(i, str) and i for i in ids):
        raise ProductIndexError("ids must be a list of non-empty strings")
    seen: set[str] = set()
    for id_ in ids:
        if id_ in seen:
            raise ProductIndexError(f"duplicate id {id_!r} in the ids being added")
        seen.add(id_)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ProductIndexError(f"embeddings must have shape ({len(ids)}, D) for {len(ids)} ids, got {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ProductIndexError(f"embeddings have dimension {vectors.shape[1]}, the index has {dim}")
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise ProductIndexError(f"embedding of id {ids[bad]!r} contains NaN or infinite values")
    if len(vectors):
        norms = np.linalg.norm(vectors, axis=1)
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            bad = int(np.flatnonzero(off)[0])
            raise ProductIndexError(f"embedding of id {ids[bad]!r} has L2 norm {norms[bad]:.4f}; normalise it to 1")
    return vectors


def _with_offsets(ids: list[str], vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``[g, −offset(g)]``: checked ``(N, D)`` vectors and ``(N,)`` finite offsets → ``(N, D + 1)`` float32."""
    found = np.asarray(offsets, dtype=np.float32)
    if found.shape != (len(ids),):
        raise ProductIndexError(f"offsets must have shape ({len(ids)},) for {len(ids)} ids, got {found.shape}")
    if not np.isfinite(found).all():
        bad = int(np.flatnonzero(~np.isfinite(found))[0])
        raise ProductIndexError(f"offset of id {ids[bad]!r} is NaN or infinite")
    return np.ascontiguousarray(with_offsets(vectors, found))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:100]
