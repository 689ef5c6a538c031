"""The `rag` stage: chunk the curated documents, embed them on Ray actors, build a sharded vector index and BM25.

Output `<run_dir>/rag-<hash>/`: `chunks/` (row_id, doc_id, url, character offsets, text, token count, content
hash), `embeddings/` (row_id, chunk_id, normalised vector), `index/` (FAISS shards + `meta.json`: embedding
model and fingerprint, dimension, normalisation, chunk parameters, index kind and parameters), `bm25/`, and
the manifest. A rebuild over a corpus that gained documents embeds only chunks whose content no earlier build
of this run embedded, and adds them to the earlier index when nothing else changed.

`rag_eval_flow` scores retrieval (hit@1/5/10, MRR for dense, BM25 and hybrid) on questions taken from the
chunks: `eval/results.json`, `eval/retrieval.png` and the `rag-eval` artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dataprep.rag.chunking import load_tokenizer
from dataprep.rag.embedding import model_fingerprint
from dataprep.rag.index import ShardedIndex, choose_kind
from dataprep.rag.retrieval_eval import eval_png
from dataprep.rag.retriever import BM25_DIR, CHUNKS_DIR, EMBEDDINGS_DIR, INDEX_DIR
from dataprep.shards import atomic_write_json
from dataprep.stage import DATA_DIR, StageDir
from flows.common import connect_ray, publish_plots
from flows.config import RunConfig, load_config
from flows.stage import Computed, StageInputs, StageResult, StageSpec, latest_complete, stage_flow
from workers.rag import bm25_task, build_index, chunk_task, embed_chunks, evaluate_task, load_vectors, read_embeddings

EVAL_DIR = "eval"
OPERATIONAL = {"enabled", "embedding_model", "num_actors", "threads_per_actor", "use_gpu", "max_k", "eval_questions",
               "eval_seed", "hybrid"}


class RagStage(StageSpec):
    """Curated documents → chunks, embeddings, a sharded FAISS index and a BM25 index."""

    name = "rag"
    code_version = "rag-1"
    upstream = "filter"
    output_names = (CHUNKS_DIR, EMBEDDINGS_DIR, INDEX_DIR, BM25_DIR)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """Chunking and index settings and the embedding model's content fingerprint (not its path)."""
        return {**config.rag.model_dump(mode="json", exclude=OPERATIONAL),
                "model_fingerprint": model_fingerprint(config.rag.model_path())}

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        assert inputs.upstream is not None
        sources = sorted((inputs.upstream.path / DATA_DIR).glob("*.parquet"))
        if sum(pq.read_metadata(s).num_rows for s in sources) == 0:
            raise ValueError("rag: the upstream stage has no documents (empty corpus); nothing to index")
        load_tokenizer(config.rag.model_path())  # a missing or unreadable model fails before any work

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        assert inputs.upstream is not None
        settings, logger = config.rag, get_run_logger()
        sources = sorted((inputs.upstream.path / DATA_DIR).glob("*.parquet"))
        targets = [stage.path / CHUNKS_DIR / s.name for s in sources]
        chunks = sum(ray.get([chunk_task.remote(str(s), str(t), str(stage.tmp_dir), settings.model_path(),
                                                settings.chunk) for s, t in zip(sources, targets, strict=True)]))
        if chunks == 0:
            raise ValueError("rag: the documents gave no chunks (all empty)")
        previous = self._previous(config, stage)
        reuse = read_embeddings(previous.path / EMBEDDINGS_DIR) if previous else {}
        counts = embed_chunks(targets, stage.path / EMBEDDINGS_DIR, stage.tmp_dir, settings, reuse)
        logger.info("rag: %d chunks, %d embedded, %d reused from %s", chunks, counts["embedded"], counts["reused"],
                    previous.path if previous else "-")
        vectors, ids = load_vectors(stage.path / EMBEDDINGS_DIR)
        index, incremental = self._index(config, stage, previous, vectors, ids)
        meta = index.meta(settings.model_name(), model_fingerprint(settings.model_path()), settings.chunk,
                          settings.index)
        index.save(stage.path / INDEX_DIR, meta)
        ray.get(bm25_task.remote([str(t) for t in targets], str(stage.path / BM25_DIR)))
        documents = sum(pq.read_metadata(s).num_rows for s in sources)
        stats = {"documents": documents, "chunks": chunks, **{k: v for k, v in counts.items() if k != "chunks"},
                 "index_kind": index.kind, "index_params": index.params, "index_shards": len(index.shards),
                 "index_incremental": incremental, "vectors": index.ntotal, "dim": index.dim}
        return Computed(stats, {"index_meta": json.loads(meta.model_dump_json())})

    def _previous(self, config: RunConfig, stage: StageDir) -> StageDir | None:
        """The latest complete rag stage of this run built with the same model and chunking (for reuse)."""
        manifest = latest_complete(config.run_dir, self.name, exclude=stage.path)
        if manifest is None:
            return None
        meta = manifest.get("index_meta", {})
        same = (meta.get("model_fingerprint") == model_fingerprint(config.rag.model_path())
                and meta.get("chunk_config") == config.rag.chunk.model_dump())
        return StageDir(Path(manifest["path"])) if same else None

    def _index(self, config: RunConfig, stage: StageDir, previous: StageDir | None, vectors: Any, ids: Any,
               ) -> tuple[ShardedIndex, bool]:
        """Add to the previous index when every chunk it holds is unchanged here and the same kind applies;
        else build anew (shards in parallel on Ray)."""
        settings = config.rag.index
        if previous is not None:
            old, meta = ShardedIndex.load(previous.path / INDEX_DIR)
            before, now = _chunk_ids(previous.path / CHUNKS_DIR), _chunk_ids(stage.path / CHUNKS_DIR)
            unchanged = all(now.get(row) == chunk for row, chunk in before.items())
            same_kind = old.kind == choose_kind(len(ids), settings) and old.kind != "ivf"
            if unchanged and same_kind and meta.index_config == settings and old.ntotal == len(before):
                fresh = np.flatnonzero(~np.isin(ids, np.fromiter(before, dtype=np.int64, count=len(before))))
                if len(fresh):
                    old.add(vectors[fresh], ids[fresh])
                return old, True
        return build_index(vectors, ids, settings), False

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"chunks": {"path": CHUNKS_DIR, "rows": computed.stats["chunks"]},
                "embeddings": {"path": EMBEDDINGS_DIR, "model": config.rag.model_name()},
                "index": {"path": INDEX_DIR, "kind": computed.stats["index_kind"]}, "bm25": {"path": BM25_DIR}}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        rag = config.rag
        return {"embedding actors": rag.num_actors, "CPU per actor": rag.threads_per_actor,
                "GPU per actor": 1 if rag.use_gpu else 0, "index shard tasks": rag.index.shards}

    def summary(self, result: StageResult) -> list[str]:
        stats = result["stats"]
        return [f"{stats['chunks']:,} chunks of {stats['documents']:,} documents; {stats['embedded']:,} embedded, "
                f"{stats['reused']:,} reused; {stats['index_kind']} index ({stats['index_shards']} shard(s), "
                f"{stats['vectors']:,} vectors of {stats['dim']})"]


