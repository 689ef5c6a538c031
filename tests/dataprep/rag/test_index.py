"""Vector indexes: exact where promised, HNSW recall, sharding, atomic save/load, incremental adds, model checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from dataprep.rag.chunking import ChunkConfig
from dataprep.rag.index import (
    IndexConfig,
    IndexMeta,
    IndexMismatchError,
    IndexShard,
    ShardedIndex,
    build_index,
    check_compatible,
    choose_kind,
    index_ids,
    ivf_lists,
    merge_top_k,
    shard_of,
)
from tests.dataprep.rag.conftest import unit_vectors

DIM = 384
FLAT = IndexConfig(kind="flat")


def clustered_unit_vectors(n: int, queries: int, dim: int, seed: int, clusters: int = 200) -> tuple[np.ndarray, ...]:
    """n vectors and `queries` more from the same distribution: unit vectors around random centres, the noise
    as long as the centre (embeddings of real text are clustered; isotropic random vectors are no guide)."""
    rng = np.random.default_rng(seed)
    centres = unit_vectors(clusters, dim, seed + 1)
    total = n + queries
    vectors = centres[rng.integers(0, clusters, total)] + rng.standard_normal((total, dim)) / np.sqrt(dim)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    return vectors[:n], vectors[n:]


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def _meta(index: ShardedIndex, config: IndexConfig, model: str = "minilm", fingerprint: str = "f00d") -> IndexMeta:
    return index.meta(model, fingerprint, ChunkConfig(), config)


def test_flat_search_equals_numpy_brute_force() -> None:
    vectors, queries = unit_vectors(3000, DIM, 1), unit_vectors(50, DIM, 2)
    ids = np.random.default_rng(3).permutation(10_000)[:3000].astype(np.int64)
    scores, found = ShardedIndex.build(vectors, ids, FLAT).search(queries, 10)
    expected_scores, expected_ids = brute_force(vectors, ids, queries, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    single = build_index(vectors, ids, FLAT)
    np.testing.assert_array_equal(single.search(queries, 10)[1], expected_ids)


def test_hnsw_recall_at_10_at_the_default_ef_search() -> None:
    vectors, queries = clustered_unit_vectors(20_000, 300, DIM, 4)
    ids = np.arange(len(vectors), dtype=np.int64)
    # default M=32 and efSearch=64; efConstruction 100 instead of 200 halves the build (about 4 s on 2 cores),
    # and only helps recall when raised
    config = IndexConfig(kind="hnsw", hnsw_ef_construction=100)
    started = time.perf_counter()
    hnsw = ShardedIndex.build(vectors, ids, config)
    built = time.perf_counter() - started
    assert hnsw.kind == "hnsw" and hnsw.params == {"m": 32, "ef_construction": 100, "ef_search": 64}
    _, truth = ShardedIndex.build(vectors, ids, FLAT).search(queries, 10)
    recall = recall_at(hnsw.search(queries, 10)[1], truth)
    assert recall >= 0.95, f"recall@10 {recall:.3f} (build {built:.1f}s)"


def test_four_shards_search_equals_one_flat_index() -> None:
    vectors, queries = unit_vectors(5000, DIM, 6), unit_vectors(64, DIM, 7)
    ids = np.arange(100, 5100, dtype=np.int64)
    single = ShardedIndex.build(vectors, ids, FLAT)
    sharded = ShardedIndex.build(vectors, ids, IndexConfig(kind="flat", shards=4))
    assert [int(s.ntotal) for s in sharded.shards] == np.bincount(shard_of(ids, 4), minlength=4).tolist()
    assert all(900 < s.ntotal < 1600 for s in sharded.shards)
    one_scores, one_ids = single.search(queries, 20)
    four_scores, four_ids = sharded.search(queries, 20)
    np.testing.assert_array_equal(four_ids, one_ids)
    np.testing.assert_array_equal(four_scores, one_scores)
    assert sorted(sharded.ids().tolist()) == ids.tolist()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_and_load_give_identical_results(tmp_path: Path, kind: str) -> None:
    vectors, queries = clustered_unit_vectors(4000, 40, 64, 8)
    ids = np.arange(4000, dtype=np.int64) * 3
    config = IndexConfig(kind=kind, shards=3, hnsw_ef_construction=64)
    index = ShardedIndex.build(vectors, ids, config)
    directory = tmp_path / "index"
    index.save(directory, _meta(index, config))
    loaded, meta = ShardedIndex.load(directory)
    assert meta == _meta(index, config) and meta.vector_count == 4000 and meta.index_kind == kind
    for before, after in zip(index.search(queries, 10), loaded.search(queries, 10), strict=True):
        np.testing.assert_array_equal(before, after)
    index.save(directory, _meta(index, config))  # replacing a published directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", *[f"shard-0000{i}.faiss" for i in range(3)]]
    with pytest.raises(ValueError, match="meta does not describe"):
        index.save(tmp_path / "other", _meta(ShardedIndex.build(vectors[:5], ids[:5], FLAT), config))
    assert not (tmp_path / "other").exists()


def test_index_shard_save_is_atomic_and_roundtrips(tmp_path: Path) -> None:
    vectors = unit_vectors(100, 16, 10)
    shard = IndexShard(build_index(vectors, np.arange(100, dtype=np.int64), FLAT))
    shard.save(tmp_path / "a.faiss")
    shard.save(tmp_path / "a.faiss")
    assert [p.name for p in tmp_path.iterdir()] == ["a.faiss"]
    loaded = IndexShard.load(tmp_path / "a.faiss")
    np.testing.assert_array_equal(index_ids(loaded.index), np.arange(100))
    with pytest.raises(FileNotFoundError):
        IndexShard.load(tmp_path / "missing.faiss")


def test_incremental_adds_equal_a_full_build_for_flat() -> None:
    vectors, queries = unit_vectors(3000, DIM, 11), unit_vectors(30, DIM, 12)
    ids = np.random.default_rng(13).permutation(3000).astype(np.int64)
    config = IndexConfig(kind="flat", shards=4)
    full = ShardedIndex.build(vectors, ids, config)
    grown = ShardedIndex.build(vectors[:1000], ids[:1000], config)
    grown.add(vectors[1000:2200], ids[1000:2200])
    grown.add(vectors[2200:], ids[2200:])
    for shard_full, shard_grown in zip(full.shards, grown.shards, strict=True):
        np.testing.assert_array_equal(index_ids(shard_full), index_ids(shard_grown))
    for a, b in zip(full.search(queries, 15), grown.search(queries, 15), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already indexed"):
        grown.add(vectors[:2], ids[:2])


def test_hnsw_and_ivf_accept_adds() -> None:
    vectors, _ = clustered_unit_vectors(3000, 0, 32, 14)
    ids = np.arange(3000, dtype=np.int64)
    for kind in ("hnsw", "ivf"):
        index = ShardedIndex.build(vectors[:2000], ids[:2000], IndexConfig(kind=kind, shards=2))
        index.add(vectors[2000:], ids[2000:])
        assert index.ntotal == 3000
        _, found = index.search(vectors[2000:2100], 1)
        assert np.mean(found[:, 0] == ids[2000:2100]) >= 0.95, kind


def test_ties_are_broken_by_id_and_missing_results_padded() -> None:
    vector = unit_vectors(1, 8, 15)
    vectors = np.repeat(vector, 6, axis=0)
    ids = np.array([50, 7, 31, 2, 99, 13], dtype=np.int64)
    index = ShardedIndex.build(vectors, ids, IndexConfig(kind="flat", shards=3))
    scores, found = index.search(vector, 8)
    assert found[0].tolist() == [2, 7, 13, 31, 50, 99, -1, -1]
    assert np.isneginf(scores[0, 6:]).all() and np.allclose(scores[0, :6], 1.0)
    merged_scores, merged_ids = merge_top_k(np.array([[0.5, 0.9, 0.5]]), np.array([[4, 8, -1]]), 3)
    assert merged_ids.tolist() == [[8, 4, -1]] and np.isneginf(merged_scores[0, 2])


def test_kind_choice_and_ivf_lists() -> None:
    defaults = IndexConfig()
    assert (defaults.kind, defaults.exact_below, defaults.shards) == ("auto", 50_000, 1)
    assert (defaults.hnsw_m, defaults.hnsw_ef_construction, defaults.hnsw_ef_search) == (32, 200, 64)
    assert choose_kind(49_999, IndexConfig()) == "flat"
    assert choose_kind(50_000, IndexConfig()) == "hnsw"
    assert choose_kind(10, IndexConfig(kind="ivf")) == "ivf"
    assert ivf_lists(1_000_000, IndexConfig()) == 4000
    assert ivf_lists(1000, IndexConfig()) == 25  # capped: 39 training vectors per list
    assert ivf_lists(1000, IndexConfig(ivf_nlist=10)) == 10
    with pytest.raises(ValueError, match="exceeds"):
        ivf_lists(5, IndexConfig(ivf_nlist=10))
    with pytest.raises(ValidationError):
        IndexConfig(kind="annoy")
    with pytest.raises(ValidationError):
        IndexConfig(nprobe=3)


def test_unnormalised_or_duplicate_input_is_rejected() -> None:
    vectors = unit_vectors(10, 8, 16)
    with pytest.raises(ValueError, match="normalised"):
        build_index(vectors * 2, np.arange(10), FLAT)
    with pytest.raises(ValueError, match="unique"):
        build_index(vectors, np.zeros(10, dtype=np.int64), FLAT)
    with pytest.raises(ValueError, match="non-negative"):
        build_index(vectors, np.arange(-1, 9), FLAT)
    with pytest.raises(ValueError, match="training vectors"):
        ShardedIndex.build(vectors[:0], np.arange(0), IndexConfig(kind="ivf"))
    index = ShardedIndex.build(vectors, np.arange(10), FLAT)
    with pytest.raises(ValueError, match="dimension"):
        index.search(unit_vectors(1, 16, 0), 3)
    with pytest.raises(ValueError, match="k must"):
        index.search(vectors[:1], 0)
    empty = ShardedIndex.build(vectors[:0], np.arange(0), IndexConfig(kind="flat", shards=2))
    scores, found = empty.search(vectors[:2], 3)
    assert found.tolist() == [[-1] * 3] * 2 and np.isneginf(scores).all()


def test_model_mismatch_names_both_models() -> None:
    index = ShardedIndex.build(unit_vectors(20, 8, 17), np.arange(20), FLAT)
    meta = index.meta("sentence-transformers/all-MiniLM-L6-v2", "aaaa", ChunkConfig(), FLAT)
    check_compatible(meta, "/models/minilm-copy", "aaaa", dim=8)  # same contents under another name
    with pytest.raises(IndexMismatchError) as raised:
        check_compatible(meta, "BAAI/bge-small-en-v1.5", "bbbb")
    message = str(raised.value)
    assert "sentence-transformers/all-MiniLM-L6-v2" in message and "BAAI/bge-small-en-v1.5" in message
    assert "aaaa" in message and "bbbb" in message
    with pytest.raises(IndexMismatchError, match="8-d"):
        check_compatible(meta, "other", "aaaa", dim=384)
