"""Streaming readers for crawl inputs: WARC (0.18/1.0/1.1, ARC), WET, JSONL (.gz/.zst) and Parquet.

Each reader yields `RawRecord`s one at a time, so memory stays flat whatever the file size. Every yielded
item has an `index` (its position in the file's stream); a reader given `start_index` skips earlier items
without reading their payloads, which is how a crashed unit resumes. Problems the reader itself meets
(a truncated gzip member, a malformed WARC record, a line that is not JSON) are yielded as records with
`problem` set, so the caller can count and quarantine them; the reader then carries on where it can.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import fsspec
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

RESYNC_SCAN_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b\x08"


@dataclass
class RawRecord:
    """One item from an input file, before decoding and extraction."""

    index: int
    source: str
    source_format: str
    offset: int | None = None
    rec_type: str | None = None
    url: str | None = None
    crawl_date: datetime | None = None
    record_id: str | None = None
    content_type: str | None = None
    http_status: int | None = None
    payload: bytes | None = None
    payload_bytes: int = 0
    payload_truncated: bool = False
    text: str | None = None
    doc_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    detail: str | None = None


def parse_timestamp(value: Any) -> datetime | None:
    """Parse an ISO-8601 / WARC date (or epoch seconds) to an aware UTC datetime; None when unparseable."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    text = str(value).strip()
    if text.isdigit() and len(text) == 14:  # ARC / WARC 0.18 style 20080101120000
        return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def detect_format(uri: str) -> str:
    """Input format from the file name: warc, wet, jsonl or parquet; ValueError when unknown."""
    name = uri.lower().rsplit("/", 1)[-1]
    for suffix in (".gz", ".zst", ".zstd", ".bz2", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(".wet") or name.endswith(".warc.wet"):
        return "wet"
    if name.endswith(".warc") or name.endswith(".arc"):
        return "warc"
    if name.endswith(".jsonl") or name.endswith(".json") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {uri!r} from its name; set ingest.format explicitly")


# ---------------------------------------------------------------------------------------------- WARC / WET


def _http_status(record: Any) -> int | None:
    if record.http_headers is None:
        return None
    try:
        return int(record.http_headers.get_statuscode())
    except (TypeError, ValueError):
        return None


def _warc_raw(record: Any, index: int, offset: int, source: str, fmt: str) -> RawRecord:
    headers = record.rec_headers
    http = record.http_headers
    return RawRecord(
        index=index,
        source=source,
        source_format=fmt,
        offset=offset,
        rec_type=record.rec_type,
        url=headers.get_header("WARC-Target-URI"),
        crawl_date=parse_timestamp(headers.get_header("WARC-Date")),
        record_id=headers.get_header("WARC-Record-ID"),
        content_type=(http.get_header("Content-Type") if http is not None else None)
        or headers.get_header("Content-Type"),
        http_status=_http_status(record),
    )


def _read_payload(record: Any, raw: RawRecord, max_bytes: int) -> None:
    """Read at most max_bytes + 1 bytes of payload; flag a record whose block ended before its length."""
    payload = record.content_stream().read(max_bytes + 1)
    raw.payload_bytes = len(payload)
    if len(payload) > max_bytes:
        raw.payload_truncated = True
        raw.payload = None
        return
    raw.payload = payload
    if getattr(record.raw_stream, "limit", 0):
        raw.problem, raw.detail = "truncated_record", f"{record.raw_stream.limit} bytes of the block missing"


def _next_record_start(fileobj: IO[bytes], after: int, gzipped: bool) -> int | None:
    """Byte offset of the next plausible record start after `after` (a gzip member or a `WARC/` line)."""
    marker = _GZIP_MAGIC if gzipped else b"\nWARC/"
    position = after + 1
    while True:
        fileobj.seek(position)
        chunk = fileobj.read(RESYNC_SCAN_BYTES + len(marker))
        if not chunk:
            return None
        hit = chunk.find(marker)
        if hit >= 0:
            return position + hit + (0 if gzipped else 1)
        if len(chunk) <= len(marker):
            return None
        position += RESYNC_SCAN_BYTES


def _trailing_bytes(fileobj: IO[bytes], end_of_last_record: int) -> int:
    """Bytes after the last record the iterator returned, ignoring padding (a cut-off record if > 0)."""
    fileobj.seek(end_of_last_record)
    tail = fileobj.read(RESYNC_SCAN_BYTES)
    return len(tail.strip(b"\r\n\x00 "))


def _problem(index: int, source: str, fmt: str, offset: int | None, problem: str, detail: str) -> RawRecord:
    """A record that stands for input the reader could not read (quarantined by the caller)."""
    return RawRecord(index=index, source=source, source_format=fmt, offset=offset, problem=problem,
                     detail=detail[:500])


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _problem_from_exception(exc: BaseException) -> str:
    if isinstance(exc, zlib.error | EOFError):
        return "corrupt_gzip"
    if isinstance(exc, ArchiveLoadFailed):
        return "malformed_record"
    return "read_error"


def iter_warc(
    fileobj: IO[bytes],
    source: str,
    *,
    fmt: str = "warc",
    start_index: int = 0,
    max_payload_bytes: int = 10_000_000,
) -> Iterator[RawRecord]:
    """Yield every WARC record of a file; on a malformed record, resynchronise at the next record start."""
    gzipped = source.lower().endswith(".gz")
    base = 0
    index = 0
    while True:
        fileobj.seek(base)
        iterator = ArchiveIterator(fileobj, arc2warc=True, ensure_http_headers=False)
        offset = base
        try:
            for record in iterator:
                offset = base + iterator.offset  # start of this record (get_record_offset would consume it)
                if index >= start_index:
                    raw = _warc_raw(record, index, offset, source, fmt)
                    if record.rec_type in ("response", "conversion", "resource"):
                        _read_payload(record, raw, max_payload_bytes)
                    yield raw
                index += 1
            trailing = _trailing_bytes(fileobj, base + iterator.offset)
            if trailing and index >= start_index:
                yield _problem(index, source, fmt, base + iterator.offset, "truncated_record",
                               f"{trailing} bytes after the last complete record")
            return
        except Exception as exc:  # any reader failure becomes a quarantined problem, then we resync
            failed_at = max(base + iterator.offset, offset)  # start of the record that failed to load
            resume = _next_record_start(fileobj, failed_at, gzipped)
            if index >= start_index:
                problem = "truncated_record" if resume is None else _problem_from_exception(exc)
                yield _problem(index, source, fmt, failed_at, problem, _describe(exc))
            index += 1
            if resume is None:
                return
            base = resume


# ------------------------------------------------------------------------------------------- JSONL / Parquet


class FieldMap(BaseModel):
    """Which fields of a JSONL object / Parquet row hold the text, id, url and date."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = "text"
    id: str = "id"
    url: str = "url"
    date: str = "date"



def _row_to_raw(row: dict[str, Any], raw: RawRecord, fields: FieldMap, max_bytes: int) -> RawRecord:
    text = row.pop(fields.text, None)
    if not isinstance(text, str):
        raw.problem = "missing_text"
        raw.detail = f"field {fields.text!r} is {type(text).__name__}, not a string"
        return raw
    raw.text = text
    raw.payload_bytes = len(text.encode("utf-8", errors="replace"))
    raw.payload_truncated = raw.payload_bytes > max_bytes
    raw.doc_id = None if row.get(fields.id) is None else str(row.pop(fields.id))
    url = row.pop(fields.url, None)
    raw.url = url if isinstance(url, str) else raw.doc_id if _looks_like_url(raw.doc_id) else None
    raw.crawl_date = parse_timestamp(row.pop(fields.date, None)) or parse_timestamp(row.get("created"))
    raw.metadata = row
    return raw


def _looks_like_url(value: str | None) -> bool:
    return value is not None and value.startswith(("http://", "https://"))


def _iter_lines(fileobj: IO[bytes], chunk_bytes: int = 1 << 16) -> Iterator[bytes]:
    """Lines of a binary stream (works on decompressors that cannot iterate lines themselves).

    `read1` returns what one decompression step produced, so a truncated stream loses as little as possible.
    """
    read = getattr(fileobj, "read1", fileobj.read)
    pending = b""
    while chunk := read(chunk_bytes):
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def iter_jsonl(
    fileobj: IO[bytes],
    source: str,
    *,
    fields: FieldMap = FieldMap(),
    start_index: int = 0,
    max_payload_bytes: int = 10_000_000,
) -> Iterator[RawRecord]:
    """Yield one record per non-blank line; malformed JSON and invalid UTF-8 become problems."""
    offset = 0
    index = 0
    try:
        for line in _iter_lines(fileobj):
            line_offset, offset = offset, offset + len(line)
            if not line.strip():
                continue
            if index < start_index:
                index += 1
                continue
            raw = RawRecord(index=index, source=source, source_format="jsonl", offset=line_offset)
            index += 1
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raw.problem, raw.detail = "invalid_utf8", str(exc)[:500]
            except json.JSONDecodeError as exc:
                raw.problem, raw.detail = "malformed_json", str(exc)[:500]
            else:
                if isinstance(row, dict):
                    raw = _row_to_raw(row, raw, fields, max_payload_bytes)
                else:
                    raw.problem, raw.detail = "malformed_json", f"a JSON {type(row).__name__}, not an object"
            yield raw
    except Exception as exc:  # a truncated or corrupt compressed stream (gzip, zstd, ...)
        if index >= start_index:
            yield _problem(index, source, "jsonl", offset, "corrupt_compression", _describe(exc))


def iter_parquet(
    fileobj: IO[bytes],
    source: str,
    *,
    fields: FieldMap = FieldMap(),
    start_index: int = 0,
    max_payload_bytes: int = 10_000_000,
    batch_rows: int = 1024,
) -> Iterator[RawRecord]:
    """Yield one record per row, reading record batches so memory stays bounded.

    A file that is not valid Parquet, or a row group that cannot be read, ends the file with one
    `corrupt_parquet` problem record; rows read before it are kept.
    """
    index = 0
    try:
        for batch in pq.ParquetFile(fileobj).iter_batches(batch_size=batch_rows):
            if index + batch.num_rows <= start_index:
                index += batch.num_rows
                continue
            for row in batch.to_pylist():
                if index >= start_index:
                    raw = RawRecord(index=index, source=source, source_format="parquet", offset=index)
                    yield _row_to_raw(row, raw, fields, max_payload_bytes)
                index += 1
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError on corrupt files
        if index >= start_index:
            yield _problem(index, source, "parquet", index, "corrupt_parquet", _describe(exc))


def open_records(
    uri: str,
    fmt: str,
    *,
    fields: FieldMap = FieldMap(),
    start_index: int = 0,
    max_payload_bytes: int = 10_000_000,
) -> Iterator[RawRecord]:
    """Open `uri` with fsspec (local path, s3://, http(s)://, ...) and stream its records."""
    compression = "infer" if fmt == "jsonl" else None
    with fsspec.open(uri, "rb", compression=compression) as fileobj:
        if fmt in ("warc", "wet"):
            yield from iter_warc(
                fileobj, uri, fmt=fmt, start_index=start_index, max_payload_bytes=max_payload_bytes
            )
        elif fmt == "jsonl":
            yield from iter_jsonl(
                fileobj, uri, fields=fields, start_index=start_index, max_payload_bytes=max_payload_bytes
            )
        elif fmt == "parquet":
            yield from iter_parquet(
                fileobj, uri, fields=fields, start_index=start_index, max_payload_bytes=max_payload_bytes
            )
        else:
            raise ValueError(f"unknown input format {fmt!r}")
