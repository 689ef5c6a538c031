"""Ray side of dedup: signature tasks per shard, bucket actors per hash partition, verification tasks.

Flow of data (nothing but small arrays passes through the driver):
1. `signature_task` per input shard: normalised-text hash, normalised-URL hash and LSH band keys of every
   document, written to `_work/sig/` (atomic, so a rerun skips finished shards).
2. `route_task` per signature shard pushes keys to `BucketActor`s, partitioned by key hash, so each actor
   holds about 1/N of all keys; each actor returns star edges (smallest doc key → other members).
3. `gather_task` per input shard returns text, length and crawl date of just the documents on an edge;
   `verify_task` keeps a fuzzy edge only when the exact Jaccard similarity reaches the threshold.
4. The driver joins the verified edges into connected components (union-find over the documents that
   have an edge), picks one representative per cluster and `filter_task` writes the kept documents.
"""

from __future__ import annotations

import logging
import os
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

from dataprep.dedup.documents import (
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
from workers.ray_runtime import with_fresh_actors

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


ATTEMPTS_DIR = ".attempts"
HOLD_ENV = "FORGELINE_DRILL_HOLD"


def _mark_attempt(target: Path) -> bool:
    """Record that an attempt at `target` started: a second attempt (Ray retrying the task after its worker or
    node died) finds the first's marker and leaves a `.retried` one, which `_retried` counts. True on a retry."""
    folder = target.parent / ATTEMPTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    started = folder / f"{target.name}.started"
    retry = started.exists()
    if retry:
        (folder / f"{target.name}.retried").touch()
    started.touch()
    return retry


def _drill_hold(target: Path) -> None:
    """Failure drill (`FORGELINE_DRILL_HOLD=<signature shard path>`): the first attempt at that shard writes
    `<name>.held` (holding its node id) and then waits, in flight, until its node is removed; the retry runs."""
    if os.environ.get(HOLD_ENV) != str(target):
        return
    marker = target.parent / ATTEMPTS_DIR / f"{target.name}.held"
    marker.with_suffix(".tmp").write_text(ray.get_runtime_context().get_node_id())
    marker.with_suffix(".tmp").rename(marker)
    time.sleep(3600)


def _retried(sig_dir: Path) -> int:
    """How many signature shards were computed more than once (recovery after a lost worker)."""
    return len(list((sig_dir / ATTEMPTS_DIR).glob("*.retried")))


@ray.remote(num_cpus=1)
def signature_task(source: str, target: str, tmp_dir: str, config: DedupConfig) -> tuple[int, int]:
    """Keys of one input shard → `target` (skipped when it exists). Returns (documents, documents shingled by
    characters)."""
    if Path(target).exists():
        kinds = pq.read_table(target, columns=["char_shingles"])["char_shingles"]
        return len(kinds), int(pc.sum(kinds).as_py() or 0)
    if not _mark_attempt(Path(target)):
        _drill_hold(Path(target))
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


@ray.remote(num_cpus=0)
class BucketActor:
    """Holds the (bucket key, document key) pairs of its hash partition, per dedup method."""

    def __init__(self) -> None:
        self.parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in METHODS}

    def add(self, method: str, buckets: np.ndarray, keys: np.ndarray) -> int:
        self.parts[method].append((buckets, keys))
        return len(keys)

    def edges(self, method: str) -> np.ndarray:
        parts = self.parts.pop(method, [])
        if not parts:
            return np.empty((0, 2), dtype=np.int64)
        buckets = np.concatenate([b for b, _ in parts]).view(np.uint64)
        keys = np.concatenate([k for _, k in parts])
        return star_edges(buckets, keys)

    def memory_bytes(self) -> int:
        return sum(b.nbytes + k.nbytes for parts in self.parts.values() for b, k in parts)


