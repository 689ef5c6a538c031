"""Ray side of corpus-wide line/paragraph dedup (rules and hashing in `dataprep.dedup.lines`).

Flow of data (only small arrays and stats pass through the driver):
1. `hash_task` per document shard: the distinct segment hashes of every document as (hash, doc key) pairs,
   written to a work file (atomic), returning how many pairs fall in each partition.
2. `route_task` per work file sends each partition's pairs, as numpy arrays in batches, to the
   `LineCountActor` owning that partition (hash mod N), so each actor holds about 1/N of the distinct
   hashes. Batches carry an id and an actor ignores one it has already seen, so a retried task does not
   count twice. With `bloom`, a first routing pass only screens hashes through each actor's Bloom filter
   and the counting pass keeps exact counters for the screened candidates only (exact result, less memory).
3. `remove_task` per document shard asks the actors which of its hashes are removable (and, for
   first_occurrence, which document keeps each), writes the shard without the removed segments plus
   `lines_removed` / `chars_removed` columns, and the documents left (almost) empty to `out_removed`.

Output depends only on the documents: not on shard order, actor count or where tasks ran.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dataprep.dedup.lines import (
    EMPTY_REASON,
    HashCounts,
    LineDedupConfig,
    RepeatScreen,
    doc_key,
    document_pairs,
    hash_parts,
    is_emptied,
    partitions,
    remove_hashed,
    segments,
    sorted_member,
)
from dataprep.shards import publish_table
from workers.ray_runtime import with_fresh_actors

log = logging.getLogger(__name__)
BATCH_PAIRS = 1 << 18
TOP_SEGMENTS = 20
ATTEMPTS = 3
WORK_DIR_NAME = "line_dedup_work"


@ray.remote(num_cpus=0)
class LineCountActor:
    """hash → (documents containing it, first document key) for the hashes of one partition only."""

    def __init__(self, config: LineDedupConfig, bloom_capacity: int) -> None:
        self.rule, self.min_docs = config.rule, config.min_docs
        self.table = HashCounts()
        self.screen = RepeatScreen(bloom_capacity, config.bloom_fp_rate) if config.bloom else None
        self.candidates: np.ndarray | None = None
        self.bloom_stats: dict[str, Any] = {}
        self.batches: set[str] = set()

    def _fresh(self, batch_id: str) -> bool:
        if batch_id in self.batches:
            return False
        self.batches.add(batch_id)
        return True

    def screen_batch(self, batch_id: str, hashes: np.ndarray) -> int:
        if self.screen is not None and self._fresh(batch_id):
            self.screen.add(hashes)
        return len(hashes)

    def finish_screen(self) -> int:
        """Keep the candidates, free the Bloom filter; returns the candidate count."""
        assert self.screen is not None, "screening needs bloom=True"
        self.candidates = self.screen.candidates()
        bloom = self.screen.bloom
        self.bloom_stats = {"bloom_bytes": int(bloom.bits.nbytes), "bloom_inserted": int(bloom.inserted),
                            "bloom_expected_fp_rate": bloom.expected_fp_rate, "candidates": len(self.candidates)}
        self.screen = None
        return len(self.candidates)

    def add_batch(self, batch_id: str, hashes: np.ndarray, keys: np.ndarray) -> int:
        if not self._fresh(batch_id):
            return 0
        if self.candidates is not None:
            chosen = sorted_member(self.candidates, hashes)
            hashes, keys = hashes[chosen], keys[chosen]
        self.table.add(hashes, keys)
        return len(hashes)

    def summary(self) -> dict[str, Any]:
        mask = self.table.removable_mask(self.rule, self.min_docs)
        return {"hashes": len(self.table), "table_bytes": self.table.nbytes, "removable_hashes": int(mask.sum()),
                "expected_removals": self.table.expected_removals(self.rule, self.min_docs), **self.bloom_stats}

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.table.top(k, self.rule, self.min_docs)

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The removable subset of `hashes` with the key of the document that keeps each (first_occurrence)."""
        return self.table.query(hashes, self.rule, self.min_docs)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def hash_task(source: str, target: str, tmp_dir: str, config: LineDedupConfig) -> np.ndarray:
    """(hash, doc key) pairs of one document shard → `target`; returns the pair count per partition."""
    table = pq.read_table(source, columns=["doc_id", "text"])
    hashes, keys = document_pairs(
        table["doc_id"].to_pylist(), table["text"].to_pylist(), config.mode, config.exempt_below
    )
    pairs = pa.table({"hash": pa.array(hashes, pa.uint64()), "key": pa.array(keys, pa.int64())})
    publish_table(pairs, Path(target), Path(tmp_dir))
    return np.bincount(partitions(hashes, config.num_actors), minlength=config.num_actors)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def route_task(path: str, actors: list[Any], kind: str) -> int:
    """Send the pairs of one work file to their partitions' actors, `kind` "screen" or "count"."""
    table = pq.read_table(path)
    hashes, keys = table["hash"].to_numpy(), table["key"].to_numpy()
    owner = partitions(hashes, len(actors))
    pending = []
    for index, actor in enumerate(actors):
        rows = np.flatnonzero(owner == index)
        for number, start in enumerate(range(0, len(rows), BATCH_PAIRS)):
            batch, batch_id = rows[start : start + BATCH_PAIRS], f"{kind}:{path}:{number}"
            if kind == "screen":
                pending.append(actor.screen_batch.remote(batch_id, hashes[batch]))
            else:
                pending.append(actor.add_batch.remote(batch_id, hashes[batch], keys[batch]))
    ray.get(pending)
    return len(hashes)


