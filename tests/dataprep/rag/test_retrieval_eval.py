"""Questions from held-out chunks, hit@k and MRR, and dense retrieval of the sample texts end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataprep.rag.chunking import ChunkConfig, chunk_documents
from dataprep.rag.embedding import encode
from dataprep.rag.index import IndexConfig, ShardedIndex
from dataprep.rag.lexical import BM25Index, reciprocal_rank_fusion
from dataprep.rag.retrieval_eval import (
    build_questions,
    eval_png,
    evaluation_rows,
    hit_at_k,
    mrr,
    split_sentences,
    word_count,
)
from tests.dataprep.rag.conftest import sample_texts


def test_hit_at_k_and_mrr_on_constructed_rankings() -> None:
    rankings = [[5, 1, 2], [3, 4, 9], [7, 8, 6], []]
    targets = [5, 9, 1, 2]
    assert hit_at_k(rankings, targets, 1) == 0.25
    assert hit_at_k(rankings, targets, 3) == 0.5
    assert mrr(rankings, targets) == pytest.approx((1 + 1 / 3) / 4)
    assert mrr(rankings, targets, k=2) == pytest.approx(1 / 4)
    assert hit_at_k([], [], 5) == 0.0 and mrr([], []) == 0.0
    with pytest.raises(ValueError):
        hit_at_k([[1]], [1, 2], 1)


def test_questions_are_unique_sentences_of_their_chunk_and_deterministic() -> None:
    texts = [
        "The river floods every spring near the town. Traders have lived here for centuries and still do.",
        "Short one.",
        "Traders have lived here for centuries and still do. The library keeps old manuscripts from many lands.",
        "Cyclists ride to the lake on weekends to swim, sail or read under the trees.",
    ]
    ids = [40, 10, 30, 20]
    first = build_questions(texts, ids, n=10, seed=3, min_words=5)
    assert first == build_questions(list(reversed(texts)), list(reversed(ids)), n=10, seed=3, min_words=5)
    assert {q.target_id for q in first} == {40, 30, 20}  # "Short one." has no sentence of 5 words
    by_id = dict(zip(ids, texts, strict=True))
    for question in first:
        assert question.question in by_id[question.target_id]
        assert "Traders" not in question.question  # shared by two chunks: it cannot single one out
    assert len(build_questions(texts, ids, n=2, seed=3, min_words=5)) == 2
    assert split_sentences("One. Two!\nThree。四") == ["One.", "Two!", "Three。", "四"]
    assert word_count("大学图书馆 has books") == 7


@pytest.fixture(scope="module")
def sample_corpus(minilm_tokenizer) -> tuple[list[str], np.ndarray]:
    """Chunks of the sample texts the English MiniLM can read (its vocabulary maps most Chinese characters
    to [UNK], so zh.txt is left out)."""
    rows = [{"doc_id": name, "text": text} for name, text in sample_texts().items() if name != "zh"]
    chunks = list(chunk_documents(rows, minilm_tokenizer, ChunkConfig(max_tokens=48, overlap_tokens=8, min_tokens=8)))
    return [chunk.text for chunk in chunks], np.arange(len(chunks), dtype=np.int64)


def test_dense_retrieval_ranks_the_source_chunk_first(minilm, sample_corpus, tmp_path: Path) -> None:
    texts, ids = sample_corpus
    questions = build_questions(texts, ids, n=len(texts), seed=0, min_words=5)
    assert len(questions) >= 40
    index = ShardedIndex.build(encode(minilm, texts), ids, IndexConfig())
    _, found = index.search(encode(minilm, [q.question for q in questions]), 10)
    targets = [q.target_id for q in questions]
    dense = [row.tolist() for row in found]
    assert [row[0] for row in dense] == targets
    bm25 = BM25Index.build(texts, ids)
    lexical = [bm25.search(q.question, 10)[1].tolist() for q in questions]
    hybrid = [[i for i, _ in reciprocal_rank_fusion([d, b], 60, 10)] for d, b in zip(dense, lexical, strict=True)]
    rows = evaluation_rows({"dense": dense, "bm25": lexical, "hybrid": hybrid}, targets)
    assert [row["method"] for row in rows] == ["dense", "bm25", "hybrid"]
    assert rows[0] == {"method": "dense", "questions": len(targets), "hit@1": 1.0, "hit@5": 1.0, "hit@10": 1.0,
                       "mrr": 1.0}
    assert rows[2]["hit@5"] == 1.0
    path = eval_png(rows, tmp_path / "retrieval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
