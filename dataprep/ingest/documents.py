"""Ingest logic: raw crawl records → documents (or quarantined rows), written as resumable shards.

`run_ingest_unit` processes one input file. It is pure Python (no Ray) so it can be tested directly;
`workers.ingest` runs it as a Ray task per file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import xxhash
from pydantic import Field

from dataprep.ingest.charset import decode_html, decode_utf8_text
from dataprep.ingest.extract import ExtractorName, get_extractor
from dataprep.ingest.readers import FieldMap, RawRecord, open_records
from dataprep.shards import publish_table, read_shard_meta
from dataprep.stage import (
    DATA_DIR,
    QUARANTINE_DIR,
    ConfigLocation,
    FaultPlan,
    StageConfig,
    StageDir,
    merge_counts,
    shard_name,
)

CODE_VERSION = "ingest-1"
SKIPPED_RECORD_TYPES = ("warcinfo", "request", "metadata", "revisit", "continuation")
PAYLOAD_SAMPLE_BYTES = 1024

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("crawl_date", pa.timestamp("us", tz="UTC")),
        pa.field("content_type", pa.string()),
        pa.field("charset", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_format", pa.string(), nullable=False),
        pa.field("source_offset", pa.int64()),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("source_id", pa.string()),
        pa.field("payload_bytes", pa.int64(), nullable=False),
        pa.field("metadata", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_format", pa.string(), nullable=False),
        pa.field("source_offset", pa.int64()),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("url", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("content_type", pa.string()),
        pa.field("payload_bytes", pa.int64()),
        pa.field("payload_sample", pa.binary()),
    ]
)

_HTML_TYPES = ("text/html", "application/xhtml+xml")
_BINARY_MAGIC = (
    b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"%PDF", b"PK\x03\x04", b"\x1f\x8b", b"RIFF", b"\x00\x00\x01\x00",
)


class IngestConfig(StageConfig):
    """The ingest stage: crawl files → documents (the same object in the flow and in every Ray task)."""

    inputs: list[ConfigLocation] = Field(..., min_length=1, description="paths, globs or fsspec URLs")
    format: Literal["auto", "warc", "wet", "jsonl", "parquet"] = "auto"
    extractor: ExtractorName = "resiliparse"
    max_payload_bytes: int = Field(10_000_000, ge=1)
    min_text_chars: int = Field(1, ge=0)
    max_invalid_fraction: float = Field(0.01, ge=0.0, le=1.0)
    shard_max_records: int = Field(2000, ge=1)
    shard_max_bytes: int = Field(64_000_000, ge=1)
    fields: FieldMap = FieldMap()


@dataclass(frozen=True)
class IngestUnit:
    """One input file, its position in the sorted input list and its format."""

    index: int
    uri: str
    fmt: str

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


# ------------------------------------------------------------------------------------------ per record


def make_doc_id(source: str, index: int) -> str:
    """Stable id: xxh3-128 of the source URI and the record's index in it."""
    return xxhash.xxh3_128_hexdigest(f"{source}#{index}".encode())


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _looks_binary(payload: bytes) -> bool:
    head = payload[:1024]
    return b"\x00" in head or head.startswith(_BINARY_MAGIC)


def _rejection(raw: RawRecord, reason: str, detail: str | None = None) -> dict[str, Any]:
    return {
        "source": raw.source,
        "source_format": raw.source_format,
        "source_offset": raw.offset,
        "source_index": raw.index,
        "reason": reason,
        "detail": detail if detail is not None else raw.detail,
        "url": raw.url,
        "source_id": raw.record_id or raw.doc_id,
        "content_type": raw.content_type,
        "payload_bytes": raw.payload_bytes,
        "payload_sample": (raw.payload or (raw.text or "").encode("utf-8", "replace"))[:PAYLOAD_SAMPLE_BYTES],
    }


def _document(raw: RawRecord, text: str, charset: str | None) -> dict[str, Any]:
    return {
        "doc_id": make_doc_id(raw.source, raw.index),
        "text": text,
        "url": raw.url,
        "crawl_date": raw.crawl_date,
        "content_type": raw.content_type,
        "charset": charset,
        "http_status": raw.http_status,
        "source": raw.source,
        "source_format": raw.source_format,
        "source_offset": raw.offset,
        "source_index": raw.index,
        "source_id": raw.record_id or raw.doc_id,
        "payload_bytes": raw.payload_bytes,
        "metadata": json.dumps(raw.metadata, sort_keys=True, default=str) if raw.metadata else None,
    }


