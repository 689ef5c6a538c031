"""The `dedup` Prefect flow: exact, URL and MinHash-LSH dedup of the ingest output on Ray."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dataprep.dedup import lsh_params
from dataprep.ingest import DATA_DIR, DOCUMENT_SCHEMA
from dataprep.shards import publish_table, schema_to_json
from dataprep.stage import StageDir, package_version, stage_hash
from flows.common import (
    complete_upstream,
    completed_stage_result,
    connect_ray,
    publish_artifact,
    stage_manifest,
    stage_task_options,
)
from flows.config import RunConfig
from workers.dedup import run_dedup

STAGE = "dedup"
CODE_VERSION = "dedup-1"
DUPLICATES_FILE = "duplicates.parquet"
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("representative_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float64()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("cluster_size", pa.int64(), nullable=False),
    ]
)


def dedup_params(config: RunConfig) -> dict[str, Any]:
    """Worker parameters: the dedup config with bands and rows resolved."""
    cfg = config.dedup
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
    if cfg.bands or cfg.rows:
        bands = cfg.bands or cfg.num_perm // (cfg.rows or rows)
        rows = cfg.rows or cfg.num_perm // bands
    if bands * rows > cfg.num_perm:
        raise ValueError(f"dedup.bands × dedup.rows = {bands * rows} exceeds dedup.num_perm = {cfg.num_perm}")
    return {**cfg.model_dump(mode="json"), "bands": bands, "rows": rows}


def dedup_stage_dir(config: RunConfig, upstream: StageDir) -> StageDir:
    params = dedup_params(config)
    params.pop("num_actors")  # the result does not depend on the actor count (tested)
    digest = stage_hash(STAGE, params, [upstream.name], f"{package_version()}/{CODE_VERSION}")
    return StageDir.for_stage(config.run_dir, STAGE, digest)


@task(name="dedup-documents", cache_policy=NO_CACHE)
def dedup_task(config: RunConfig, upstream_path: str, stage_path: str) -> dict[str, Any]:
    """Run the Ray side; returns stats (small) and writes kept shards and duplicates.parquet."""
    logger = get_run_logger()
    logger.info("Ray: %s", connect_ray(config))
    stage = StageDir(Path(stage_path))
    sources = sorted((Path(upstream_path) / DATA_DIR).glob("*.parquet"))
    stats, rows = run_dedup(sources, stage.path / "_work", stage.path / DATA_DIR, stage.tmp_dir, dedup_params(config))
    publish_table(pa.Table.from_pylist(rows, schema=DUPLICATES_SCHEMA), stage.path / DUPLICATES_FILE, stage.tmp_dir)
    return stats


@flow(name="dedup", log_prints=True)
def dedup_flow(config: RunConfig, upstream_path: str) -> dict[str, Any]:
    """Dedup the documents of a complete ingest stage into `<run_dir>/dedup-<hash>/`."""
    logger = get_run_logger()
    started = time.time()
    upstream = complete_upstream(upstream_path, STAGE)
    stage = dedup_stage_dir(config, upstream)
    if (done := completed_stage_result(stage)) is not None:
        return done
    stage.prepare()
    runner = dedup_task.with_options(**stage_task_options(config))
    stats = runner(config, str(upstream.path), str(stage.path))
    outputs = {
        "data": {"path": DATA_DIR, "schema": schema_to_json(DOCUMENT_SCHEMA), "rows": stats["records_out"]},
        "duplicates": {"path": DUPLICATES_FILE, "schema": schema_to_json(DUPLICATES_SCHEMA),
                       "rows": sum(stats["dropped"].values())},
    }
    manifest = stage_manifest(stage, STAGE, f"{package_version()}/{CODE_VERSION}", dedup_params(config), upstream,
                              outputs, stats, started)
    stage.publish(manifest)
    publish_artifact(manifest)
    logger.info("dedup: published %s (%d → %d documents)", stage.path, stats["records_in"], stats["records_out"])
    return {"path": str(stage.path), "skipped": False, "stats": stats}