def _band_buckets(bands: np.ndarray) -> np.ndarray:
    """One bucket per (band index, band key): mix the band index into the key."""
    index = np.arange(bands.shape[1], dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return (bands.view(np.uint64) ^ index).reshape(-1)


@ray.remote(num_cpus=1)
def route_task(sig_path: str, actors: list[Any], methods: list[str]) -> int:
    """Send each key of one signature shard to the actor that owns its bucket (bucket mod N)."""
    table = pq.read_table(sig_path)
    keys = table["key"].to_numpy()
    count = len(actors)
    pending = []
    for method in methods:
        if method == "fuzzy":
            width = table.schema.field("bands").type.list_size
            bands = np.asarray(pc.list_flatten(table["bands"]).to_numpy(), dtype=np.int64).reshape(-1, width)
            buckets, members = _band_buckets(bands), np.repeat(keys, width)
        else:
            column = table["text_hash" if method == "exact" else "url_hash"].to_numpy()
            valid = column != 0
            buckets, members = column[valid].view(np.uint64), keys[valid]
        owner = (buckets % np.uint64(count)).astype(np.int64)
        for index, actor in enumerate(actors):
            chosen = owner == index
            if chosen.any():
                pending.append(actor.add.remote(method, buckets[chosen].view(np.int64), members[chosen]))
    ray.get(pending)
    return len(keys)


@ray.remote(num_cpus=1)
def gather_task(source: str, wanted: np.ndarray) -> dict[int, DocInfo]:
    """doc key → what clustering needs, for the wanted documents of one shard."""
    table = pq.read_table(source, columns=["doc_id", "text", "crawl_date", "url"])
    keys = np.array([doc_key(d) for d in table["doc_id"].to_pylist()], dtype=np.int64)
    rows = np.flatnonzero(np.isin(keys, wanted))
    picked = table.take(pa.array(rows)).to_pylist()
    return {int(keys[r]): DocInfo(p["doc_id"], p["text"], p["crawl_date"], p["url"])
            for r, p in zip(rows, picked, strict=True)}


@ray.remote(num_cpus=1)
def verify_task(edges: np.ndarray, texts: dict[int, str], config: DedupConfig) -> list[tuple[int, int, float]]:
    """Exact Jaccard of each candidate edge; keeps those at or above the threshold."""
    shingle_sets = {int(key): set(config.shingles(texts[int(key)])) for key in np.unique(edges)}
    return verify_edges(edges, shingle_sets, config.threshold)


@ray.remote(num_cpus=1)
def filter_task(source: str, target: str, tmp_dir: str, removed: np.ndarray) -> int:
    """Copy one input shard without its removed documents (atomic; skipped when published)."""
    if Path(target).exists():
        return pq.read_metadata(target).num_rows
    table = pq.read_table(source)
    keys = np.array([doc_key(d) for d in table["doc_id"].to_pylist()], dtype=np.int64)
    kept = table.filter(pa.array(~np.isin(keys, removed)))
    publish_table(kept.replace_schema_metadata(None), Path(target), Path(tmp_dir))
    return kept.num_rows


BUCKET_ATTEMPTS = 3


def _bucket_edges(sig_paths: list[Path], methods: list[str], num_actors: int
                  ) -> tuple[tuple[dict[str, np.ndarray], int], int]:
    """Route every key to fresh bucket actors and collect star edges; redone when an actor is lost.

    Actor state lives in memory only, so losing an actor (its node died) restarts this phase from the
    published signature shards with new actors; the result does not depend on where actors ran. Returns
    ((edges per method, peak bytes held by one actor), times the phase was redone).
    """
    def bucket(actors: list[Any]) -> tuple[dict[str, np.ndarray], int]:
        ray.get([route_task.remote(str(p), actors, methods) for p in sig_paths])
        peak = max(ray.get([a.memory_bytes.remote() for a in actors]), default=0)
        return {m: np.concatenate(ray.get([a.edges.remote(m) for a in actors])) for m in methods}, peak

    return with_fresh_actors(lambda: [BucketActor.remote() for _ in range(num_actors)],  # type: ignore[attr-defined]
                             bucket, BUCKET_ATTEMPTS, "dedup bucketing")


def _chunks(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)] or [array]


def run_dedup(
    sources: list[Path], work_dir: Path, out_dir: Path, tmp_dir: Path, config: DedupConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dedup the document shards `sources`; returns (stats, one row per removed document).

    Kept documents are written to `out_dir` with the same file names as their source shards.
    """
    sig_paths = [work_dir / "sig" / s.name for s in sources]
    counted = ray.get([
        signature_task.remote(str(s), str(t), str(tmp_dir), config) for s, t in zip(sources, sig_paths, strict=True)
    ])
    docs_in, char_docs = sum(docs for docs, _ in counted), sum(chars for _, chars in counted)
    (edges, peak_actor_bytes), bucket_redone = _bucket_edges(sig_paths, config.methods(), config.num_actors)
    candidates = {m: np.unique(e, axis=0) if len(e) else e.reshape(0, 2) for m, e in edges.items()}
    involved = np.unique(np.concatenate([e.reshape(-1) for e in candidates.values()] or [np.empty(0, np.int64)]))
    info: dict[int, DocInfo] = {}
    wanted = ray.put(involved)
    for part in ray.get([gather_task.remote(str(s), wanted) for s in sources]):
        info.update(part)
    verified: list[tuple[int, int, float]] = []
    fuzzy = candidates.get("fuzzy", np.empty((0, 2), np.int64))
    if len(fuzzy) and config.verify:
        texts = ray.put({k: v.text for k, v in info.items()})
        for kept in ray.get([verify_task.remote(c, texts, config) for c in _chunks(fuzzy, 2000)]):
            verified.extend(kept)
    elif len(fuzzy):
        verified = [(int(a), int(b), float("nan")) for a, b in fuzzy.tolist()]
    dense = {int(k): i for i, k in enumerate(involved.tolist())}
    all_edges = [(dense[a], dense[b]) for a, b, _ in verified]
    for method in ("exact", "url"):
        all_edges += [(dense[a], dense[b]) for a, b in candidates.get(method, np.empty((0, 2))).tolist()]
    labels = connected_components(len(involved), all_edges)
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        clusters.setdefault(label, []).append(int(involved[index]))
    removed_docs, removed = cluster_rows(clusters.values(), info, config)
    rows = [asdict(row) for row in removed_docs]
    removed_ref = ray.put(np.array(removed, np.int64))
    ray.get([filter_task.remote(str(s), str(out_dir / s.name), str(tmp_dir), removed_ref) for s in sources])
    counts = {m: sum(r["method"] == m for r in rows) for m in METHODS}
    sizes = [len(m) for m in clusters.values() if len(m) > 1]
    bands, band_rows = config.lsh()
    stats = {
        "records_in": docs_in,
        "records_out": docs_in - len(removed),
        "dropped": {f"{m}_duplicate": counts[m] for m in METHODS if counts[m]},
        "clusters": len(sizes),
        "largest_cluster": max(sizes, default=1),
        "candidate_edges": {m: int(len(e)) for m, e in candidates.items()},
        "verified_fuzzy_edges": len(verified),
        "lsh": {"bands": bands, "rows": band_rows},
        "shingles": {"setting": config.shingle, "ngram": config.ngram, "word_documents": docs_in - char_docs,
                     "char_documents": char_docs},
        "peak_actor_bytes": int(peak_actor_bytes),
        "recovery": {"signature_tasks_retried": _retried(work_dir / "sig"), "bucket_phase_redone": bucket_redone},
    }
    return stats, rows
