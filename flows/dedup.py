"""The `dedup` stage: exact, URL and MinHash-LSH dedup of the ingest output on Ray."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dataprep.ingest.documents import DATA_DIR, DOCUMENT_SCHEMA
from dataprep.shards import publish_table, schema_to_json
from dataprep.stage import StageDir
from flows.config import RunConfig
from flows.stage import Computed, StageInputs, StageResult, StageSpec, stage_flow
from workers.dedup import run_dedup

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


class DedupStage(StageSpec):
    """Ingest documents → kept documents (same shard names) + `duplicates.parquet` (the audit)."""

    name = "dedup"
    code_version = "dedup-1"
    upstream = "ingest"
    output_names = (DATA_DIR, DUPLICATES_FILE)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """The config with bands and rows resolved; not the actor count (the result does not depend on it)."""
        bands, rows = config.dedup.lsh()
        return {**config.dedup.model_dump(mode="json", exclude={"num_actors"}), "bands": bands, "rows": rows}

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        assert inputs.upstream is not None
        sources = sorted((inputs.upstream.path / DATA_DIR).glob("*.parquet"))
        stats, rows = run_dedup(sources, stage.path / "_work", stage.path / DATA_DIR, stage.tmp_dir, config.dedup)
        publish_table(pa.Table.from_pylist(rows, schema=DUPLICATES_SCHEMA), stage.path / DUPLICATES_FILE,
                      stage.tmp_dir)
        return Computed(stats)

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        stats = computed.stats
        return {"data": {"path": DATA_DIR, "schema": schema_to_json(DOCUMENT_SCHEMA), "rows": stats["records_out"]},
                "duplicates": {"path": DUPLICATES_FILE, "schema": schema_to_json(DUPLICATES_SCHEMA),
                               "rows": sum(stats["dropped"].values())}}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        return {"tasks": "signature, routing, verification and filter tasks per shard", "CPU per task": 1,
                "actors": f"{config.dedup.num_actors} bucket actors (0 CPU each)"}

    def summary(self, result: StageResult) -> list[str]:
        stats = result["stats"]
        return [f"clusters {stats['clusters']:,}, largest {stats['largest_cluster']:,}"]


DEDUP = DedupStage()
dedup_flow = stage_flow(DEDUP)
