"""Readers: WARC versions, WET, JSONL (.gz/.zst), Parquet, resume skipping and corrupt input."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dataprep.ingest.readers import detect_format, iter_warc, open_records, parse_timestamp
from tests.conftest import make_warc, mid_member_cut

PAGES = [{"url": f"https://site.example/{i}", "body": f"<html><p>page {i}</p></html>".encode()} for i in range(5)]


def _responses(records: list) -> list:
    return [r for r in records if r.rec_type == "response"]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("compressed", [True, False])
def test_warc_versions_and_compression(tmp_path: Path, version: str, compressed: bool) -> None:
    path = tmp_path / ("a.warc.gz" if compressed else "a.warc")
    path.write_bytes(make_warc(PAGES, gzip=compressed, version=version))
    records = list(open_records(str(path), "warc"))
    assert [r.url for r in records] == [p["url"] for p in PAGES]
    assert records[2].payload == PAGES[2]["body"]
    assert records[0].http_status == 200 and records[0].crawl_date.year == 2024
    assert [r.index for r in records] == list(range(5))
    assert len({r.offset for r in records}) == 5


def test_warc_0_18_headers(tmp_path: Path) -> None:
    body = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html><p>old crawl</p></html>"
    header = (
        "WARC/0.18\r\nWARC-Type: response\r\nWARC-Target-URI: http://old.example/\r\n"
        "WARC-Date: 2008-04-30T20:48:25Z\r\nWARC-Record-ID: <urn:uuid:1>\r\n"
        f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    path = tmp_path / "old.warc"
    path.write_bytes(header + body + b"\r\n\r\n")
    (record,) = open_records(str(path), "warc")
    assert record.url == "http://old.example/"
    assert record.payload == b"<html><p>old crawl</p></html>"
    assert record.crawl_date.year == 2008


def test_start_index_skips_without_losing_records(tmp_path: Path) -> None:
    path = tmp_path / "a.warc.gz"
    path.write_bytes(make_warc(PAGES))
    assert [r.index for r in open_records(str(path), "warc", start_index=3)] == [3, 4]


def test_truncated_gzip_flags_the_cut_record(tmp_path: Path) -> None:
    data = make_warc(PAGES * 40)
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[: mid_member_cut(data, 130)])
    records = list(open_records(str(path), "warc"))
    assert [r.index for r in records if r.problem is None] == list(range(130)), "records before the cut are kept"
    problems = [r.problem for r in records if r.problem]
    assert problems and set(problems) <= {"truncated_record", "corrupt_gzip", "malformed_record"}
    assert all(r.problem is None for r in records[:-1])


def test_cut_in_the_last_gzip_trailer_keeps_the_whole_record(tmp_path: Path) -> None:
    """Only the CRC/size trailer of the last member is gone: the record's content is whole and kept."""
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(make_warc(PAGES)[:-3])
    records = list(open_records(str(path), "warc"))
    assert [r.problem for r in records] == [None] * 5 and records[-1].payload == PAGES[-1]["body"]


def test_malformed_record_is_reported_and_reader_resyncs(tmp_path: Path) -> None:
    first = make_warc(PAGES[:2])
    rest = make_warc(PAGES[2:])
    path = tmp_path / "bad.warc.gz"
    junk = gzip.compress(bytes(range(256)) * 8, mtime=0)
    path.write_bytes(first + junk + rest)
    records = list(open_records(str(path), "warc"))
    assert [r.problem for r in records].count("malformed_record") == 1
    assert [r.url for r in records if not r.problem] == [p["url"] for p in PAGES]


def test_iter_warc_on_empty_stream() -> None:
    assert list(iter_warc(io.BytesIO(b""), "empty.warc")) == []


def _jsonl_lines() -> bytes:
    rows = [{"id": "a", "text": "alpha", "url": "https://a.example", "date": "2020-03-29T09:04:10Z", "lang": "en"},
            {"id": "b", "text": "beta"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(1, b'{"id": "broken", "text": ')
    lines.insert(2, b'{"id": "latin", "text": "caf\xe9"}')
    lines.append(b'["not", "an", "object"]')
    lines.append(b'{"id": "no-text"}')
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_with_bad_lines(tmp_path: Path, suffix: str) -> None:
    data = _jsonl_lines()
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(data)
    records = list(open_records(str(path), detect_format(str(path))))
    assert [r.problem for r in records] == [None, "malformed_json", "invalid_utf8", None, "malformed_json",
                                            "missing_text"]
    first = records[0]
    assert (first.text, first.doc_id, first.url, first.metadata) == ("alpha", "a", "https://a.example", {"lang": "en"})
    assert first.crawl_date == parse_timestamp("2020-03-29T09:04:10Z")


def test_truncated_jsonl_gz(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    records = list(open_records(str(path), "jsonl"))
    assert records[-1].problem == "corrupt_compression"
    assert all(r.problem is None for r in records[:-1]) and len(records) > 10


def test_parquet_rows_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(2500)], "id": [str(i) for i in range(2500)]}), path)
    records = list(open_records(str(path), "parquet", start_index=2000))
    assert [r.index for r in records][:2] == [2000, 2001] and len(records) == 500
    assert records[0].text == "doc 2000"


def test_corrupt_parquet_is_one_problem_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all PAR1")
    (record,) = open_records(str(path), "parquet")
    assert record.problem == "corrupt_parquet" and record.detail.startswith("ArrowInvalid")


def test_detect_format() -> None:
    assert detect_format("s3://b/CC-MAIN-1.warc.gz") == "warc"
    assert detect_format("x/CC-MAIN-1.warc.wet.gz") == "wet"
    assert detect_format("a.jsonl.zst") == "jsonl"
    assert detect_format("https://h/a.parquet") == "parquet"
    with pytest.raises(ValueError, match="ingest.format"):
        detect_format("a.csv")
