"""The `ingest` Prefect flow: resolve inputs, run one Ray task per file, publish the stage atomically."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dataprep.ingest import (
    CODE_VERSION,
    DATA_DIR,
    DOCUMENT_SCHEMA,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    IngestSettings,
    IngestUnit,
)
from dataprep.readers import FieldMap
from dataprep.shards import schema_to_json
from dataprep.stage import StageDir, merge_counts, package_version, stage_hash
from flows.common import completed_stage_result, connect_ray, injected_fault, publish_artifact, stage_task_options
from flows.config import RunConfig
from flows.inputs import InputFile, open_check, resolve_inputs
from workers.ingest import run_ingest_units

STAGE = "ingest"


def ingest_settings(config: RunConfig) -> IngestSettings:
    """The worker-side settings derived from the ingest config."""
    cfg = config.ingest
    return IngestSettings(
        extractor=cfg.extractor,
        max_payload_bytes=cfg.max_payload_bytes,
        min_text_chars=cfg.min_text_chars,
        max_invalid_fraction=cfg.max_invalid_fraction,
        shard_max_records=cfg.shard_max_records,
        shard_max_bytes=cfg.shard_max_bytes,
        fields=FieldMap(**cfg.fields.model_dump()),
    )


def ingest_stage_dir(config: RunConfig, inputs: list[InputFile]) -> StageDir:
    """`<run_dir>/ingest-<hash>` for this config and these inputs."""
    config_part = config.ingest.model_dump(mode="json", exclude={"inputs"})
    input_hashes = [f"{f.uri}|{f.fmt}|{f.fingerprint}" for f in inputs]
    digest = stage_hash(STAGE, config_part, input_hashes, f"{package_version()}/{CODE_VERSION}")
    return StageDir.for_stage(config.run_dir, STAGE, digest)


@task(name="resolve-inputs", cache_policy=NO_CACHE)
def resolve_task(config: RunConfig) -> list[InputFile]:
    """List and fingerprint the inputs; every input must exist and be readable before work starts."""
    inputs = resolve_inputs(config.ingest.inputs, config.ingest.format)
    for item in inputs:
        open_check(item.uri)
    get_run_logger().info("ingest: %d input files", len(inputs))
    return inputs


@task(name="ingest-files", cache_policy=NO_CACHE)
def ingest_files_task(config: RunConfig, stage_path: str, inputs: list[InputFile]) -> list[dict[str, Any]]:
    """Run one Ray task per input file; returns per-file stats (small), never documents."""
    logger = get_run_logger()
    cluster = connect_ray(config)
    logger.info("Ray: %s", cluster)
    stage = StageDir(Path(stage_path))
    units = [IngestUnit(i, f.uri, f.fmt) for i, f in enumerate(inputs)]

    def progress(done: int, total: int, unit: dict[str, Any]) -> None:
        logger.info("ingest %d/%d: %s → %d docs", done, total, unit["uri"], unit["docs_out"])

    return run_ingest_units(
        stage,
        units,
        ingest_settings(config),
        max_retries=config.ray.task_max_retries,
        fault=injected_fault(STAGE),
        on_progress=progress,
    )


def _output_summary(stage: StageDir, subdir: str, schema: Any) -> dict[str, Any]:
    shards = sorted((stage.path / subdir).glob("*.parquet"))
    rows = sum(pq.read_metadata(path).num_rows for path in shards)
    return {
        "path": subdir,
        "shards": len(shards),
        "rows": rows,
        "bytes": sum(path.stat().st_size for path in shards),
        "schema": schema_to_json(schema),
    }


def build_manifest(
    config: RunConfig, stage: StageDir, inputs: list[InputFile], units: list[dict[str, Any]], started: float
) -> dict[str, Any]:
    """The manifest: config, inputs, outputs with schemas and row counts, stats and timings."""
    dropped: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for unit in units:
        merge_counts(dropped, unit["quarantined"])
        merge_counts(skipped, unit["skipped"])
    records_read = sum(unit["records_read"] for unit in units)
    return {
        "stage": STAGE,
        "name": stage.name,
        "path": str(stage.path),
        "hash": stage.digest,
        "code_version": f"{package_version()}/{CODE_VERSION}",
        "config": config.ingest.model_dump(mode="json"),
        "inputs": [{"uri": f.uri, "format": f.fmt, "fingerprint": f.fingerprint} for f in inputs],
        "outputs": {
            "data": _output_summary(stage, DATA_DIR, DOCUMENT_SCHEMA),
            "quarantine": _output_summary(stage, QUARANTINE_DIR, QUARANTINE_SCHEMA),
        },
        "stats": {
            "records_in": records_read - sum(skipped.values()),
            "records_out": sum(unit["docs_out"] for unit in units),
            "dropped": dropped,
            "skipped": skipped,
            "bytes_in": sum(unit["bytes_in"] for unit in units),
            "chars_out": sum(unit["chars_out"] for unit in units),
        },
        "units": units,
        "timings": {
            "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "seconds": round(time.time() - started, 3),
            "unit_seconds": round(sum(unit["seconds"] for unit in units), 3),
        },
    }


@flow(name="ingest", log_prints=True)
def ingest_flow(config: RunConfig) -> dict[str, Any]:
    """Ingest crawl files into `<run_dir>/ingest-<hash>/` (skipped when that output is complete)."""
    logger = get_run_logger()
    started = time.time()
    inputs = resolve_task(config)
    stage = ingest_stage_dir(config, inputs)
    if (done := completed_stage_result(stage)) is not None:
        return done
    stage.prepare()
    runner = ingest_files_task.with_options(**stage_task_options(config))
    units = runner(config, str(stage.path), inputs)
    manifest = build_manifest(config, stage, inputs, units, started)
    stage.publish(manifest)
    publish_artifact(manifest)
    logger.info("ingest: published %s (%d documents)", stage.path, manifest["stats"]["records_out"])
    return {"path": str(stage.path), "skipped": False, "stats": manifest["stats"]}
