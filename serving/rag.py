"""Retrieval in the Serve application: a retriever deployment (scales apart from the engine) and the request
schemas of `/v1/retrieve` and `/v1/rag/completions`.

`RetrieverServer` loads a rag stage's index, BM25 index and chunks once per replica (`dataprep.rag.retriever`);
the ingress asks it for ranked chunks, fits them into the serving model's context with
`dataprep.rag.prompt.build_prompt` (its own tokenizer counts the final prompt) and sends the prompt to the engine.
"""

import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dataprep.rag.prompt import DEFAULT_INSTRUCTIONS
from dataprep.rag.retriever import HybridConfig, Retriever

Mode = Literal["dense", "bm25", "hybrid"]


class RetrieveRequest(BaseModel):
    """`POST /v1/retrieve`: ranked chunks alone."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    k: int = 5
    mode: Mode = "hybrid"


class RetrievalOptions(BaseModel):
    """How to retrieve for a completion: the `retrieval` object of a chat request, or the rag request's fields."""

    model_config = ConfigDict(extra="forbid")

    k: int = 5
    mode: Mode = "hybrid"
    instructions: str = DEFAULT_INSTRUCTIONS


class RagCompletionRequest(BaseModel):
    """`POST /v1/rag/completions`: retrieve for `question`, answer it from the numbered sources."""

    model_config = ConfigDict(extra="allow")

    model: str
    question: str = Field(min_length=1)
    k: int = 5
    mode: Mode = "hybrid"
    instructions: str = DEFAULT_INSTRUCTIONS
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False


class RetrieverServer:
    """One retriever per replica: index, BM25 and chunk table loaded once."""

    def __init__(self, stage: str, model_path: str, model_name: str | None, max_k: int,
                 hybrid: HybridConfig | None = None, threads: int | None = None) -> None:
        self.threads = threads
        self.lock = threading.Lock()  # Serve may call a sync method from several threads; one search at a time
        self.use_threads()
        self.retriever = Retriever(Path(stage), model_path, model_name, max_k, hybrid)

    def use_threads(self) -> None:
        """Give the query embedding `threads` intra-op threads in the calling thread: OpenMP's thread count is
        per thread, and Serve runs a sync method on a worker thread that starts with Ray's OMP_NUM_THREADS=1."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

    def search(self, query: str, k: int, mode: str) -> list[dict[str, Any]]:
        """Ranked chunks as plain data; a bad query raises `RetrievalError` naming the field."""
        with self.lock:
            self.use_threads()
            found = self.retriever.search(query, k, mode)  # type: ignore[arg-type]
        return [{"rank": rank, "chunk_id": c.chunk_id, "doc_id": c.doc_id, "url": c.url, "score": c.score,
                 "start_char": c.start_char, "end_char": c.end_char, "text": c.text}
                for rank, c in enumerate(found, start=1)]

    def info(self) -> dict[str, Any]:
        meta = self.retriever.meta
        return {"embedding_model": meta.embedding_model, "index_kind": meta.index_kind, "vectors": meta.vector_count,
                "max_k": self.retriever.max_k}