def _html_text(raw: RawRecord, settings: IngestConfig) -> tuple[str | None, str | None, str | None]:
    """(text, charset, rejection reason) for an HTML payload."""
    payload = raw.payload or b""
    media = _media_type(raw.content_type)
    if _looks_binary(payload):
        return None, None, "binary_payload"
    if media and media not in _HTML_TYPES:
        return None, None, "non_html"
    if not media and payload.lstrip()[:1] != b"<":
        return None, None, "non_html"
    decoded = decode_html(payload, raw.content_type)
    if decoded.replaced_fraction > settings.max_invalid_fraction:
        return None, decoded.encoding, "invalid_encoding"
    try:
        text = get_extractor(settings.extractor)(decoded.text)
    except Exception as exc:  # extractors raise on pathological markup; keep the page for audit
        raw.detail = f"{type(exc).__name__}: {exc}"[:500]
        return None, decoded.encoding, "extraction_error"
    return text, decoded.encoding, None


def process_record(raw: RawRecord, settings: IngestConfig) -> tuple[str, dict[str, Any] | None, str]:
    """Classify one record: ("doc", row, ""), ("quarantine", row, reason) or ("skip", None, reason)."""
    if raw.problem:
        return "quarantine", _rejection(raw, raw.problem), raw.problem
    if raw.rec_type in SKIPPED_RECORD_TYPES:
        return "skip", None, f"warc_{raw.rec_type}"
    if raw.http_status is not None and raw.http_status != 200:
        reason = "http_not_ok"
        return "quarantine", _rejection(raw, reason, f"HTTP {raw.http_status}"), reason
    if raw.payload_truncated:
        reason = "too_large"
        detail = f"payload over {settings.max_payload_bytes} bytes"
        return "quarantine", _rejection(raw, reason, detail), reason
    charset: str | None = "utf-8"
    if raw.source_format == "warc":
        if not raw.payload:
            return "quarantine", _rejection(raw, "empty_payload"), "empty_payload"
        html_text, charset, rejected = _html_text(raw, settings)
        if rejected:
            return "quarantine", _rejection(raw, rejected), rejected
        text = html_text or ""
    elif raw.source_format == "wet":
        decoded = decode_utf8_text(raw.payload or b"")
        if decoded.replaced_fraction > settings.max_invalid_fraction:
            return "quarantine", _rejection(raw, "invalid_utf8"), "invalid_utf8"
        text = decoded.text.strip()
    else:
        text = (raw.text or "").strip()
        if "\ufffd" in text and text.count("\ufffd") / len(text) > settings.max_invalid_fraction:
            return "quarantine", _rejection(raw, "invalid_utf8"), "invalid_utf8"
    assert text is not None
    if len(text) < settings.min_text_chars:
        return "quarantine", _rejection(raw, "empty_text", f"{len(text)} characters"), "empty_text"
    return "doc", _document(raw, text, charset), ""


# ------------------------------------------------------------------------------------------ per unit


@dataclass
class ChunkStats:
    """Counts for one shard's worth of input records."""

    records_read: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    chars_out: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, other: dict[str, Any]) -> None:
        self.records_read += other["records_read"]
        self.docs_out += other["docs_out"]
        self.bytes_in += other["bytes_in"]
        self.chars_out += other["chars_out"]
        merge_counts(self.quarantined, other["quarantined"])
        merge_counts(self.skipped, other["skipped"])


