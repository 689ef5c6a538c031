"""Atomic Parquet shard publishing: write under `_tmp/`, fsync, then rename into place.

A reader of a stage directory therefore sees a shard either complete or not at all. Shard metadata (the
`forgeline` key of the Parquet footer) records what the shard covers, so a resumed unit can continue
exactly where the last published shard ended.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_DIR_NAME = "_tmp"
SHARD_META_KEY = b"forgeline"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (making its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(final_path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `final_path`: the file appears complete or not at all
    (the temporary file is removed on error)."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.parent / f".{final_path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final_path.parent)


def atomic_write_bytes(final_path: Path, data: bytes) -> None:
    """Write `data` to `final_path` so that the file appears complete or not at all."""
    atomic_write_with(final_path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_directory(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `final_dir` (else is removed).

    A previous version is renamed aside and deleted after the swap, so a reader sees the old complete directory
    or the new one (POSIX cannot rename over a non-empty directory: between the two renames the path is briefly
    absent, never partial)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        if final_dir.exists():
            old = final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex}.old"
            os.replace(final_dir, old)
            os.replace(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
        fsync_path(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    fsync_path(final_path.parent)
    return size


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The `forgeline` metadata stored in a shard's footer ({} when absent)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(SHARD_META_KEY)
    return json.loads(raw) if raw else {}


def schema_to_json(schema: pa.Schema) -> list[dict[str, Any]]:
    """A JSON-friendly description of an Arrow schema for manifests."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]
