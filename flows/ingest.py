"""The `ingest` stage: resolve and fingerprint the inputs, one Ray task per file, resumable shards."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from prefect import get_run_logger

from dataprep.ingest.documents import (
    CODE_VERSION,
    DATA_DIR,
    DOCUMENT_SCHEMA,
    QUARANTINE_DIR,
    QUARANTINE_SCHEMA,
    IngestUnit,
)
from dataprep.ingest.inputs import InputFile, open_check, resolve_inputs
from dataprep.shards import schema_to_json
from dataprep.stage import StageDir, merge_counts
from flows.common import injected_fault
from flows.config import RunConfig
from flows.stage import Computed, StageInputs, StageSpec, stage_flow
from workers.ingest import retried_units, run_ingest_units


class IngestStage(StageSpec):
    """Crawl files (WARC/WET/JSONL/Parquet, paths or fsspec URLs) → document and quarantine shards."""

    name = "ingest"
    code_version = CODE_VERSION
    output_names = (DATA_DIR, QUARANTINE_DIR)

    def resolve_inputs(self, config: RunConfig, upstream: StageDir | None) -> StageInputs:
        """List and fingerprint the inputs; every one must exist and be readable before work starts."""
        files = resolve_inputs(config.ingest.inputs, config.ingest.format)
        for item in files:
            open_check(item.uri)
        return StageInputs(keys=[f"{f.uri}|{f.fmt}|{f.fingerprint}" for f in files],
                           manifest=[{"uri": f.uri, "format": f.fmt, "fingerprint": f.fingerprint} for f in files],
                           payload=files)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        return config.ingest.model_dump(mode="json", exclude={"inputs"})

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        files: list[InputFile] = inputs.payload
        units = [IngestUnit(i, f.uri, f.fmt) for i, f in enumerate(files)]
        logger = get_run_logger()

        def progress(done: int, total: int, unit: dict[str, Any]) -> None:
            logger.info("ingest %d/%d: %s → %d docs", done, total, unit["uri"], unit["docs_out"])

        results = run_ingest_units(stage, units, config.ingest, max_retries=config.ray.task_max_retries,
                                   fault=injected_fault(self.name), on_progress=progress)
        recovery = {"units_retried": retried_units(stage)}  # reruns: Ray after a lost worker, or a stage rerun
        return Computed({**ingest_stats(results), "recovery": recovery}, {"units": results})

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"data": _output_summary(stage, DATA_DIR, DOCUMENT_SCHEMA),
                "quarantine": _output_summary(stage, QUARANTINE_DIR, QUARANTINE_SCHEMA)}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        return {"tasks": "one per input file", "CPU per task": 1, "retries": config.ray.task_max_retries}


def ingest_stats(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage totals from the per-file results (records_in excludes WARC records that are not documents)."""
    dropped: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for unit in units:
        merge_counts(dropped, unit["quarantined"])
        merge_counts(skipped, unit["skipped"])
    records_read = sum(unit["records_read"] for unit in units)
    return {"records_in": records_read - sum(skipped.values()), "records_out": sum(u["docs_out"] for u in units),
            "dropped": dropped, "skipped": skipped, "bytes_in": sum(u["bytes_in"] for u in units),
            "chars_out": sum(u["chars_out"] for u in units)}


def _output_summary(stage: StageDir, subdir: str, schema: Any) -> dict[str, Any]:
    shards = sorted((stage.path / subdir).glob("*.parquet"))
    return {"path": subdir, "shards": len(shards), "rows": sum(pq.read_metadata(path).num_rows for path in shards),
            "bytes": sum(path.stat().st_size for path in shards), "schema": schema_to_json(schema)}


INGEST = IngestStage()
ingest_flow = stage_flow(INGEST)