class _ChunkBuffer:
    """Rows gathered for the next shard, with their stats."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.stats = ChunkStats()
        self.text_bytes = 0

    def add(self, raw: RawRecord, kind: str, row: dict[str, Any] | None, reason: str) -> None:
        self.stats.records_read += 1
        self.stats.bytes_in += raw.payload_bytes
        if kind == "doc":
            assert row is not None
            self.docs.append(row)
            self.stats.docs_out += 1
            self.stats.chars_out += len(row["text"])
            self.text_bytes += len(row["text"])
        elif kind == "quarantine":
            assert row is not None
            self.rejected.append(row)
            merge_counts(self.stats.quarantined, {reason: 1})
        else:
            merge_counts(self.stats.skipped, {reason: 1})

    def full(self, settings: IngestConfig) -> bool:
        rows = len(self.docs) + len(self.rejected)
        return rows >= settings.shard_max_records or self.text_bytes >= settings.shard_max_bytes


def _published_shards(stage: StageDir, unit: IngestUnit) -> list[Path]:
    """Published data shards of a unit, checked to be the contiguous run 0..k-1."""
    shards = sorted((stage.path / DATA_DIR).glob(f"part-{unit.name}-*.parquet"))
    for expected, path in enumerate(shards):
        if path.name != shard_name(unit.index, expected):
            raise RuntimeError(f"{stage.path}: shard sequence of unit {unit.name} has a gap at {path.name}")
    return shards


def _publish_chunk(
    stage: StageDir, unit: IngestUnit, shard_index: int, buffer: _ChunkBuffer, next_index: int
) -> None:
    """Quarantine shard first (if any), then the data shard, which is the chunk's commit point."""
    name = shard_name(unit.index, shard_index)
    if buffer.rejected:
        table = pa.Table.from_pylist(buffer.rejected, schema=QUARANTINE_SCHEMA)
        publish_table(table, stage.path / QUARANTINE_DIR / name, stage.tmp_dir)
    meta = {"unit": unit.uri, "next_index": next_index, "stats": asdict(buffer.stats)}
    table = pa.Table.from_pylist(buffer.docs, schema=DOCUMENT_SCHEMA)
    publish_table(table, stage.path / DATA_DIR / name, stage.tmp_dir, shard_meta=meta)


def _resume_point(stage: StageDir, unit: IngestUnit) -> tuple[int, int, ChunkStats]:
    """(next shard index, next record index, stats so far) from the unit's published shards."""
    totals = ChunkStats()
    next_index = 0
    shards = _published_shards(stage, unit)
    for path in shards:
        meta = read_shard_meta(path)
        totals.add(meta["stats"])
        next_index = meta["next_index"]
    return len(shards), next_index, totals


def iter_unit_records(unit: IngestUnit, settings: IngestConfig, start_index: int) -> Iterator[RawRecord]:
    return open_records(
        unit.uri, unit.fmt, fields=settings.fields, start_index=start_index,
        max_payload_bytes=settings.max_payload_bytes,
    )


def run_ingest_unit(
    stage: StageDir, unit: IngestUnit, settings: IngestConfig, fault: FaultPlan | None = None
) -> dict[str, Any]:
    """Ingest one input file into `stage`, resuming after its last published shard.

    Returns the unit's stats (identical whether or not the unit was interrupted and resumed).
    `fault` (a failure drill) fails the unit once that many of its shards are published.
    """
    finished = stage.finished_unit(unit.name)
    if finished is not None:
        return finished
    started = time.perf_counter()
    shard_index, next_index, totals = _resume_point(stage, unit)
    resumed_from = shard_index
    buffer = _ChunkBuffer()
    for raw in iter_unit_records(unit, settings, next_index):
        kind, row, reason = process_record(raw, settings)
        buffer.add(raw, kind, row, reason)
        next_index = raw.index + 1
        if buffer.full(settings):
            shard_index = _flush(stage, unit, shard_index, buffer, next_index, totals)
            buffer = _ChunkBuffer()
            if fault is not None:
                fault.check(resumed_from, shard_index, unit.name)
    if buffer.stats.records_read or shard_index == 0:
        shard_index = _flush(stage, unit, shard_index, buffer, next_index, totals)
    result = {
        "unit": unit.name,
        "uri": unit.uri,
        "format": unit.fmt,
        "shards": shard_index,
        "resumed_from_shard": resumed_from,
        **asdict(totals),
        "seconds": round(time.perf_counter() - started, 3),
    }
    stage.finish_unit(unit.name, result)
    return result


def _flush(
    stage: StageDir,
    unit: IngestUnit,
    shard_index: int,
    buffer: _ChunkBuffer,
    next_index: int,
    totals: ChunkStats,
) -> int:
    _publish_chunk(stage, unit, shard_index, buffer, next_index)
    totals.add(asdict(buffer.stats))
    return shard_index + 1
