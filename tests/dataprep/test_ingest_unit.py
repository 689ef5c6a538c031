"""One input file → shards: per-record classification, counted drops, and exact per-shard resume."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.ingest.documents import DATA_DIR, QUARANTINE_DIR, IngestConfig, IngestUnit, run_ingest_unit
from dataprep.stage import FaultPlan, InjectedFault, StageDir
from tests.conftest import html_page, make_warc

PROSE = "The garden behind the old house was full of roses, and every summer the neighbours came to admire them."


def _good_pages(count: int) -> list[dict]:
    return [{"url": f"https://ok.example/{i}", "body": html_page(f"Page {i}", [f"{PROSE} Number {i}."]).encode()}
            for i in range(count)]


def _bad_pages() -> list[dict]:
    return [
        {"url": "https://bad.example/png", "body": b"\x89PNG\r\n\x1a\n" + bytes(300), "content_type": "image/png"},
        {"url": "https://bad.example/css", "body": b"body { color: red }", "content_type": "text/css"},
        {"url": "https://bad.example/empty", "body": b""},
        {"url": "https://bad.example/huge", "body": html_page("Huge", [PROSE * 400]).encode()},
        {"url": "https://bad.example/garbage", "body": bytes(range(128, 256)) * 20},
        {"url": "https://bad.example/404", "body": html_page("Missing", ["gone"]).encode(), "status": 404},
        {"url": "https://bad.example/blank", "body": b"<html><body></body></html>"},
    ]


def _tables(stage: StageDir, subdir: str) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted((stage.path / subdir).glob("*.parquet"))}


def test_counts_every_drop_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.warc.gz"
    path.write_bytes(make_warc(_good_pages(3) + _bad_pages()))
    stage = StageDir(tmp_path / "ingest-x")
    stage.prepare()
    config = IngestConfig(inputs=[str(path)], max_payload_bytes=20_000)
    stats = run_ingest_unit(stage, IngestUnit(0, str(path), "warc"), config)
    assert stats["docs_out"] == 3
    assert stats["quarantined"] == {"binary_payload": 1, "non_html": 1, "empty_payload": 1, "too_large": 1,
                                    "invalid_encoding": 1, "http_not_ok": 1, "empty_text": 1}
    docs = pq.read_table(stage.path / DATA_DIR).to_pylist()
    assert {d["url"] for d in docs} == {f"https://ok.example/{i}" for i in range(3)}
    assert all(PROSE in d["text"] and "cookie" not in d["text"] for d in docs)
    quarantine = pq.read_table(stage.path / QUARANTINE_DIR).to_pylist()
    assert {q["url"]: q["reason"] for q in quarantine}["https://bad.example/huge"] == "too_large"
    assert all(q["source"] == str(path) and q["source_offset"] is not None for q in quarantine)
    assert stats["records_read"] == stats["docs_out"] + sum(stats["quarantined"].values())


@pytest.mark.parametrize("fail_after", [1, 3])
def test_resume_after_fault_equals_undisturbed_run(tmp_path: Path, fail_after: int) -> None:
    path = tmp_path / "many.warc.gz"
    path.write_bytes(make_warc(_good_pages(23) + _bad_pages()))
    unit = IngestUnit(4, str(path), "warc")
    settings = IngestConfig(inputs=[str(path)], shard_max_records=5)

    clean = StageDir(tmp_path / "clean" / "ingest-x")
    clean.prepare()
    clean_stats = run_ingest_unit(clean, unit, settings)

    crashed = StageDir(tmp_path / "crashed" / "ingest-x")
    crashed.prepare()
    with pytest.raises(InjectedFault):
        run_ingest_unit(crashed, unit, settings, FaultPlan(fail_after))
    assert len(list((crashed.path / DATA_DIR).glob("*.parquet"))) == fail_after
    crashed.prepare()
    resumed_stats = run_ingest_unit(crashed, unit, settings, FaultPlan(fail_after))  # past it: no second fault

    assert resumed_stats["resumed_from_shard"] == fail_after
    for key in ("records_read", "docs_out", "quarantined", "skipped", "bytes_in", "chars_out", "shards"):
        assert resumed_stats[key] == clean_stats[key], key
    assert _tables(crashed, DATA_DIR) == _tables(clean, DATA_DIR)
    assert _tables(crashed, QUARANTINE_DIR) == _tables(clean, QUARANTINE_DIR)
    ids = [d["doc_id"] for rows in _tables(crashed, DATA_DIR).values() for d in rows]
    assert len(ids) == len(set(ids)) == 24  # 23 good pages + the "huge" one (under the default size limit)


def test_finished_unit_is_not_redone(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "hello world"}\n{"text": ""}\n'))
    stage = StageDir(tmp_path / "ingest-x")
    stage.prepare()
    unit = IngestUnit(0, str(path), "jsonl")
    first = run_ingest_unit(stage, unit, IngestConfig(inputs=[str(path)]))
    path.unlink()
    assert run_ingest_unit(stage, unit, IngestConfig(inputs=[str(path)])) == first
    assert first["docs_out"] == 1 and first["quarantined"] == {"empty_text": 1}
