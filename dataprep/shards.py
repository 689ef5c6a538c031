"""Atomic Parquet shard publishing: write under `_tmp/`, fsync, then rename into place.

A reader of a stage directory therefore sees a shard either complete or not at all. Shard metadata (the
`forgeline` key of the Parquet footer) records what the shard covers, so a resumed unit can continue
exactly where the last published shard ended.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_DIR_NAME = "_tmp"
SHARD_META_KEY = b"forgeline"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(final_path: Path, data: bytes) -> None:
    """Write `data` to `final_path` so that the file appears complete or not at all."""
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.parent / f".{final_path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final_path)
    _fsync_dir(final_path.parent)


def atomic_write_json(final_path: Path, payload: Any) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_bytes(final_path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def publish_table(
    table: pa.Table, final_path: Path, tmp_root: Path, shard_meta: dict[str, Any] | None = None
) -> int:
    """Write `table` as Parquet under `tmp_root`, then rename it to `final_path`; returns the file size.

    `tmp_root` must be on the same filesystem as `final_path` (the stage's `_tmp/` directory).
    """
    if shard_meta is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[SHARD_META_KEY] = json.dumps(shard_meta, sort_keys=True).encode()
        table = table.replace_schema_metadata(metadata)
    tmp_root.mkdir(parents=True, exist_ok=True)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_root / f"{final_path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
        handle.flush()
        os.fsync(handle.fileno())
    size = tmp.stat().st_size
    os.replace(tmp, final_path)
    _fsync_dir(final_path.parent)
    return size


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The `forgeline` metadata stored in a shard's footer ({} when absent)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(SHARD_META_KEY)
    return json.loads(raw) if raw else {}


def schema_to_json(schema: pa.Schema) -> list[dict[str, Any]]:
    """A JSON-friendly description of an Arrow schema for manifests."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]
