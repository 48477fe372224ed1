"""ProductIndex: exact search is brute force, IVF/HNSW recall, incremental adds, filters, save/load, hashes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu (the serve extra) is not installed")

from kaleido_bert.errors import KaleidoError  # noqa: E402
from kaleido_bert.serve.index import ProductIndex, ProductIndexError, default_nlist  # noqa: E402


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_for(n: int, start: int = 0) -> list[str]:
    return [f"item-{i:05d}" for i in range(start, start + n)]


@pytest.fixture(scope="module")
def data() -> tuple[list[str], np.ndarray, np.ndarray]:
    return ids_for(2000), unit_vectors(2000, 32, seed=1), unit_vectors(50, 32, seed=2)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, ids: list[str]) -> list[list[tuple[str, float]]]:
    scores = q @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(ids[j], float(scores[r, j])) for j in row] for r, row in enumerate(order)]


def recall(found: list[list[tuple[str, float]]], truth: list[list[tuple[str, float]]]) -> float:
    overlaps = [len({i for i, _ in f} & {i for i, _ in t}) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(overlaps))


def test_exact_search_equals_brute_force(data):
    ids, x, q = data
    index = ProductIndex.build(ids, x, kind="exact", meta={"config_hash": "h"})
    found = index.search(q, 10)
    truth = brute_force(x, q, 10, ids)
    for f, t in zip(found, truth, strict=True):
        assert [i for i, _ in f] == [i for i, _ in t]
        np.testing.assert_allclose([s for _, s in f], [s for _, s in t], rtol=0, atol=1e-5)
    assert len(index) == 2000 and index.ids == ids and index.dim == 32 and "item-00007" in index


@pytest.mark.parametrize(("kind", "options"), [("ivf", {"nprobe": 24}), ("hnsw", {})])
def test_approximate_kinds_recall_at_10(data, kind, options):
    # Uniform random vectors have no clusters, the worst case for IVF: it needs about half its lists here.
    ids, x, q = data
    index = ProductIndex.build(ids, x, kind=kind, **options)
    assert recall(index.search(q, 10), brute_force(x, q, 10, ids)) >= 0.9
    if kind == "ivf":
        assert index.params == {"nlist": default_nlist(2000), "nprobe": 24} and default_nlist(2000) == 45
        index.nprobe = index.params["nlist"]  # every list: exact
        assert recall(index.search(q, 10), brute_force(x, q, 10, ids)) == 1.0
    else:
        assert index.params == {"M": 32, "ef_construction": 80, "ef_search": 64}


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_incremental_add_equals_building_at_once(data, kind):
    ids, x, q = data
    options = {"nlist": 20, "nprobe": 20} if kind == "ivf" else {}
    whole = ProductIndex.build(ids, x, kind=kind, **options)
    parts = ProductIndex.build(ids[:1200], x[:1200], kind=kind, **options)
    parts.add(ids[1200:1700], x[1200:1700])
    parts.add(ids[1700:], x[1700:])
    parts.add([], np.zeros((0, 32), np.float32))
    assert parts.ids == whole.ids and len(parts) == 2000
    a, b = parts.search(q, 10), whole.search(q, 10)
    if kind == "hnsw":  # graph built in another order: same neighbours, not necessarily bit-identical
        assert recall(a, b) >= 0.95
    else:  # exact, and IVF with every list probed (trained on the first 1,200 vectors)
        assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]


def test_duplicate_ids_are_refused(data):
    ids, x, _ = data
    index = ProductIndex.build(ids[:10], x[:10])
    with pytest.raises(ProductIndexError, match="duplicate id 'item-00003': it is already in the index"):
        index.add(["item-00100", "item-00003"], x[10:12])
    assert len(index) == 10 and "item-00100" not in index  # nothing was added
    with pytest.raises(ProductIndexError, match="duplicate id 'a' in the ids being added"):
        ProductIndex.build(["a", "b", "a"], x[:3])


def test_bad_embeddings_are_refused(data):
    ids, x, _ = data
    with pytest.raises(ProductIndexError, match=r"shape \(3, D\)"):
        ProductIndex.build(ids[:3], x[:2])
    with pytest.raises(ProductIndexError, match="L2 norm 2.0000; normalise it"):
        ProductIndex.build(ids[:3], x[:3] * 2)
    with pytest.raises(ProductIndexError, match="NaN"):
        ProductIndex.build(ids[:3], np.full((3, 32), np.nan, np.float32))
    index = ProductIndex.build(ids[:3], x[:3])
    with pytest.raises(ProductIndexError, match="dimension 16, the index has 32"):
        index.add(["z"], unit_vectors(1, 16, 0))
    with pytest.raises(ProductIndexError, match="unknown index kind"):
        ProductIndex.build(ids[:3], x[:3], kind="lsh")
    with pytest.raises(ProductIndexError, match="need ≥ nlist"):
        ProductIndex.build(ids[:3], x[:3], kind="ivf", nlist=5)
    with pytest.raises(ProductIndexError, match="k must be a positive integer"):
        index.search(x[:1], 0)
    with pytest.raises(ProductIndexError, match=r"shape \(Q, 32\)"):
        index.search(np.zeros((1, 8), np.float32), 3)
    assert isinstance(ProductIndexError("x"), KaleidoError)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_allowed_filter(data, kind):
    ids, x, q = data
    index = ProductIndex.build(ids, x, kind=kind, **({"nprobe": 24} if kind == "ivf" else {}))
    allowed = set(ids[::7]) | {"not-indexed"}
    positions = [i for i, id_ in enumerate(ids) if id_ in allowed]
    truth = brute_force(x[positions], q, 10, [ids[i] for i in positions])
    found = index.search(q, 10, allowed=allowed)
    assert all(len(r) == 10 and {i for i, _ in r} <= allowed for r in found)
    assert recall(found, truth) >= (1.0 if kind == "exact" else 0.9)
    # a tiny allowed set: exactly those, best first, even where the approximate index misses them (IVF with
    # one probed list cannot see most of them: the exact fallback answers)
    few = [3, 1500, 999]
    truth = brute_force(x[few], q[:5], 3, [ids[i] for i in few])
    for probe in [None] + ([1] if kind == "ivf" else []):
        if probe:
            index.nprobe = probe
        found = index.search(q[:5], 10, allowed={ids[i] for i in few})
        assert [[i for i, _ in r] for r in found] == [[i for i, _ in r] for r in truth]
        np.testing.assert_allclose([[s for _, s in r] for r in found], [[s for _, s in r] for r in truth], atol=1e-5)
    assert index.search(q[:2], 5, allowed=set()) == [[], []]
    assert index.search(q[:2], 5, allowed={"unknown"}) == [[], []]


def test_k_larger_than_the_index(data):
    ids, x, q = data
    index = ProductIndex.build(ids[:4], x[:4], kind="hnsw")
    assert [len(r) for r in index.search(q[:3], 10)] == [4, 4, 4]
    assert [len(r) for r in ProductIndex.build(ids[:4], x[:4]).search(q[0], 10)] == [4]  # one (D,) query


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind):
    ids, x, q = data
    meta = {"config_hash": "abc123", "model": "tiny", "catalogue_hash": "c0ffee"}
    index = ProductIndex.build(ids[:600], x[:600], kind=kind, meta=meta)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ids.json", "index.faiss", "meta.json"]
    stored = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert stored["config_hash"] == "abc123" and stored["index"]["kind"] == kind and stored["index"]["count"] == 600
    loaded = ProductIndex.load(tmp_path / "idx", expect_hash="abc123")
    assert loaded.kind == kind and loaded.ids == index.ids and loaded.meta == meta
    assert loaded.params == index.params
    assert loaded.search(q, 10) == index.search(q, 10)
    assert loaded.search(q, 5, allowed=set(ids[:50])) == index.search(q, 5, allowed=set(ids[:50]))
    loaded.add(ids[600:700], x[600:700])  # a loaded index keeps growing
    assert len(loaded) == 700


def test_hash_mismatch_and_damaged_directories(tmp_path, data):
    ids, x, _ = data
    index = ProductIndex.build(ids[:20], x[:20], meta={"config_hash": "abc123"})
    index.save(tmp_path / "idx")
    with pytest.raises(ProductIndexError, match="built for config hash abc123, not zzz: rebuild it"):
        ProductIndex.load(tmp_path / "idx", expect_hash="zzz")
    ProductIndex.build(ids[:20], x[:20]).save(tmp_path / "nohash")
    with pytest.raises(ProductIndexError, match=r"config hash \(none\), not abc123"):
        ProductIndex.load(tmp_path / "nohash", expect_hash="abc123")
    assert len(ProductIndex.load(tmp_path / "nohash")) == 20  # no expectation, no check

    with pytest.raises(KaleidoError, match="not empty"):
        index.save(tmp_path / "idx")  # no silent overwrite
    index.save(tmp_path / "idx", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ProductIndexError, match="holds no index.faiss"):
        index.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"

    with pytest.raises(ProductIndexError, match="not a product index: index.faiss not found"):
        ProductIndex.load(tmp_path / "notes")
    (tmp_path / "idx" / "ids.json").write_text(json.dumps(ids[:19]))
    with pytest.raises(ProductIndexError, match="inconsistent: 20 vectors"):
        ProductIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    (tmp_path / "idx" / "ids.json").write_text(json.dumps(ids[:20]))
    with pytest.raises(ProductIndexError, match="not a readable FAISS index"):
        ProductIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "meta.json").write_text("{")
    with pytest.raises(ProductIndexError, match="meta.json is not valid JSON"):
        ProductIndex.load(tmp_path / "idx")


# ---------------------------------------------------------------------------------------------- offsets (query bank)
@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_offsets_rank_by_cosine_minus_offset(tmp_path, data, kind):
    """Per-vector offsets (the query-bank normalisation) rank every kind by ``cos − offset``; ``normalised=False``
    ranks the same index by the cosine; both survive save/load and incremental adds."""
    ids, x, q = data
    offsets = np.random.default_rng(5).uniform(0, 0.3, len(x)).astype(np.float32)
    options = {"nprobe": default_nlist(1500)} if kind == "ivf" else {"ef_search": 400} if kind == "hnsw" else {}
    index = ProductIndex.build(ids[:1500], x[:1500], kind=kind, offsets=offsets[:1500], **options)
    index.add(ids[1500:], x[1500:], offsets=offsets[1500:])
    assert index.offsets and index.dim == x.shape[1]
    loaded = ProductIndex.load(index.save(tmp_path / kind))
    assert loaded.offsets and loaded.dim == x.shape[1]
    shifted = brute_force(np.hstack([x, -offsets[:, None]]), np.hstack([q, np.ones((len(q), 1), np.float32)]), 10,
                          ids)
    plain = brute_force(x, q, 10, ids)
    assert recall(shifted, plain) < 0.9, "the offsets must change the rankings for this test to mean anything"
    for found_index in (index, loaded):
        normalised = found_index.search(q, 10)
        cosine = found_index.search(q, 10, normalised=False)
        if kind == "exact":
            assert [[i for i, _ in r] for r in normalised] == [[i for i, _ in r] for r in shifted]
            for got, want in zip(normalised, shifted, strict=True):
                assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
            assert [[i for i, _ in r] for r in cosine] == [[i for i, _ in r] for r in plain]
        else:
            assert recall(normalised, shifted) >= 0.9 and recall(cosine, plain) >= 0.9
    allowed = set(ids[::7])  # the filtered exact fallback scores the offset column too
    for got in index.search(q[:3], 5, allowed=allowed):
        assert all(i in allowed for i, _ in got)
    truth = brute_force(np.hstack([x, -offsets[:, None]])[::7], np.hstack([q[:3], np.ones((3, 1), np.float32)]), 5,
                        ids[::7])
    if kind == "exact":
        assert [[i for i, _ in r] for r in index.search(q[:3], 5, allowed=allowed)] == [[i for i, _ in r]
                                                                                        for r in truth]


def test_offsets_are_checked(data):
    ids, x, _ = data
    with pytest.raises(ProductIndexError, match=r"offsets must have shape \(3,\)"):
        ProductIndex.build(ids[:3], x[:3], offsets=np.zeros(2))
    with pytest.raises(ProductIndexError, match="offset of id 'item-00001' is NaN"):
        ProductIndex.build(ids[:3], x[:3], offsets=np.array([0.0, np.nan, 0.0]))
    with_offsets = ProductIndex.build(ids[:3], x[:3], offsets=np.zeros(3))
    with pytest.raises(ProductIndexError, match="pass offsets="):
        with_offsets.add(ids[3:5], x[3:5])
    plain = ProductIndex.build(ids[:3], x[:3])
    with pytest.raises(ProductIndexError, match="built without offsets"):
        plain.add(ids[3:5], x[3:5], offsets=np.zeros(2))
    assert len(with_offsets) == 3 and len(plain) == 3  # nothing was added