def _chunk_ids(directory: Path) -> dict[int, str]:
    """row id → content hash of every chunk of a rag stage."""
    table = pq.read_table(directory, columns=["row_id", "chunk_id"])
    return dict(zip(table["row_id"].to_pylist(), table["chunk_id"].to_pylist(), strict=True))


RAG = RagStage()
rag_flow = stage_flow(RAG)


@task(name="rag-eval", cache_policy=NO_CACHE)
def rag_eval_task(config: RunConfig, rag_path: str) -> dict[str, Any]:
    """Retrieval quality on Ray: one task that loads the index once and asks every question."""
    get_run_logger().info("Ray: %s", connect_ray(config))
    rag = config.rag
    result: dict[str, Any] = ray.get(evaluate_task.remote(rag_path, rag.model_path(), rag.model_name(),
                                                          rag.eval_questions, rag.eval_seed, 10, rag.hybrid))
    return result


def eval_markdown(rows: list[dict[str, Any]]) -> str:
    """The retrieval table: one row per method."""
    keys = [k for k in rows[0] if k != "method"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {row['method']} | " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@flow(name="rag-eval", log_prints=True)
def rag_eval_flow(config: RunConfig, rag_path: str) -> dict[str, Any]:
    """Score retrieval of a complete rag stage; writes `eval/` in it and the `rag-eval` artifact."""
    stage = StageDir(Path(rag_path))
    if not stage.is_complete():
        raise ValueError(f"rag-eval: {stage.path} is not a complete rag stage")
    result = rag_eval_task(config, str(stage.path))
    out = stage.path / EVAL_DIR
    atomic_write_json(out / "results.json", result)
    eval_png(result["rows"], out / "retrieval.png")
    table = eval_markdown(result["rows"])
    plots = publish_plots("rag-eval", [out / "retrieval.png"])
    create_markdown_artifact(key="rag-eval", markdown=f"# rag eval — `{stage.name}`\n\n{table}{plots}",
                             description=f"retrieval quality of {stage.name}")
    return {"path": str(out), "rows": result["rows"], "table": table}


@flow(name="rag-rebuild", log_prints=True)
def rag_from_file_flow(config_path: str) -> dict[str, Any]:
    """The rag stage (and what it needs) for a config file: the deployment triggered by a new filter output."""
    from flows.pipeline import pipeline_flow

    return dict(pipeline_flow(load_config(config_path), "rag"))
