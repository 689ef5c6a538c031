"""Query a rag stage's output: dense (FAISS), lexical (BM25) or hybrid retrieval.

Hybrid takes the `HybridConfig.depth` best of each and fuses them: by default with relative score fusion
(min-max normalised scores, equal weights), or with reciprocal rank fusion (`method: rrf`).

`Retriever(stage_dir, model_path)` loads the index, the BM25 index and the chunk table once; loading with an
embedding model other than the one the index was built with is an `IndexMismatchError` naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from dataprep.errors import FieldError
from dataprep.rag.embedding import QueryEncoder, load_encoder, model_fingerprint
from dataprep.rag.index import ShardedIndex, check_compatible
from dataprep.rag.lexical import BM25Index, reciprocal_rank_fusion, relative_score_fusion
from dataprep.rag.prompt import RetrievedChunk

Mode = Literal["dense", "bm25", "hybrid"]
Fusion = Literal["relative_score", "rrf"]
FUSIONS: tuple[str, ...] = get_args(Fusion)
CHUNKS_DIR = "chunks"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
BM25_DIR = "bm25"


class HybridConfig(BaseModel):
    """`rag.hybrid:` how hybrid retrieval fuses the dense and BM25 rankings (query time: not part of the index)."""

    model_config = ConfigDict(extra="forbid")

    method: Fusion = Field(
        "relative_score", description="relative_score: weighted sum of min-max normalised scores; rrf: reciprocal "
        "rank fusion (ranks only)")
    dense_weight: float = Field(0.5, ge=0, le=1, description="relative_score: the dense share (BM25 gets the rest)")
    rrf_k: int = Field(60, ge=0, description="rrf: score = sum of 1 / (rrf_k + rank)")
    depth: int = Field(50, ge=1, description="candidates taken from each ranking before fusing (at least k)")


class RetrievalError(FieldError):
    """A query the retriever refuses, naming the field (`param`)."""


class Retriever:
    """Ranked chunks for a query; `search` is safe to call from one thread at a time."""

    def __init__(self, stage_dir: Path, model_path: str, model_name: str | None = None, max_k: int = 50,
                 hybrid: HybridConfig | None = None) -> None:
        stage_dir = Path(stage_dir)
        if not (stage_dir / INDEX_DIR).is_dir():
            raise FileNotFoundError(f"{stage_dir}: no {INDEX_DIR}/ (not a complete rag stage)")
        self.index, self.meta = ShardedIndex.load(stage_dir / INDEX_DIR)
        check_compatible(self.meta, model_name or model_path, model_fingerprint(model_path), self.meta.dim)
        self.encoder = load_encoder(model_path)
        self.query_encoder = QueryEncoder(self.encoder)
        self.bm25 = BM25Index.load(stage_dir / BM25_DIR)
        table = pq.read_table(stage_dir / CHUNKS_DIR)
        self.rows = {int(row["row_id"]): row for row in table.to_pylist()}
        self.max_k = max_k
        self.hybrid = hybrid or HybridConfig()

    def _check(self, query: str, k: int) -> None:
        if not isinstance(query, str) or not query.strip():
            raise RetrievalError("query", "the query is empty")
        if not 1 <= k <= self.max_k:
            raise RetrievalError("k", f"k must be between 1 and {self.max_k}, got {k}")

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        scores, ids = self.index.search(self.query_encoder.encode(query), k)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def lexical(self, query: str, k: int) -> list[tuple[int, float]]:
        scores, ids = self.bm25.search(query, k)
        return [(int(i), float(s)) for s, i in zip(scores, ids, strict=True)]

    def ranked(self, query: str, k: int, mode: Mode = "hybrid") -> list[tuple[int, float]]:
        """(row id, score) best first; hybrid fuses the dense and BM25 candidates as `self.hybrid` says."""
        self._check(query, k)
        if mode == "dense":
            return self.dense(query, k)
        if mode == "bm25":
            return self.lexical(query, k)
        if mode != "hybrid":
            raise RetrievalError("mode", f"mode must be dense, bm25 or hybrid, not {mode!r}")
        depth = max(k, self.hybrid.depth)
        return self.fuse(self.dense(query, depth), self.lexical(query, depth), k)

    def fuse(self, dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int,
             method: str | None = None) -> list[tuple[int, float]]:
        """The k best of two scored rankings fused by `method` (default: the configured one)."""
        method = method or self.hybrid.method
        if method == "rrf":
            fused = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in lexical]], self.hybrid.rrf_k, k)
        else:
            weights = (self.hybrid.dense_weight, 1.0 - self.hybrid.dense_weight)
            fused = relative_score_fusion([dense, lexical], weights, k)
        return [(int(i), float(s)) for i, s in fused]

    def search(self, query: str, k: int, mode: Mode = "hybrid") -> list[RetrievedChunk]:
        """The top-k chunks with their scores, sources and character offsets."""
        return [self.chunk(row_id, score) for row_id, score in self.ranked(query, k, mode)]

    def chunk(self, row_id: int, score: float) -> RetrievedChunk:
        row = self.rows[row_id]
        return RetrievedChunk(row["chunk_id"], row["doc_id"], row["text"], score, row["url"], row["start_char"],
                              row["end_char"])

    def texts(self) -> tuple[list[str], np.ndarray]:
        """Every chunk's text and row id (for evaluation)."""
        ids = np.array(sorted(self.rows), dtype=np.int64)
        return [self.rows[int(i)]["text"] for i in ids], ids
