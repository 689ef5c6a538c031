"""Dedup after bucketing, partitioned: verification, connected components and representatives on Ray tasks.

Every document key belongs to one of P partitions (`partition_of`). Each task holds the rows of one partition
(or one input shard), never the whole corpus or edge list; the driver holds file names and counters only.
Intermediate tables live under `<work>/parts/` (rewritten on each run: they follow from the bucketing).

1. `endpoints_task(p)`: the keys of partition p on any candidate edge (`involved/p`).
2. `facts_task(shard)`: per partition, the involved documents of one input shard with their text, URL and
   crawl date (`facts/p/`), reading one partition's keys at a time.
3. `attach_task(p)` + `verify_task(q)`: a fuzzy edge (a, b) travels to a's partition to pick up a's text, then
   to b's, where the exact Jaccard similarity decides whether it is kept (`verified/q`).
4. `star_task(p)` rounds: large-star / small-star (`dataprep.dedup.components`) over the exact, URL and verified
   edges, each round's edges partitioned by node, until a large-star round changes nothing; `labels_task(p)`
   then gives each node its component's smallest key.
5. `members_task(p)`: facts joined with labels, sent to the label's partition; `cluster_task(q)` picks each
   cluster's representative (`dataprep.dedup.documents.cluster_rows`, as on the driver) and writes the audit rows
   and, per input shard, the removed keys that `filter_task` of that shard reads.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dataprep.dedup.components import (
    Step,
    both_directions,
    partition_of,
    star_labels,
    star_round,
    unique_pairs,
)
from dataprep.dedup.documents import DUPLICATES_SCHEMA, METHODS, DedupConfig, DocInfo, cluster_rows, verify_edges
from dataprep.dedup.lines import doc_key
from dataprep.shards import publish_table

MAX_ROUNDS = 200
FACT_COLUMNS = ["doc_id", "text", "crawl_date", "url"]


@dataclass(frozen=True)
class PartLayout:
    """Where each intermediate table of the partitioned phases lives."""

    root: Path
    partitions: int
    tmp: Path

    def dir(self, *names: object) -> Path:
        return self.root.joinpath(*(str(n) for n in names))

    def files(self, *names: object) -> list[str]:
        folder = self.dir(*names)
        return sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------ tables


def write_pairs(path: Path, pairs: np.ndarray, tmp: Path) -> None:
    """(a, b) int64 pairs → Parquet (atomic)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    publish_table(pa.table({"a": pairs[:, 0], "b": pairs[:, 1]}), path, tmp)


