"""Ray side of dedup: signature tasks per shard, bucket actors per hash partition, verification tasks.

Flow of data (nothing but small arrays passes through the driver):
1. `signature_task` per input shard: normalised-text hash, normalised-URL hash and LSH band keys of every
   document, written to `_work/sig/` (atomic, so a rerun skips finished shards).
2. `route_task` per signature shard writes its (bucket, document key) pairs into P partitions by bucket hash
   (`_work/buckets/`), and `edges_task` per partition turns each bucket into a star of edges (smallest document
   key → the other members) in `_work/cand/<method>/<p>.parquet`: each task holds about 1/P of all keys.
3. Verification, connected components and representatives, one of two ways (`dedup.components`):
   - `partitioned` (`workers.dedup_partitioned`): every step on Ray tasks over P key partitions, joined through
     Parquet files, components by large-star / small-star rounds: no process holds all documents or edges;
   - `driver` (small inputs): `gather_task` per input shard returns text, URL and crawl date of just the
     documents on an edge, `verify_task` checks fuzzy edges, and the driver runs a union-find.
   `auto` takes the driver below `dedup.driver_max_docs` input documents (faster there: no shuffle rounds).
   Both give identical clusters and representatives.
4. `filter_task` per input shard writes the kept documents.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import xxhash

from dataprep.dedup.components import partition_of
from dataprep.dedup.documents import (
    DUPLICATES_SCHEMA,
    METHODS,
    DedupConfig,
    DocInfo,
    band_hashes,
    cluster_rows,
    connected_components,
    normalise_url,
    star_edges,
    verify_edges,
)
from dataprep.dedup.minhash import MinHasher, char_shingles, normalise_text
from dataprep.shards import publish_table
from workers.dedup_partitioned import PartLayout, partitioned_clusters, read_pairs, write_pairs
from workers.drill import ATTEMPTS_DIR, HOLD_ENV, attempt, retried  # noqa: F401  (re-exported for the drills)

log = logging.getLogger(__name__)


def _signed_hash(text: str) -> int:
    """xxh3-64 of the UTF-8 text as a signed int64 (Arrow and numpy int64 columns)."""
    return int(np.uint64(xxhash.xxh3_64_intdigest(text.encode())).astype(np.int64))


def doc_key(doc_id: str) -> int:
    """A signed 64-bit key per document id (xxh3); orders documents independently of input order."""
    return _signed_hash(doc_id)


def _text_hash(text: str) -> int:
    return _signed_hash(normalise_text(text))


def _url_hash(url: str | None) -> int:
    normal = normalise_url(url)
    return 0 if normal is None else _signed_hash(normal)


def _retried(sig_dir: Path) -> int:
    """How many signature shards were computed more than once (recovery after a lost worker)."""
    return retried(sig_dir)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def signature_task(source: str, target: str, tmp_dir: str, config: DedupConfig) -> tuple[int, int]:
    """Keys of one input shard → `target` (skipped when it exists). Returns (documents, documents shingled by
    characters)."""
    if Path(target).exists():
        kinds = pq.read_table(target, columns=["char_shingles"])["char_shingles"]
        return len(kinds), int(pc.sum(kinds).as_py() or 0)
    attempt(Path(target))
    table = pq.read_table(source, columns=["doc_id", "text", "url"])
    doc_ids, texts, urls = (table[c].to_pylist() for c in ("doc_id", "text", "url"))
    hasher = MinHasher(num_perm=config.num_perm, seed=config.seed, shingle_hash=config.shingle_hash)
    kinds = [config.shingle_kind(text) for text in texts]
    signatures = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    words = [i for i, kind in enumerate(kinds) if kind == "word"]
    chars = [i for i, kind in enumerate(kinds) if kind == "char"]
    if words:  # the vectorised path over every word-shingled document of the shard at once
        signatures[words] = hasher.text_signatures([texts[i] for i in words], config.ngram)
    if chars:
        signatures[chars] = hasher.signatures(char_shingles(texts[i], config.ngram) for i in chars)
    band_count, rows = config.lsh()
    bands = band_hashes(signatures, band_count, rows).view(np.int64)
    columns = {
        "key": pa.array([doc_key(d) for d in doc_ids], pa.int64()),
        "text_hash": pa.array([_text_hash(t) for t in texts], pa.int64()),
        "url_hash": pa.array([_url_hash(u) for u in urls], pa.int64()),
        "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1)), band_count),
        "char_shingles": pa.array([kind == "char" for kind in kinds], pa.bool_()),
    }
    publish_table(pa.table(columns), Path(target), Path(tmp_dir))
    return len(doc_ids), len(chars)


def _band_buckets(bands: np.ndarray) -> np.ndarray:
    """One bucket per (band index, band key): mix the band index into the key."""
    index = np.arange(bands.shape[1], dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return (bands.view(np.uint64) ^ index).reshape(-1)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def route_task(sig_path: str, methods: list[str], partitions: int, bucket_dir: str, tmp_dir: str) -> int:
    """The (bucket, document key) pairs of one signature shard, per method, into the partition that owns each
    bucket (bucket mod P): `<bucket_dir>/<method>/<p>/<shard>.parquet`."""
    table = pq.read_table(sig_path)
    keys = table["key"].to_numpy()
    for method in methods:
        if method == "fuzzy":
            width = table.schema.field("bands").type.list_size
            bands = np.asarray(pc.list_flatten(table["bands"]).to_numpy(), dtype=np.int64).reshape(-1, width)
            buckets, members = _band_buckets(bands), np.repeat(keys, width)
        else:
            column = table["text_hash" if method == "exact" else "url_hash"].to_numpy()
            valid = column != 0
            buckets, members = column[valid].view(np.uint64), keys[valid]
        owner = partition_of(buckets.view(np.int64), partitions)
        for partition in range(partitions):
            chosen = owner == partition
            if chosen.any():
                part = pa.table({"bucket": buckets[chosen].view(np.int64), "key": members[chosen]})
                publish_table(part, Path(bucket_dir) / method / f"{partition:05d}" / Path(sig_path).name,
                              Path(tmp_dir))
    return len(keys)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def edges_task(files: list[str], target: str, tmp_dir: str) -> tuple[int, int]:
    """Star edges of one bucket partition (each bucket's smallest key → the others) → `target`.
    Returns (edges, bytes of the pairs this task held)."""
    table = pa.concat_tables([pq.read_table(f) for f in files])
    buckets, keys = table["bucket"].to_numpy(), table["key"].to_numpy()
    edges = star_edges(buckets.view(np.uint64), keys)
    if len(edges):
        write_pairs(Path(target), edges, Path(tmp_dir))
    return len(edges), int(buckets.nbytes + keys.nbytes)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def gather_task(source: str, wanted: np.ndarray) -> dict[int, DocInfo]:
    """doc key → what clustering needs, for the wanted documents of one shard."""
    table = pq.read_table(source, columns=["doc_id", "text", "crawl_date", "url"])
    keys = np.array([doc_key(d) for d in table["doc_id"].to_pylist()], dtype=np.int64)
    rows = np.flatnonzero(np.isin(keys, wanted))
    picked = table.take(pa.array(rows)).to_pylist()
    return {int(keys[r]): DocInfo(p["doc_id"], p["text"], p["crawl_date"], p["url"])
            for r, p in zip(rows, picked, strict=True)}


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def verify_task(edges: np.ndarray, texts: dict[int, str], config: DedupConfig) -> list[tuple[int, int, float]]:
    """Exact Jaccard of each candidate edge; keeps those at or above the threshold."""
    shingle_sets = {int(key): set(config.shingles(texts[int(key)])) for key in np.unique(edges)}
    return verify_edges(edges, shingle_sets, config.threshold)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def filter_task(source: str, target: str, tmp_dir: str, removed: np.ndarray | list[str]) -> int:
    """Copy one input shard without its removed documents (atomic; skipped when published). `removed`: the
    keys, or the files holding this shard's removed keys (partitioned components)."""
    if Path(target).exists():
        return pq.read_metadata(target).num_rows
    if isinstance(removed, list):
        removed = np.concatenate([pq.read_table(f)["key"].to_numpy() for f in removed] or [np.empty(0, np.int64)])
    table = pq.read_table(source)
    keys = np.array([doc_key(d) for d in table["doc_id"].to_pylist()], dtype=np.int64)
    kept = table.filter(pa.array(~np.isin(keys, removed)))
    publish_table(kept.replace_schema_metadata(None), Path(target), Path(tmp_dir))
    return kept.num_rows


def _bucket_edges(sig_paths: list[Path], methods: list[str], partitions: int, work_dir: Path, tmp_dir: Path
                  ) -> tuple[dict[str, list[str]], int]:
    """Shuffle every bucket key to its partition (`route_task` per signature shard), then star edges per
    partition (`edges_task`): candidate edge files per method, and the most bytes one partition's task held.
    Plain tasks, so a lost node's work is retried by Ray and the phase needs no actor to be recreated."""
    bucket_dir, cand_dir = work_dir / "buckets", work_dir / "cand"
    for folder in (bucket_dir, cand_dir):
        shutil.rmtree(folder, ignore_errors=True)
    ray.get([route_task.remote(str(p), methods, partitions, str(bucket_dir), str(tmp_dir)) for p in sig_paths])
    jobs: dict[str, list[tuple[str, Any]]] = {}
    for method in methods:
        for partition in range(partitions):
            files = sorted(str(f) for f in (bucket_dir / method / f"{partition:05d}").glob("*.parquet"))
            if files:
                target = str(cand_dir / method / f"{partition:05d}.parquet")
                jobs.setdefault(method, []).append((target, edges_task.remote(files, target, str(tmp_dir))))
    results = {method: [(target, ray.get(ref)) for target, ref in pending] for method, pending in jobs.items()}
    candidates = {m: [t for t, (count, _) in results.get(m, []) if count] for m in methods}
    peak = max((held for done in results.values() for _, (_, held) in done), default=0)
    return candidates, peak


def _chunks(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)] or [array]


