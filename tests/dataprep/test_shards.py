"""Atomic shard publishing and the stage directory contract."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep import shards
from dataprep.shards import publish_table, read_shard_meta
from dataprep.stage import StageDir, shard_name, stage_hash


def test_publish_is_complete_and_carries_metadata(tmp_path: Path) -> None:
    table = pa.table({"x": list(range(100))})
    size = publish_table(table, tmp_path / "data" / "part.parquet", tmp_path / "_tmp", {"next_index": 7})
    assert size == (tmp_path / "data" / "part.parquet").stat().st_size
    assert pq.read_table(tmp_path / "data" / "part.parquet")["x"].to_pylist() == list(range(100))
    assert read_shard_meta(tmp_path / "data" / "part.parquet") == {"next_index": 7}
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_crash_while_writing_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_half_then_crash(table: pa.Table, handle, **kwargs) -> None:
        handle.write(b"PAR1 half a file")
        raise OSError("disk vanished")

    monkeypatch.setattr(shards.pq, "write_table", write_half_then_crash)
    with pytest.raises(OSError):
        publish_table(pa.table({"x": [1]}), tmp_path / "data" / "part.parquet", tmp_path / "_tmp")
    assert not (tmp_path / "data" / "part.parquet").exists()
    assert list((tmp_path / "data").glob("*.parquet")) == []


def test_stage_hash_depends_on_config_inputs_and_code() -> None:
    base = stage_hash("ingest", {"a": 1, "b": [1, 2]}, ["f|1"], "v1")
    assert base == stage_hash("ingest", {"b": [1, 2], "a": 1}, ["f|1"], "v1")
    assert base != stage_hash("ingest", {"a": 2, "b": [1, 2]}, ["f|1"], "v1")
    assert base != stage_hash("ingest", {"a": 1, "b": [1, 2]}, ["f|2"], "v1")
    assert base != stage_hash("ingest", {"a": 1, "b": [1, 2]}, ["f|1"], "v2")


def test_stage_dir_lifecycle(tmp_path: Path) -> None:
    stage = StageDir.for_stage(tmp_path, "ingest", "abc123")
    assert stage.name == "ingest-abc123" and stage.digest == "abc123"
    stage.prepare()
    (stage.tmp_dir / "leftover.tmp").write_text("half")
    stage.prepare()
    assert list(stage.tmp_dir.iterdir()) == [], "a new attempt drops unpublished temp files"
    assert stage.finished_unit("00000") is None
    stage.finish_unit("00000", {"docs_out": 3})
    assert stage.finished_unit("00000") == {"docs_out": 3}
    assert not stage.is_complete()
    stage.publish({"stage": "ingest"})
    assert stage.is_complete() and stage.read_manifest() == {"stage": "ingest"}
    assert not stage.tmp_dir.exists()
    assert shard_name(3, 12) == "part-00003-00012.parquet"