def read_pairs(paths: Iterable[str]) -> np.ndarray:
    """The (a, b) pairs of every file, concatenated."""
    parts = [np.stack([t["a"].to_numpy(), t["b"].to_numpy()], axis=1)
             for t in (pq.read_table(p, columns=["a", "b"]) for p in paths)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty((0, 2), dtype=np.int64)


def _split_pairs(pairs: np.ndarray, by: np.ndarray, layout: PartLayout, *folder: object, name: str) -> int:
    """Write `pairs` into `<folder>/<q>/<name>.parquet`, q = partition of `by`; returns the pairs written."""
    _split_table(pa.table({"a": pairs[:, 0], "b": pairs[:, 1]}), by, layout, *folder, name=name)
    return len(pairs)


def _split_table(table: pa.Table, by: np.ndarray, layout: PartLayout, *folder: object, name: str) -> None:
    owner = partition_of(by, layout.partitions)
    for q in range(layout.partitions):
        rows = np.flatnonzero(owner == q)
        if len(rows):
            publish_table(table.take(pa.array(rows)), layout.dir(*folder, q) / f"{name}.parquet", layout.tmp)


def _text_of(paths: list[str]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for path in paths:
        table = pq.read_table(path, columns=["key", "text"])
        texts.update(zip(table["key"].to_pylist(), table["text"].to_pylist(), strict=True))
    return texts


def _held(*arrays: np.ndarray) -> int:
    return int(sum(a.nbytes for a in arrays))


# ------------------------------------------------------------------------------------------------ tasks


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def endpoints_task(candidate_files: list[str], partition: int, layout: PartLayout) -> tuple[int, int]:
    """The distinct keys of `partition` on any candidate edge → `involved/<p>.parquet`. (keys, bytes held)."""
    found = []
    for path in candidate_files:  # one edge file at a time
        keys = read_pairs([path]).reshape(-1)
        found.append(np.unique(keys[partition_of(keys, layout.partitions) == partition]))
    involved = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    publish_table(pa.table({"key": involved}), layout.dir("involved") / f"{partition:05d}.parquet", layout.tmp)
    return len(involved), _held(involved)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def facts_task(source: str, shard: int, layout: PartLayout) -> tuple[int, int]:
    """The involved documents of one input shard → `facts/<p>/<shard>.parquet` (key, shard, text, URL, date)."""
    table = pq.read_table(source, columns=FACT_COLUMNS)
    keys = np.array([doc_key(d) for d in table["doc_id"].to_pylist()], dtype=np.int64)
    owner = partition_of(keys, layout.partitions)
    written, held = 0, _held(keys)
    for partition in range(layout.partitions):
        involved = pq.read_table(layout.dir("involved") / f"{partition:05d}.parquet")["key"].to_numpy()
        held = max(held, _held(keys, involved))
        rows = np.flatnonzero((owner == partition) & np.isin(keys, involved))
        if len(rows):
            picked = table.take(pa.array(rows))
            picked = picked.append_column("key", pa.array(keys[rows])).append_column(
                "shard", pa.array(np.full(len(rows), shard, dtype=np.int64)))
            publish_table(picked, layout.dir("facts", partition) / f"{shard:06d}.parquet", layout.tmp)
            written += len(rows)
    return written, held + int(table.nbytes)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def attach_task(fuzzy_files: list[str], partition: int, layout: PartLayout) -> int:
    """The distinct fuzzy edges (a, b) with a in `partition` (one band's bucket can repeat another's edge) + a's
    text → `half/<partition of b>/<p>.parquet`. Returns the distinct edges."""
    edges = read_pairs(fuzzy_files)
    edges = unique_pairs(edges[partition_of(edges[:, 0], layout.partitions) == partition])
    if not len(edges):
        return 0
    texts = _text_of(layout.files("facts", partition))
    table = pa.table({"a": edges[:, 0], "b": edges[:, 1], "text_a": [texts[int(a)] for a in edges[:, 0]]})
    _split_table(table, edges[:, 1], layout, "half", name=f"{partition:05d}")
    return len(edges)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def verify_task(partition: int, layout: PartLayout, config: DedupConfig) -> int:
    """Exact Jaccard of the fuzzy edges whose b is in `partition`; keeps those ≥ threshold → `verified/<p>`."""
    halves = [pq.read_table(path) for path in layout.files("half", partition)]
    if not halves:
        return 0
    table = pa.concat_tables(halves)
    texts = _text_of(layout.files("facts", partition))
    texts.update(zip(table["a"].to_pylist(), table["text_a"].to_pylist(), strict=True))
    edges = np.stack([table["a"].to_numpy(), table["b"].to_numpy()], axis=1)
    shingles = {key: set(config.shingles(texts[key])) for key in np.unique(edges).tolist()}
    kept = verify_edges(edges, shingles, config.threshold)
    pairs = np.array([(a, b) for a, b, _ in kept], dtype=np.int64).reshape(-1, 2)
    write_pairs(layout.dir("verified") / f"{partition:05d}.parquet", pairs, layout.tmp)
    return len(pairs)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def scatter_task(edge_files: list[str], name: str, layout: PartLayout) -> int:
    """Edges → round 0: both directions of each, by the partition of their first node."""
    pairs = both_directions(read_pairs(edge_files))
    return _split_pairs(pairs, pairs[:, 0], layout, "cc", 0, name=name)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def star_task(round_number: int, partition: int, step: Step, layout: PartLayout) -> tuple[bool, int]:
    """One large- or small-star round over the pairs of `partition` → round + 1. Returns (whether this
    partition's pairs equal those of two rounds before, i.e. the last large-star's input; pairs held)."""
    pairs = unique_pairs(read_pairs(layout.files("cc", round_number, partition)))
    unchanged = False
    if step == "large" and round_number >= 2:
        before = unique_pairs(read_pairs(layout.files("cc", round_number - 2, partition)))
        unchanged = np.array_equal(before, pairs)
    new = both_directions(star_round(pairs, step))
    _split_pairs(new, new[:, 0], layout, "cc", round_number + 1, name=f"{partition:05d}")
    return unchanged, len(pairs)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def labels_task(round_number: int, partition: int, layout: PartLayout) -> int:
    """Converged: each node of `partition` and its component's smallest key → `labels/<p>.parquet`."""
    nodes, labels = star_labels(unique_pairs(read_pairs(layout.files("cc", round_number, partition))))
    publish_table(pa.table({"key": nodes, "label": labels}), layout.dir("labels") / f"{partition:05d}.parquet",
                  layout.tmp)
    return len(nodes)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def members_task(partition: int, layout: PartLayout) -> int:
    """Facts of the labelled nodes of `partition` → `members/<partition of label>/<p>.parquet`."""
    labels_file = layout.dir("labels") / f"{partition:05d}.parquet"
    facts_files = layout.files("facts", partition)
    if not labels_file.exists() or not facts_files:
        return 0
    labels = pq.read_table(labels_file)
    facts = pa.concat_tables([pq.read_table(p) for p in facts_files])
    joined = facts.join(labels, "key", join_type="inner")
    _split_table(joined, joined["label"].to_numpy(), layout, "members", name=f"{partition:05d}")
    return joined.num_rows


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def cluster_task(partition: int, layout: PartLayout, config: DedupConfig) -> dict[str, Any]:
    """Representatives of the clusters labelled in `partition`: audit rows → `duplicates/<p>.parquet`, removed
    keys → `removed/<input shard>/<p>.parquet`. Returns counts per method, cluster sizes and rows held."""
    files = layout.files("members", partition)
    counts: dict[str, Any] = {"methods": dict.fromkeys(METHODS, 0), "sizes": [], "rows": 0}
    if not files:
        return counts
    members = pa.concat_tables([pq.read_table(p) for p in files]).to_pylist()
    info = {m["key"]: DocInfo(m["doc_id"], m["text"], m["crawl_date"], m["url"]) for m in members}
    shard_of = {m["key"]: m["shard"] for m in members}
    clusters: dict[int, list[int]] = {}
    for member in sorted(members, key=lambda m: m["key"]):
        clusters.setdefault(member["label"], []).append(member["key"])
    rows, removed = cluster_rows(clusters.values(), info, config)
    publish_table(pa.Table.from_pylist([asdict(r) for r in rows], schema=DUPLICATES_SCHEMA),
                  layout.dir("duplicates") / f"{partition:05d}.parquet", layout.tmp)
    by_shard: dict[int, list[int]] = {}
    for key in removed:
        by_shard.setdefault(shard_of[key], []).append(key)
    for shard, keys in by_shard.items():
        publish_table(pa.table({"key": np.array(keys, dtype=np.int64)}),
                      layout.dir("removed", f"{shard:06d}") / f"{partition:05d}.parquet", layout.tmp)
    for row in rows:
        counts["methods"][row.method] += 1
    counts["sizes"] = [len(keys) for keys in clusters.values() if len(keys) > 1]
    counts["rows"] = len(members)
    return counts


# ------------------------------------------------------------------------------------------------ driver


def connected_rounds(layout: PartLayout, edge_files: list[str]) -> tuple[int, int]:
    """Large-star / small-star rounds until converged; labels written. Returns (rounds, most pairs in one task)."""
    P = layout.partitions
    chunks = [edge_files[i::P] for i in range(P)]
    ray.get([scatter_task.remote(files, f"{i:05d}", layout) for i, files in enumerate(chunks) if files])
    largest = 0
    for round_number in range(MAX_ROUNDS):
        step: Step = "large" if round_number % 2 == 0 else "small"
        results = ray.get([star_task.remote(round_number, p, step, layout) for p in range(P)])
        largest = max([largest, *(held for _, held in results)])
        if step == "large" and round_number >= 2 and all(unchanged for unchanged, _ in results):
            ray.get([labels_task.remote(round_number, p, layout) for p in range(P)])
            return round_number, largest
    raise RuntimeError(f"dedup: connected components did not converge in {MAX_ROUNDS} rounds")


def partitioned_clusters(sources: list[Path], candidates: dict[str, list[str]], layout: PartLayout,
                         config: DedupConfig) -> dict[str, Any]:
    """Steps 1–5 of the module docstring; returns counters (the driver holds no document or edge)."""
    shutil.rmtree(layout.root, ignore_errors=True)
    P, all_candidates = layout.partitions, [f for files in candidates.values() for f in files]
    involved = ray.get([endpoints_task.remote(all_candidates, p, layout) for p in range(P)])
    facts = ray.get([facts_task.remote(str(s), i, layout) for i, s in enumerate(sources)])
    counted = {m: sum(pq.read_metadata(f).num_rows for f in files) for m, files in candidates.items()}
    verified_files = list(candidates.get("fuzzy", []))
    verified = counted.get("fuzzy", 0)
    if candidates.get("fuzzy") and config.verify:
        counted["fuzzy"] = sum(ray.get([attach_task.remote(candidates["fuzzy"], p, layout) for p in range(P)]))
        verified = sum(ray.get([verify_task.remote(p, layout, config) for p in range(P)]))
        verified_files = layout.files("verified")
    edge_files = [*candidates.get("exact", []), *candidates.get("url", []), *verified_files]
    rounds, round_pairs = connected_rounds(layout, edge_files)
    ray.get([members_task.remote(p, layout) for p in range(P)])
    clustered = ray.get([cluster_task.remote(p, layout, config) for p in range(P)])
    return {
        "candidate_edges": counted,
        "methods": {m: sum(c["methods"][m] for c in clustered) for m in METHODS},
        "sizes": [size for c in clustered for size in c["sizes"]],
        "verified_fuzzy_edges": verified,
        "components": {"mode": "partitioned", "partitions": P, "rounds": rounds,
                       "largest_task_rows": max([*(n for n, _ in involved), *(n for n, _ in facts), round_pairs,
                                                 *(c["rows"] for c in clustered)])},
    }