def _driver_clusters(sources: list[Path], candidates: dict[str, list[str]], config: DedupConfig, audit: Path,
                     tmp_dir: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Verification, union-find and representatives on the driver (small inputs); the audit rows → `audit`.
    Returns (counters, removed keys)."""
    edges = {m: read_pairs(files) for m, files in candidates.items()}
    candidates_unique = {m: np.unique(e, axis=0) if len(e) else e.reshape(0, 2) for m, e in edges.items()}
    involved = np.unique(np.concatenate([e.reshape(-1) for e in candidates_unique.values()]
                                        or [np.empty(0, np.int64)]))
    info: dict[int, DocInfo] = {}
    wanted = ray.put(involved)
    for part in ray.get([gather_task.remote(str(s), wanted) for s in sources]):
        info.update(part)
    verified: list[tuple[int, int, float]] = []
    fuzzy = candidates_unique.get("fuzzy", np.empty((0, 2), np.int64))
    if len(fuzzy) and config.verify:
        texts = ray.put({k: v.text for k, v in info.items()})
        for kept in ray.get([verify_task.remote(c, texts, config) for c in _chunks(fuzzy, 2000)]):
            verified.extend(kept)
    elif len(fuzzy):
        verified = [(int(a), int(b), float("nan")) for a, b in fuzzy.tolist()]
    dense = {int(k): i for i, k in enumerate(involved.tolist())}
    all_edges = [(dense[a], dense[b]) for a, b, _ in verified]
    for method in ("exact", "url"):
        all_edges += [(dense[a], dense[b]) for a, b in candidates_unique.get(method, np.empty((0, 2))).tolist()]
    labels = connected_components(len(involved), all_edges)
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        clusters.setdefault(label, []).append(int(involved[index]))
    removed_docs, removed = cluster_rows(clusters.values(), info, config)
    publish_table(pa.Table.from_pylist([asdict(r) for r in removed_docs], schema=DUPLICATES_SCHEMA), audit, tmp_dir)
    counters = {
        "candidate_edges": {m: int(len(e)) for m, e in candidates_unique.items()},
        "methods": {m: sum(r.method == m for r in removed_docs) for m in METHODS},
        "sizes": [len(m) for m in clusters.values() if len(m) > 1],
        "verified_fuzzy_edges": len(verified),
        "components": {"mode": "driver", "documents_held": len(info), "edges_held": len(all_edges)},
    }
    return counters, np.array(removed, np.int64)


def components_mode(config: DedupConfig, docs_in: int) -> str:
    """`driver` or `partitioned`: the configured one, or with `auto` by the input's size."""
    if config.components != "auto":
        return config.components
    return "driver" if docs_in <= config.driver_max_docs else "partitioned"


def run_dedup(
    sources: list[Path], work_dir: Path, out_dir: Path, tmp_dir: Path, config: DedupConfig
) -> tuple[dict[str, Any], list[Path]]:
    """Dedup the document shards `sources`; returns (stats, the audit's part files: one row per removed
    document, each part sorted by doc_id).

    Kept documents are written to `out_dir` with the same file names as their source shards.
    """
    sig_paths = [work_dir / "sig" / s.name for s in sources]
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(now - clock, 3)
        clock = now

    counted = ray.get([
        signature_task.remote(str(s), str(t), str(tmp_dir), config) for s, t in zip(sources, sig_paths, strict=True)
    ])
    docs_in, char_docs = sum(docs for docs, _ in counted), sum(chars for _, chars in counted)
    lap("signatures")
    candidates, peak_partition_bytes = _bucket_edges(sig_paths, config.methods(), config.partitions, work_dir,
                                                     tmp_dir)
    lap("bucketing")
    removed_for: list[Any]  # per shard: its removed-key files, or one object ref to all removed keys
    if components_mode(config, docs_in) == "partitioned":
        layout = PartLayout(work_dir / "parts", config.partitions, tmp_dir)
        counters = partitioned_clusters(sources, candidates, layout, config)
        audit = [Path(f) for f in layout.files("duplicates")]
        removed_for = [layout.files("removed", f"{i:06d}") for i in range(len(sources))]
    else:
        audit = [work_dir / "driver-duplicates.parquet"]
        counters, removed = _driver_clusters(sources, candidates, config, audit[0], tmp_dir)
        removed_ref = ray.put(removed)
        removed_for = [removed_ref] * len(sources)
    lap("components")
    ray.get([filter_task.remote(str(s), str(out_dir / s.name), str(tmp_dir), r)
             for s, r in zip(sources, removed_for, strict=True)])
    lap("filter")
    counts, sizes = counters["methods"], counters["sizes"]
    bands, band_rows = config.lsh()
    stats = {
        "records_in": docs_in,
        "records_out": docs_in - sum(counts.values()),
        "dropped": {f"{m}_duplicate": counts[m] for m in METHODS if counts[m]},
        "clusters": len(sizes),
        "largest_cluster": max(sizes, default=1),
        "candidate_edges": counters["candidate_edges"],
        "verified_fuzzy_edges": counters["verified_fuzzy_edges"],
        "components": {**counters["components"], "seconds": seconds["components"]},
        "seconds": seconds,
        "lsh": {"bands": bands, "rows": band_rows},
        "shingles": {"setting": config.shingle, "ngram": config.ngram, "word_documents": docs_in - char_docs,
                     "char_documents": char_docs},
        "peak_partition_bytes": int(peak_partition_bytes),
        "recovery": {"signature_tasks_retried": _retried(work_dir / "sig")},
    }
    return stats, audit


def read_audit(parts: list[Path]) -> list[dict[str, Any]]:
    """Every audit row of `parts` (tests and small runs; the flow streams them into one file instead)."""
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def write_audit(parts: list[Path], target: Path, tmp_dir: Path) -> int:
    """Concatenate the audit parts into `target` one part at a time (atomic); returns the rows written."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    staging = tmp_dir / f"{target.name}.{os.getpid()}.tmp"
    rows = 0
    with pq.ParquetWriter(staging, DUPLICATES_SCHEMA, compression="zstd") as writer:
        writer.write_table(DUPLICATES_SCHEMA.empty_table())
        for part in parts:
            table = pq.read_table(part).cast(DUPLICATES_SCHEMA)
            writer.write_table(table)
            rows += table.num_rows
    os.replace(staging, target)
    return rows