def _verdicts(actors: list[Any], hashes: np.ndarray) -> dict[int, int]:
    """removable hash → key of the document that keeps it (meaningful for first_occurrence only)."""
    if not actors or not len(hashes):
        return {}
    owner = partitions(hashes, len(actors))
    replies = ray.get([actor.query.remote(hashes[owner == i]) for i, actor in enumerate(actors)])
    return {h: k for removable, keys in replies for h, k in zip(removable.tolist(), keys.tolist(), strict=True)}


def _shard_stats(documents: int) -> dict[str, Any]:
    return {"documents_in": documents, "documents_out": 0, "dropped": 0, "documents_affected": 0, "segments_seen": 0,
            "segments_removed": 0,
            "pairs_removed": 0, "chars_in": 0, "chars_removed": 0, "samples": {}}


def _sample(samples: dict[int, tuple[int, str, str]], value: int, key: int, doc_id: str, text: str) -> None:
    """Keep, per audited hash, the segment text of the document that sorts first (deterministic)."""
    if value not in samples or (key, doc_id) < samples[value][:2]:
        samples[value] = (key, doc_id, text)


def _rewrite(
    table: pa.Table, config: LineDedupConfig, actors: list[Any], audit: set[int]
) -> tuple[list[str], list[int], list[int], dict[str, Any]]:
    """New texts, per-document removed segment and character counts, and the shard's stats."""
    doc_ids, texts = table["doc_id"].to_pylist(), [t or "" for t in table["text"].to_pylist()]
    stats = _shard_stats(len(doc_ids))
    stats["chars_in"] = sum(len(t) for t in texts)
    if config.mode == "off":
        return texts, [0] * len(texts), [0] * len(texts), stats
    split = [segments(t, config.mode) for t in texts]
    hashed = [hash_parts(parts, config.exempt_below) for parts in split]
    distinct = np.unique(np.fromiter((h for hs in hashed for h in hs if h), dtype=np.uint64))
    verdict = _verdicts(actors, distinct)
    owners = verdict if config.rule == "first_occurrence" else None
    new_texts, lines, chars = [], [], []
    for doc_id, text, parts, hashes in zip(doc_ids, texts, split, hashed, strict=True):
        key = doc_key(doc_id)
        new_text, removed = remove_hashed(parts, hashes, config.mode, verdict, owners, key)
        for part, value in zip(parts, hashes, strict=True):
            if value in audit:
                _sample(stats["samples"], value, key, doc_id, part)
        new_texts.append(new_text)
        lines.append(len(removed))
        chars.append(len(text) - len(new_text))
        stats["segments_seen"] += len(parts)
        stats["pairs_removed"] += len(set(removed))
    stats["segments_removed"], stats["chars_removed"] = sum(lines), sum(chars)
    return new_texts, lines, chars, stats


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def remove_task(
    source: str, target: str, removed_target: str, tmp_dir: str, config: LineDedupConfig, actors: list[Any],
    audit: np.ndarray,
) -> dict[str, Any]:
    """Rewrite one document shard without its removed segments (atomic); emptied documents → `removed_target`."""
    table = pq.read_table(source).replace_schema_metadata(None)
    new_texts, lines, chars, stats = _rewrite(table, config, actors, set(audit.tolist()))
    text_field = table.schema.field("text")
    rewritten = table.set_column(table.schema.get_field_index("text"), text_field, pa.array(new_texts, pa.string()))
    counts = [pa.array(lines, pa.int32()), pa.array(chars, pa.int64())]
    rewritten = rewritten.append_column(pa.field("lines_removed", pa.int32(), nullable=False), counts[0])
    rewritten = rewritten.append_column(pa.field("chars_removed", pa.int64(), nullable=False), counts[1])
    emptied = np.array([is_emptied(t, n, config.min_doc_chars) for t, n in zip(new_texts, lines, strict=True)],
                       dtype=bool)
    publish_table(rewritten.filter(pa.array(~emptied)), Path(target), Path(tmp_dir))
    if emptied.any():
        dropped = table.append_column("lines_removed", counts[0]).append_column("chars_removed", counts[1])
        dropped = dropped.filter(pa.array(emptied))
        dropped = dropped.append_column("reason", pa.array([EMPTY_REASON] * dropped.num_rows, pa.string()))
        publish_table(dropped, Path(removed_target), Path(tmp_dir))
    stats["dropped"] = int(emptied.sum())
    stats["documents_affected"] = sum(1 for count in lines if count)
    stats["documents_out"] = len(new_texts) - stats["dropped"]
    return stats


