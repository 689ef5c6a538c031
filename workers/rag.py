"""Ray side of the rag stage: chunk shards in tasks, embed on a Ray Data actor pool, build index shards in
parallel tasks, build BM25, and evaluate retrieval.

- `chunk_task` per document shard: token-aware chunks (the embedding model's tokenizer) with a stable `row_id`
  (xxh3 of doc id and chunk index), written atomically (a finished shard is skipped on a rerun).
- `embed_chunks`: `ray.data` `map_batches(Embedder, compute=ActorPoolStrategy(size=num_actors))`, chunks fed
  longest first so a batch holds similar lengths: the model is loaded once per actor (a GPU each with
  `use_gpu`); chunks whose content hash an earlier build already embedded are not embedded again
  (incremental). Embeddings are published as Parquet shards (row_id, chunk_id, embedding).
- `build_index`: one Ray task per index shard (vectors routed by `shard_of(row_id)`), the same result as
  `ShardedIndex.build` in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import xxhash

from dataprep.rag.chunking import CHUNK_SCHEMA, ChunkConfig, chunk_documents, chunks_to_table, load_tokenizer
from dataprep.rag.config import RagConfig
from dataprep.rag.embedding import Embedder, arrow_to_vectors, batching_order, vectors_to_arrow
from dataprep.rag.index import (
    IndexConfig,
    ShardedIndex,
    check_vectors,
    choose_kind,
    empty_index,
    resolved_params,
    shard_of,
)
from dataprep.rag.lexical import BM25Index
from dataprep.rag.retrieval_eval import build_questions, evaluation_rows, rankings_by_method
from dataprep.rag.retriever import HybridConfig, Retriever
from dataprep.shards import publish_table

CHUNK_TABLE_SCHEMA = pa.schema([pa.field("row_id", pa.int64(), nullable=False), *CHUNK_SCHEMA])
EMBEDDING_FIELDS = ("row_id", "chunk_id", "embedding")
ROW_ID_MASK = (1 << 63) - 1


def row_id(doc_id: str, chunk_index: int) -> int:
    """A stable non-negative int64 id of a document's chunk (the id the index and BM25 return)."""
    return xxhash.xxh3_64_intdigest(f"{doc_id}\0{chunk_index}".encode()) & ROW_ID_MASK


@ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")
def chunk_task(source: str, target: str, tmp_dir: str, tokenizer_path: str, config: ChunkConfig) -> int:
    """Chunk one document shard → `target` (skipped when published); returns the chunk count."""
    if Path(target).exists():
        return pq.read_metadata(target).num_rows
    tokenizer = load_tokenizer(tokenizer_path)
    columns = [c for c in ("doc_id", "text", "url") if c in pq.read_schema(source).names]
    rows = pq.read_table(source, columns=columns).to_pylist()
    table = chunks_to_table(chunk_documents(rows, tokenizer, config))
    ids = [row_id(d, i) for d, i in zip(table["doc_id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True)]
    table = table.add_column(0, pa.field("row_id", pa.int64(), nullable=False), pa.array(ids, pa.int64()))
    publish_table(table.cast(CHUNK_TABLE_SCHEMA), Path(target), Path(tmp_dir))
    return table.num_rows


def read_embeddings(directory: Path) -> dict[str, np.ndarray]:
    """chunk content hash → vector, from an earlier build's embedding shards."""
    found: dict[str, np.ndarray] = {}
    for path in sorted(Path(directory).glob("*.parquet")):
        table = pq.read_table(path)
        vectors = arrow_to_vectors(table["embedding"])
        found.update(zip(table["chunk_id"].to_pylist(), vectors, strict=True))
    return found


def embed_chunks(chunk_paths: list[Path], out_dir: Path, tmp_dir: Path, config: RagConfig,
                 reuse: dict[str, np.ndarray]) -> dict[str, int]:
    """Embed the chunks not in `reuse` on an actor pool; publish every chunk's vector. Returns counts."""
    chunks = pa.concat_tables([pq.read_table(p, columns=["row_id", "chunk_id", "n_tokens", "text"])
                               for p in chunk_paths])
    known = np.array([c in reuse for c in chunks["chunk_id"].to_pylist()], dtype=bool)
    fresh = chunks.filter(pa.array(~known))
    fresh = fresh.take(batching_order(fresh["n_tokens"].to_numpy()))  # similar lengths share a batch
    parts = []
    if fresh.num_rows:
        dataset = ray.data.from_arrow(fresh).map_batches(
            Embedder, fn_constructor_kwargs={"model_path": config.model_path(), "batch_size": config.embedding_batch,
                                             "threads": config.threads_per_actor,
                                             "device": "cuda" if config.use_gpu else "cpu"},
            batch_size=config.embedding_batch, compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            num_cpus=config.threads_per_actor,
            num_gpus=1 if config.use_gpu else 0, batch_format="pyarrow")
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(batch, pa.Table)
            parts.append(_embedding_table(batch.select(list(EMBEDDING_FIELDS))))
    if known.any():
        reused = chunks.filter(pa.array(known))
        vectors = np.stack([reuse[c] for c in reused["chunk_id"].to_pylist()])
        parts.append(_embedding_table(pa.table({"row_id": reused["row_id"], "chunk_id": reused["chunk_id"],
                                                "embedding": vectors_to_arrow(vectors)})))
    table = pa.concat_tables(parts).sort_by("row_id") if parts else None
    if table is not None:
        for number, start in enumerate(range(0, table.num_rows, 50_000)):
            publish_table(table.slice(start, 50_000), out_dir / f"part-{number:05d}.parquet", tmp_dir)
    return {"chunks": chunks.num_rows, "embedded": fresh.num_rows, "reused": int(known.sum())}


def _embedding_table(table: pa.Table) -> pa.Table:
    """One schema for embedded and reused rows: row_id (not null), chunk_id, the fixed-size vector."""
    fields = [pa.field("row_id", pa.int64(), nullable=False), pa.field("chunk_id", pa.string()),
              pa.field("embedding", table.schema.field("embedding").type)]
    return table.cast(pa.schema(fields))


def load_vectors(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, row ids) of every published embedding shard, in row id order."""
    tables = [pq.read_table(p) for p in sorted(Path(directory).glob("*.parquet"))]
    table = pa.concat_tables(tables).sort_by("row_id")
    return arrow_to_vectors(table["embedding"]), table["row_id"].to_numpy()


@ray.remote(num_cpus=1)
def shard_task(template: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """One index shard: the (trained) empty template with these vectors added, serialised."""
    index = faiss.deserialize_index(template)
    if len(ids):
        index.add_with_ids(vectors, ids)
    return faiss.serialize_index(index)


@ray.remote(num_cpus=1)
def train_task(template: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """IVF: train the coarse quantizer once on all vectors (every shard shares it)."""
    index = faiss.deserialize_index(template)
    index.train(vectors)
    return faiss.serialize_index(index)


def build_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig) -> ShardedIndex:
    """`config.shards` shards built in parallel Ray tasks; equal to `ShardedIndex.build` in one process."""
    vectors, ids = check_vectors(vectors, ids)
    kind = choose_kind(len(vectors), config)
    params = resolved_params(kind, len(vectors), config)
    template = faiss.serialize_index(empty_index(vectors.shape[1], kind, params))
    if kind == "ivf":
        template = ray.get(train_task.remote(template, vectors))
    routes = shard_of(ids, config.shards)
    parts = ray.get([shard_task.remote(template, vectors[routes == s], ids[routes == s])
                     for s in range(config.shards)])
    index = ShardedIndex([faiss.deserialize_index(part) for part in parts], kind, params)
    index.set_search_params(config)
    return index


@ray.remote(num_cpus=1)
def bm25_task(chunk_paths: list[str], out_dir: str) -> int:
    """BM25 over every chunk's text, keyed by row id, saved atomically."""
    table = pa.concat_tables([pq.read_table(p, columns=["row_id", "text"]) for p in chunk_paths]).sort_by("row_id")
    BM25Index.build(table["text"].to_pylist(), table["row_id"].to_numpy()).save(Path(out_dir))
    return table.num_rows


@ray.remote(num_cpus=1)
def evaluate_task(stage_dir: str, model_path: str, model_name: str, questions: int, seed: int, k: int,
                  hybrid: HybridConfig | None = None) -> dict[str, Any]:
    """hit@1/5/10 and MRR of dense, BM25 and hybrid retrieval for questions taken from the chunks themselves
    (a sentence found in no other chunk): the chunk it came from is the right answer."""
    retriever = Retriever(Path(stage_dir), model_path, model_name, max_k=k, hybrid=hybrid)
    texts, ids = retriever.texts()
    asked = build_questions(texts, ids.tolist(), questions, seed)
    rankings = rankings_by_method(retriever, [q.question for q in asked], k)
    rows = evaluation_rows(rankings, [q.target_id for q in asked])
    return {"rows": rows, "examples": [{"question": q.question, "target": q.target_id} for q in asked[:5]]}
