"""Dedup on real local Ray: planted duplicates found, nothing lost without duplicates, determinism."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.dedup.documents import DedupConfig
from dataprep.ingest.documents import DOCUMENT_SCHEMA
from workers.dedup import read_audit, run_dedup

pytestmark = pytest.mark.integration

PARAMS = DedupConfig(partitions=2)


def _doc(doc_id: str, text: str, url: str, day: int) -> dict:
    return {"doc_id": doc_id, "text": text, "url": url, "crawl_date": datetime(2026, 1, 1, tzinfo=UTC)
            + timedelta(days=day), "source": "test", "source_format": "jsonl", "source_index": 0, "payload_bytes": 1}


def _corpus(rng: random.Random, originals: int = 60) -> tuple[list[dict], dict[str, str]]:
    """Unique documents plus exact copies, re-captures and near-duplicates (1 % of words edited)."""
    docs, expected = [], {}
    for i in range(originals):
        words = [f"w{rng.randrange(30_000)}" for _ in range(rng.randrange(150, 400))]
        docs.append(_doc(f"orig-{i:03d}", " ".join(words), f"https://site.example/{i}", day=0))
        if i % 6 == 0:
            docs.append(_doc(f"copy-{i:03d}", " ".join(words), f"https://mirror.example/{i}", day=3))
            expected[f"copy-{i:03d}"] = "exact"
        if i % 6 == 1:
            edited = list(words)
            for position in rng.sample(range(len(edited)), max(1, len(edited) // 100)):
                edited[position] = f"z{rng.randrange(30_000)}"
            docs.append(_doc(f"near-{i:03d}", " ".join(edited), f"https://other.example/{i}", day=5))
            expected[f"near-{i:03d}"] = "fuzzy"
        if i % 6 == 2:
            docs.append(_doc(f"recap-{i:03d}", " ".join(words[:-20]) + " updated footer", f"HTTPS://SITE.example/{i}#top",
                             day=9))
            expected[f"recap-{i:03d}"] = "url"
    return docs, expected


def _write_shards(folder: Path, docs: list[dict], per_shard: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, start in enumerate(range(0, len(docs), per_shard)):
        path = folder / f"part-{number:05d}-00000.parquet"
        pq.write_table(pa.Table.from_pylist(docs[start : start + per_shard], schema=DOCUMENT_SCHEMA), path)
        paths.append(path)
    return paths


def _run(tmp: Path, sources: list[Path], **overrides: object) -> tuple[dict, list[dict], list[str]]:
    stats, audit = run_dedup(sources, tmp / "work", tmp / "out", tmp / "tmp", PARAMS.model_copy(update=overrides))
    rows = read_audit(audit)
    kept = sorted(d for p in sorted((tmp / "out").glob("*.parquet")) for d in pq.read_table(p)["doc_id"].to_pylist())
    return stats, rows, kept


def test_planted_duplicates_are_found(tmp_path: Path, ray_local: None) -> None:
    docs, expected = _corpus(random.Random(7))
    stats, rows, kept = _run(tmp_path, _write_shards(tmp_path / "in", docs, 25))
    assert {r["doc_id"]: r["method"] for r in rows} == expected
    assert all(r["representative_id"].startswith("orig-") for r in rows), "earliest capture is kept"
    assert len(kept) == len(docs) - len(expected) and stats["records_out"] == len(kept)
    assert stats["dropped"] == {"exact_duplicate": 10, "url_duplicate": 10, "fuzzy_duplicate": 10}
    assert stats["largest_cluster"] == 2


def test_corpus_without_duplicates_loses_nothing(tmp_path: Path, ray_local: None) -> None:
    rng = random.Random(3)
    docs = [_doc(f"d{i}", " ".join(f"w{rng.randrange(30_000)}" for _ in range(200)), f"https://u.example/{i}", 0)
            for i in range(120)]
    stats, rows, kept = _run(tmp_path, _write_shards(tmp_path / "in", docs, 40))
    assert rows == [] and len(kept) == 120 and stats["dropped"] == {}


def test_same_output_for_1_2_4_bucket_partitions_and_shuffled_input(tmp_path: Path, ray_local: None) -> None:
    docs, _ = _corpus(random.Random(11), originals=36)
    reference = None
    for run, (partitions, seed) in enumerate([(1, None), (2, None), (4, None), (2, 5)]):
        ordered = list(docs)
        if seed is not None:
            random.Random(seed).shuffle(ordered)
        sources = _write_shards(tmp_path / f"in{run}", ordered, 17)
        _, rows, kept = _run(tmp_path / f"run{run}", sources, partitions=partitions)
        result = (sorted((r["doc_id"], r["representative_id"], r["method"], round(r["similarity"], 9)) for r in rows),
                  kept)
        reference = reference or result
        assert result == reference, f"run {run}: {partitions} partitions, shuffle seed {seed}"


def _chains(rng: random.Random, count: int, length: int) -> list[dict]:
    """Chains of near-copies: each link 3 % of words edited from the one before, so far ends of a chain can
    fall below the threshold while every link passes: only connected components join a chain into one cluster."""
    docs = []
    for chain in range(count):
        words = [f"c{rng.randrange(30_000)}" for _ in range(300)]
        for link in range(length):
            docs.append(_doc(f"chain-{chain:02d}-{link}", " ".join(words), f"https://chain.example/{chain}/{link}",
                             day=rng.randrange(30)))
            for position in rng.sample(range(len(words)), len(words) * 3 // 100):
                words[position] = f"e{rng.randrange(30_000)}"
    return docs


def _outcome(rows: list[dict], kept: list[str]) -> tuple[list[tuple], list[str]]:
    return sorted((r["doc_id"], r["cluster_id"], r["representative_id"], r["method"], round(r["similarity"], 9),
                   r["cluster_size"]) for r in rows), kept


def test_partitioned_components_equal_the_driver_for_1_2_4_partitions_and_shuffled_input(
        tmp_path: Path, ray_local: None) -> None:
    docs, _ = _corpus(random.Random(13), originals=30)
    docs += _chains(random.Random(4), count=6, length=6)
    driver_stats, rows, kept = _run(tmp_path / "driver", _write_shards(tmp_path / "in", docs, 20), components="driver")
    reference = _outcome(rows, kept)
    assert driver_stats["components"]["mode"] == "driver" and driver_stats["largest_cluster"] == 6
    held = {}
    for run, (partitions, seed) in enumerate([(1, None), (2, None), (4, None), (4, 5)]):
        ordered = list(docs)
        if seed is not None:
            random.Random(seed).shuffle(ordered)
        sources = _write_shards(tmp_path / f"in{run}", ordered, 20)
        stats, rows, kept = _run(tmp_path / f"run{run}", sources, components="partitioned", partitions=partitions)
        assert _outcome(rows, kept) == reference, f"{partitions} partitions, shuffle seed {seed}"
        assert stats["components"]["mode"] == "partitioned" and stats["components"]["rounds"] >= 2
        varying = ("components", "seconds", "peak_partition_bytes")  # how it ran, not what it found
        assert {k: v for k, v in stats.items() if k not in varying} == {
            k: v for k, v in driver_stats.items() if k not in varying}
        held[partitions] = stats["components"]["largest_task_rows"]
    assert held[4] < held[2] < held[1], f"the largest table one task holds falls as partitions grow: {held}"
