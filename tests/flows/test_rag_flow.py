"""The rag stage on real Ray with the shipped MiniLM model and real FAISS: retrieval, reload, incremental
rebuild, actor-pool embeddings, model mismatch, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataprep.rag.embedding import DEFAULT_MODEL, arrow_to_vectors, encode, load_encoder
from dataprep.rag.index import IndexMismatchError
from dataprep.rag.retrieval_eval import build_questions
from dataprep.rag.retriever import RetrievalError, Retriever
from flows.config import RunConfig, parse_config
from tests.conftest import reference_documents, write_corpus_stage

pytestmark = pytest.mark.integration


def _config(run_dir: Path, **rag: Any) -> RunConfig:
    return parse_config({"run_dir": str(run_dir), "ray": {"num_cpus": 2}, "ingest": {"inputs": ["unused"]},
                         "rag": {"num_actors": 2, "chunk": {"max_tokens": 128, "overlap_tokens": 16},
                                 "index": {"shards": 2}, **rag}})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, prefect_server: None, ray_local: None) -> dict[str, Any]:
    from flows.rag import rag_flow

    root = tmp_path_factory.mktemp("rag")
    documents = reference_documents(45)
    small = write_corpus_stage(root / "filter-small", documents[:30])
    full = write_corpus_stage(root / "filter-full", documents)
    config = _config(root / "run")
    first = rag_flow(config, str(small))
    grown = rag_flow(config, str(full))  # the corpus gained 15 documents: incremental
    scratch = rag_flow(_config(root / "scratch"), str(full))  # the same corpus from nothing
    return {"root": root, "config": config, "first": first, "grown": grown, "scratch": scratch, "full": full}


def _retriever(stage: dict[str, Any]) -> Retriever:
    return Retriever(Path(stage["path"]), DEFAULT_MODEL)


def test_a_question_from_a_chunk_retrieves_that_chunk(built: dict[str, Any]) -> None:
    retriever = _retriever(built["grown"])
    texts, ids = retriever.texts()
    questions = build_questions(texts, ids.tolist(), 30, seed=3)
    assert len(questions) == 30
    for mode in ("dense", "bm25", "hybrid"):
        top = [[i for i, _ in retriever.ranked(q.question, 5, mode)] for q in questions]
        found = sum(q.target_id in ranking for q, ranking in zip(questions, top, strict=True))
        assert found >= 27, f"{mode}: the source chunk in the top 5 for only {found} of 30"
    first = retriever.search(questions[0].question, 3, "hybrid")[0]
    row = retriever.rows[questions[0].target_id]
    assert first.chunk_id == row["chunk_id"] and first.doc_id == row["doc_id"]
    assert (first.start_char, first.end_char) == (row["start_char"], row["end_char"])


def test_actor_pool_embeddings_equal_in_process_encode(built: dict[str, Any]) -> None:
    stage = Path(built["scratch"]["path"])
    embedded = pq.read_table(stage / "embeddings")
    chunks = {r["row_id"]: r["text"] for r in pq.read_table(stage / "chunks", columns=["row_id", "text"]).to_pylist()}
    vectors = arrow_to_vectors(embedded["embedding"])
    expected = encode(load_encoder(DEFAULT_MODEL), [chunks[i] for i in embedded["row_id"].to_pylist()])
    assert len(vectors) == len(chunks) == built["scratch"]["stats"]["chunks"]
    assert np.allclose(vectors, expected, atol=1e-5)


def test_incremental_rebuild_embeds_only_new_chunks_and_equals_a_full_build(built: dict[str, Any]) -> None:
    first, grown, scratch = built["first"]["stats"], built["grown"]["stats"], built["scratch"]["stats"]
    assert grown["reused"] == first["chunks"] and grown["embedded"] == grown["chunks"] - first["chunks"] > 0
    assert grown["index_incremental"] and not scratch["index_incremental"] and scratch["embedded"] == scratch["chunks"]
    incremental, full = _retriever(built["grown"]), _retriever(built["scratch"])
    texts, _ = full.texts()
    for query in texts[::7]:
        got, want = incremental.ranked(query[:200], 10, "dense"), full.ranked(query[:200], 10, "dense")
        assert [i for i, _ in got] == [i for i, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-6)


def test_reloaded_index_gives_identical_results_and_sharded_search_is_exact(built: dict[str, Any]) -> None:
    once, again = _retriever(built["scratch"]), _retriever(built["scratch"])
    stage = Path(built["scratch"]["path"])
    embedded = pq.read_table(stage / "embeddings")
    vectors, ids = arrow_to_vectors(embedded["embedding"]), embedded["row_id"].to_numpy()
    assert once.meta.index_kind == "flat" and once.meta.shard_count == 2 and once.meta.vector_count == len(ids)
    for query in ("What does the for statement do?", "exceptions raised by a function", "class definitions"):
        assert once.search(query, 5, "hybrid") == again.search(query, 5, "hybrid")
        scores = vectors @ encode(once.encoder, [query])[0]  # brute force over every vector
        best = ids[np.lexsort((ids, -scores))[:5]]
        assert [i for i, _ in once.ranked(query, 5, "dense")] == best.tolist()


def test_another_embedding_model_is_refused_naming_both(built: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(DEFAULT_MODEL, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # other content: other model
    with pytest.raises(IndexMismatchError) as caught:
        Retriever(Path(built["scratch"]["path"]), str(other))
    assert "all-MiniLM-L6-v2" in str(caught.value) and str(other) in str(caught.value)


def test_bad_queries_and_inputs(built: dict[str, Any], tmp_path: Path) -> None:
    from flows.rag import rag_flow

    retriever = _retriever(built["scratch"])
    for query, k, field in (("", 5, "query"), ("   ", 5, "query"), ("ok", 0, "k"), ("ok", 51, "k")):
        with pytest.raises(RetrievalError) as caught:
            retriever.search(query, k)
        assert caught.value.param == field
    with pytest.raises(FileNotFoundError, match="not a complete rag stage"):
        Retriever(tmp_path, DEFAULT_MODEL)
    empty = write_corpus_stage(tmp_path / "filter-empty", [])
    with pytest.raises(ValueError, match="empty corpus"):
        rag_flow(built["config"], str(empty))
    assert rag_flow(built["config"], str(built["full"]))["skipped"], "a rerun over the same corpus skips"


def test_rag_eval_reports_every_method(built: dict[str, Any]) -> None:
    from flows.rag import rag_eval_flow

    config = built["config"].model_copy(update={"rag": built["config"].rag.model_copy(update={"eval_questions": 40})})
    result = rag_eval_flow(config, built["grown"]["path"])
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "bm25", "hybrid", "hybrid_rrf"} and all(r["questions"] == 40 for r in rows.values())
    assert all(0.0 <= row["hit@1"] <= row["hit@5"] <= row["hit@10"] <= 1.0 for row in rows.values())
    assert rows["hybrid"]["hit@10"] >= 0.9
    assert (Path(result["path"]) / "retrieval.png").stat().st_size > 1000
