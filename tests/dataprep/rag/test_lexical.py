"""BM25 over chunk texts (rare words win, atomic save/load) and reciprocal rank fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataprep.rag.lexical import BM25Index, reciprocal_rank_fusion, relative_score_fusion, top_k
from tests.dataprep.rag.conftest import sample_texts

LINES = [line for text in sample_texts().values() for line in text.splitlines() if line.strip()]
RARE = "The old lighthouse keeper repaired a xylophone every winter for the village school."


def _index() -> tuple[BM25Index, np.ndarray]:
    texts = [*LINES[:20], RARE, *LINES[20:]]
    ids = np.arange(len(texts), dtype=np.int64) * 10 + 5
    return BM25Index.build(texts, ids), ids


def test_rare_word_finds_its_chunk() -> None:
    index, ids = _index()
    scores, found = index.search("who fixes the xylophone?", 5)
    assert found.tolist() == [ids[20]]  # the only text sharing a term with the query
    assert scores.dtype == np.float32 and scores[0] > 0
    scores, found = index.search("village lighthouse keeper", 3)
    assert found[0] == ids[20]


def test_ranking_is_by_score_then_id_and_unknown_terms_match_nothing() -> None:
    index = BM25Index.build(["apple pie", "apple tart", "apple pie recipe", "pear"], np.array([9, 3, 7, 1]))
    scores, found = index.search("apple pie", 10)
    assert found.tolist() == [9, 7, 3] and list(scores) == sorted(scores, reverse=True)
    tied_scores, tied = index.search("apple", 10)
    assert tied.tolist() == [3, 9, 7] and tied_scores[0] == tied_scores[1] > tied_scores[2]  # tie: smaller id
    empty_scores, empty_ids = index.search("zebra the of", 5)
    assert empty_ids.size == 0 and empty_scores.size == 0
    assert top_k(np.array([1.0, 2.0, 1.0, 0.0, 1.0]), np.array([40, 30, 20, 10, 0]), 3)[1].tolist() == [30, 0, 20]


def test_save_and_load_roundtrip_atomically(tmp_path: Path) -> None:
    index, _ = _index()
    directory = tmp_path / "bm25"
    index.save(directory)
    index.save(directory)  # replaces the published directory
    assert [p.name for p in tmp_path.iterdir()] == ["bm25"]
    loaded = BM25Index.load(directory)
    assert len(loaded) == len(index)
    for query in ("xylophone", "Museum Geschichte", "bibliothèque université", "free iPhone"):
        for before, after in zip(index.search(query, 5), loaded.search(query, 5), strict=True):
            np.testing.assert_array_equal(before, after)


def test_build_rejects_bad_ids() -> None:
    with pytest.raises(ValueError):
        BM25Index.build(["a b", "c d"], np.array([1, 1]))
    with pytest.raises(ValueError):
        BM25Index.build([])


def test_reciprocal_rank_fusion_constructed_case() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    assert [item for item, _ in fused] == [1, 3, 2, 4]
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62) and scores[4] == pytest.approx(1 / 63)
    assert reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60, top=2) == fused[:2]


def test_reciprocal_rank_fusion_is_deterministic_on_ties_and_repeats() -> None:
    assert reciprocal_rank_fusion([[8, 5], [5, 8]], k=0) == [(5, 1.5), (8, 1.5)]  # tie: smaller id first
    assert reciprocal_rank_fusion([[6], [2]], k=60) == [(2, 1 / 61), (6, 1 / 61)]
    assert reciprocal_rank_fusion([[4, 4, 9]], k=1) == [(4, 0.5), (9, 0.25)]  # a repeat counts once
    assert reciprocal_rank_fusion([], k=60) == [] and reciprocal_rank_fusion([[]], k=60) == []
    assert reciprocal_rank_fusion([[np.int64(3)], [3]], k=0)[0] == (3, 2.0)


def test_relative_score_fusion_constructed_case() -> None:
    dense = [(1, 0.9), (2, 0.8), (3, 0.5)]  # normalised: 1.0, 0.75, 0.0
    lexical = [(3, 12.0), (4, 6.0), (1, 2.0)]  # normalised: 1.0, 0.4, 0.0
    fused = relative_score_fusion([dense, lexical], [0.5, 0.5])
    assert [item for item, _ in fused] == [1, 3, 2, 4]
    scores = dict(fused)
    assert scores[1] == pytest.approx(0.5) and scores[3] == pytest.approx(0.5)
    assert scores[2] == pytest.approx(0.375) and scores[4] == pytest.approx(0.2)
    # a lead kept: with RRF the BM25 winner 3 would tie with 1; weighted towards BM25, 3 ranks first
    assert relative_score_fusion([dense, lexical], [0.3, 0.7], top=1)[0][0] == 3


def test_relative_score_fusion_edge_cases() -> None:
    assert relative_score_fusion([[(7, 2.0), (7, 1.0)], []], [1.0, 1.0]) == [(7, 1.0)]  # one score, repeat ignored
    assert relative_score_fusion([[(5, 1.0), (2, 1.0)]], [0.5]) == [(2, 0.5), (5, 0.5)]  # equal scores: all 1.0
    assert relative_score_fusion([], []) == []
    with pytest.raises(ValueError):
        relative_score_fusion([[(1, 1.0)]], [0.5, 0.5])
    with pytest.raises(ValueError):
        relative_score_fusion([[(1, 1.0)]], [-1.0])
