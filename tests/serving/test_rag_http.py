"""Retrieval-augmented endpoints on a real Serve app: a retriever deployment over a rag stage built by the rag flow
(real Ray, FAISS, MiniLM), `/v1/retrieve`, `/v1/rag/completions`, chat `retrieval`, and their 4xx errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dataprep.rag.retrieval_eval import build_questions
from flows.config import parse_config
from tests.conftest import reference_documents, write_corpus_stage
from tests.serving.test_http import free_port, model_dir  # noqa: F401  (the tiny exported model fixture)

pytestmark = pytest.mark.integration
CONTEXT = 4096  # the tiny model's context (tests/serving/test_http.py)


@pytest.fixture(scope="module")
def rag_stage(tmp_path_factory: pytest.TempPathFactory, prefect_server: None, ray_local: None) -> Path:
    from flows.rag import rag_flow

    root = tmp_path_factory.mktemp("rag-served")
    corpus = write_corpus_stage(root / "filter-docs", reference_documents(20))
    config = parse_config({"run_dir": str(root / "run"), "ingest": {"inputs": ["unused"]},
                           "rag": {"num_actors": 1, "chunk": {"max_tokens": 160, "overlap_tokens": 16}}})
    return Path(rag_flow(config, str(corpus))["path"])


@pytest.fixture(scope="module")
def served(model_dir: Path, rag_stage: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    from ray import serve

    from serving.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": str(model_dir), "name": "tiny", "engine_cpus": 0.5, "rag": str(rag_stage),
                           "rag_max_k": 8}), name="rag", route_prefix="/")
    serve.run(app_builder({"model": str(model_dir), "name": "tiny", "engine_cpus": 0.5}), name="plain",
              route_prefix="/plain")
    yield {"base": f"http://127.0.0.1:{port}", "plain": f"http://127.0.0.1:{port}/plain"}
    serve.shutdown()


@pytest.fixture()
def client(served: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served["base"], timeout=120) as http:
        yield http


def _question(rag_stage: Path) -> tuple[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(rag_stage / "chunks").to_pylist()
    (question,) = build_questions([r["text"] for r in rows], [r["row_id"] for r in rows], 1, seed=1)
    return question.question, next(r for r in rows if r["row_id"] == question.target_id)


def test_retrieve_returns_the_source_chunk(client: httpx.Client, rag_stage: Path) -> None:
    question, source = _question(rag_stage)
    answer = client.post("/v1/retrieve", json={"query": question, "k": 5, "mode": "hybrid"})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [hit["rank"] for hit in data] == [1, 2, 3, 4, 5]
    assert source["chunk_id"] in [hit["chunk_id"] for hit in data]
    first = next(hit for hit in data if hit["chunk_id"] == source["chunk_id"])
    assert (first["doc_id"], first["start_char"], first["end_char"]) == (source["doc_id"], source["start_char"],
                                                                        source["end_char"])


def test_rag_completion_answers_with_its_sources_within_the_context(client: httpx.Client, rag_stage: Path) -> None:
    question, source = _question(rag_stage)
    answer = client.post("/v1/rag/completions", json={"model": "tiny", "question": question, "k": 6,
                                                      "max_tokens": 12, "temperature": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] + 12 <= CONTEXT
    numbers = [s["number"] for s in body["sources"]]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) + len(body["dropped"]) == 6
    assert source["chunk_id"] in [s["chunk_id"] for s in body["sources"]]
    assert all({"doc_id", "url", "score", "start_char", "end_char"} <= s.keys() for s in body["sources"])


def test_the_budget_drops_sources_instead_of_overflowing(client: httpx.Client, rag_stage: Path) -> None:
    question, _ = _question(rag_stage)
    tight = CONTEXT - 600  # an answer budget that leaves room for the question and about one source
    body = client.post("/v1/rag/completions", json={"model": "tiny", "question": question, "k": 8,
                                                    "max_tokens": tight, "temperature": 0}).json()
    assert body["usage"]["prompt_tokens"] + tight <= CONTEXT
    assert body["dropped"] and all(d["reason"] == "context_budget" for d in body["dropped"])


def test_chat_with_retrieval_reports_sources(client: httpx.Client, rag_stage: Path) -> None:
    question, source = _question(rag_stage)
    answer = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
        "retrieval": {"k": 4, "mode": "dense"}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion" and body["sources"]
    assert source["chunk_id"] in [s["chunk_id"] for s in body["sources"]]


@pytest.mark.parametrize(("path", "payload", "param"), [
    ("/v1/retrieve", {"query": "for statement", "k": 0}, "k"),
    ("/v1/retrieve", {"query": "for statement", "k": 9}, "k"),
    ("/v1/retrieve", {"query": "", "k": 3}, "query"),
    ("/v1/retrieve", {"query": "   ", "k": 3}, "query"),
    ("/v1/retrieve", {"query": "x", "mode": "fuzzy"}, "mode"),
    ("/v1/rag/completions", {"model": "tiny", "question": "the for statement " * 900, "max_tokens": 8}, "question"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "retrieval": {"k": 99}}, "k"),
])
def test_bad_rag_requests_are_400_naming_the_field(client: httpx.Client, path: str, payload: dict[str, Any],
                                                   param: str) -> None:
    answer = client.post(path, json=payload)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_a_server_without_an_index_says_so(served: dict[str, str]) -> None:
    for path, payload in (("/v1/retrieve", {"query": "for"}),
                          ("/v1/rag/completions", {"model": "tiny", "question": "for"})):
        answer = httpx.post(served["plain"] + path, json=payload, timeout=60)
        assert answer.status_code == 400 and "no rag index" in answer.json()["error"]["message"]


def test_non_utf8_query_is_400(client: httpx.Client) -> None:
    answer = client.post("/v1/retrieve", content=b'{"query": "\xff\xfe", "k": 2}',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400


def test_rag_for_an_unknown_model_is_404(client: httpx.Client) -> None:
    answer = client.post("/v1/rag/completions", json={"model": "other", "question": "for"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