def _actors(capacities: np.ndarray, config: LineDedupConfig) -> list[Any]:
    """Fresh count actors, one per partition."""
    return [LineCountActor.remote(config, int(capacities[i]))  # type: ignore[attr-defined]
            for i in range(config.num_actors)]


def _route(work_paths: list[Path], actors: list[Any], config: LineDedupConfig) -> None:
    """Every work file's pairs into the actors' counts (through their Bloom screens first with `bloom`)."""
    if config.bloom:
        ray.get([route_task.remote(str(p), actors, "screen") for p in work_paths])
        ray.get([actor.finish_screen.remote() for actor in actors])
    ray.get([route_task.remote(str(p), actors, "count") for p in work_paths])


def _top(actors: list[Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k removable hashes in the most documents over all partitions (ties: smaller hash)."""
    replies = ray.get([actor.top.remote(k) for actor in actors])
    hashes = np.concatenate([np.empty(0, np.uint64), *(h for h, _ in replies)])
    counts = np.concatenate([np.empty(0, np.int64), *(c for _, c in replies)])
    order = np.lexsort((hashes, -counts))[:k]
    return hashes[order], counts[order]


def _remove(
    sources: list[Path], out_data: Path, out_removed: Path, tmp_dir: Path, config: LineDedupConfig,
    actors: list[Any], audit: np.ndarray,
) -> list[dict[str, Any]]:
    """Run `remove_task` on every shard; returns the per-shard stats."""
    audit_ref = ray.put(audit)
    return ray.get([
        remove_task.remote(str(s), str(out_data / s.name), str(out_removed / s.name), str(tmp_dir), config, actors,
                           audit_ref)
        for s in sources
    ])


def _hash_all(
    sources: list[Path], work: Path, tmp_dir: Path, config: LineDedupConfig
) -> tuple[list[Path], np.ndarray]:
    """Work files of every shard, and the number of pairs per partition (Bloom filter capacities)."""
    paths = [work / s.name for s in sources]
    capacities = ray.get([
        hash_task.remote(str(s), str(p), str(tmp_dir), config) for s, p in zip(sources, paths, strict=True)
    ])
    return paths, np.sum(capacities, axis=0) if capacities else np.zeros(config.num_actors, np.int64)


def _run_with_actors(
    sources: list[Path], out_data: Path, out_removed: Path, tmp_dir: Path, config: LineDedupConfig, work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[np.ndarray, np.ndarray], dict[str, float],
           int]:
    """Hash, count, then remove; the actor phases are redone with fresh actors if one is lost. Also returns the
    seconds of the hashing, counting and removal passes, and how many times the actor phases were redone."""
    started = time.perf_counter()
    work_paths, capacities = _hash_all(sources, work, tmp_dir, config)
    hashed = time.perf_counter()
    def count_and_remove(actors: list[Any]) -> tuple[Any, ...]:
        counting = time.perf_counter()
        _route(work_paths, actors, config)
        summaries = ray.get([actor.summary.remote() for actor in actors])
        top = _top(actors, TOP_SEGMENTS)
        removing = time.perf_counter()
        results = _remove(sources, out_data, out_removed, tmp_dir, config, actors, top[0])
        seconds = {"hash": hashed - started, "count": removing - counting, "remove": time.perf_counter() - removing}
        return results, summaries, top, seconds

    (results, summaries, top, seconds), redone = with_fresh_actors(
        lambda: _actors(capacities, config), count_and_remove, ATTEMPTS, "line dedup counting")
    return results, summaries, top, seconds, redone


def run_line_dedup(
    sources: list[Path], out_data: Path, out_removed: Path, tmp_dir: Path, config: LineDedupConfig,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Remove corpus-wide repeated lines/paragraphs from the document shards `sources`; returns stats.

    Each shard is rewritten to `out_data/<name>` (same schema plus `lines_removed`, `chars_removed`);
    documents that removal leaves with fewer than `min_doc_chars` non-blank characters go to
    `out_removed/<name>` with their original text, the two counters and `reason` = line_dedup_empty.
    Work files (16 bytes per document and distinct segment) live in `work_dir` (default
    `tmp_dir/line_dedup_work`) and are deleted at the end.
    """
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("source shards must have distinct file names (outputs are named after them)")
    if config.mode == "off":
        results = _remove(sources, out_data, out_removed, tmp_dir, config, [], np.empty(0, np.uint64))
        return _stats(config, results, [], (np.empty(0, np.uint64), np.empty(0, np.int64)), {})
    work = work_dir or tmp_dir / WORK_DIR_NAME
    try:
        results, summaries, top, seconds, redone = _run_with_actors(
            sources, out_data, out_removed, tmp_dir, config, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**_stats(config, results, summaries, top, seconds), "actor_phase_redone": redone}


def _top_rows(results: list[dict[str, Any]], top: tuple[np.ndarray, np.ndarray], rule: str) -> list[dict[str, Any]]:
    """The audited segments: original text (from the first document containing it) and document counts."""
    samples: dict[int, tuple[int, str, str]] = {}
    for result in results:
        for value, (key, doc_id, text) in result["samples"].items():
            _sample(samples, value, key, doc_id, text)
    return [
        {"text": samples.get(h, (0, "", ""))[2], "docs": c, "removed_from_docs": c - int(rule == "first_occurrence"),
         "hash": f"{h:016x}"}
        for h, c in zip(top[0].tolist(), top[1].tolist(), strict=True)
    ]


def _stats(
    config: LineDedupConfig, results: list[dict[str, Any]], summaries: list[dict[str, Any]],
    top: tuple[np.ndarray, np.ndarray], seconds: dict[str, float],
) -> dict[str, Any]:
    """Totals over shards, the count-only predictions of the actors, the audit of frequent segments, and the
    seconds of each pass."""
    total = {k: sum(r[k] for r in results) for k in ("documents_in", "documents_out", "documents_affected",
                                                     "segments_seen",
                                                     "segments_removed", "pairs_removed", "chars_in",
                                                     "chars_removed")}
    dropped = sum(r["dropped"] for r in results)
    return {
        "mode": config.mode,
        "rule": config.rule,
        **total,
        "dropped": {EMPTY_REASON: dropped} if dropped else {},
        "counting": {
            "distinct_hashes": sum(s.get("bloom_inserted", s["hashes"]) for s in summaries),
            "distinct_hashes_exact": not config.bloom,
            "hashes": sum(s["hashes"] for s in summaries),
            "removable_hashes": sum(s["removable_hashes"] for s in summaries),
            "expected_removals": sum(s["expected_removals"] for s in summaries),
            "per_actor": summaries,
        },
        "top_removed": _top_rows(results, top, config.rule),
        "seconds": {phase: round(value, 3) for phase, value in seconds.items()},
    }
