"""The `dedup` stage: exact, URL and MinHash-LSH dedup of the ingest output on Ray."""

from __future__ import annotations

from typing import Any

from dataprep.dedup.documents import DUPLICATES_SCHEMA
from dataprep.dedup.lines import EMPTY_REASON
from dataprep.ingest.documents import DOCUMENT_SCHEMA
from dataprep.shards import schema_to_json
from dataprep.stage import DATA_DIR, REMOVED_DIR, StageDir
from flows.common import publish_artifact
from flows.config import RunConfig
from flows.stage import Computed, StageInputs, StageResult, StageSpec, stage_flow
from workers.dedup import run_dedup, write_audit
from workers.line_dedup import run_line_dedup

DUPLICATES_FILE = "duplicates.parquet"
KEPT_DIR = "_work/kept"  # documents kept by document dedup, before line dedup
WORK_DIR = "_work"


class DedupStage(StageSpec):
    """Ingest documents → kept documents (same shard names) + `duplicates.parquet` (the audit)."""

    name = "dedup"
    code_version = "dedup-2"
    upstream = "ingest"
    output_names = (DATA_DIR, DUPLICATES_FILE)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """The config with bands and rows resolved; not the actor counts (the result does not depend on them),
        and no `lines` section while line dedup is off (outputs of earlier versions keep their address)."""
        settings = config.dedup
        bands, rows = settings.lsh()
        exclude: dict[str, Any] = {"components": True, "partitions": True,
                                   "driver_max_docs": True,
                                   "lines": {"num_actors": True} if self.lines_on(config) else True}
        return {**settings.model_dump(mode="json", exclude=exclude), "bands": bands, "rows": rows}

    @staticmethod
    def lines_on(config: RunConfig) -> bool:
        return config.dedup.lines.mode != "off"

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """Document dedup (exact, URL, MinHash); then, with `dedup.lines`, line/paragraph dedup of the kept."""
        assert inputs.upstream is not None
        sources = sorted((inputs.upstream.path / DATA_DIR).glob("*.parquet"))
        kept = stage.path / (KEPT_DIR if self.lines_on(config) else DATA_DIR)
        stats, audit = run_dedup(sources, stage.path / WORK_DIR, kept, stage.tmp_dir, config.dedup)
        write_audit(audit, stage.path / DUPLICATES_FILE, stage.tmp_dir)
        if self.lines_on(config):
            lines = run_line_dedup(sorted(kept.glob("*.parquet")), stage.path / DATA_DIR, stage.path / REMOVED_DIR,
                                   stage.tmp_dir, config.dedup.lines, work_dir=stage.path / WORK_DIR / "lines")
            stats = {**stats, "records_out": lines["documents_out"],
                     "dropped": {**stats["dropped"], **lines["dropped"]},
                     "lines": {k: v for k, v in lines.items() if k not in ("documents_in", "documents_out", "dropped")}}
        return Computed(stats)

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        stats = computed.stats
        outputs = {"data": {"path": DATA_DIR, "schema": schema_to_json(DOCUMENT_SCHEMA), "rows": stats["records_out"]},
                   "duplicates": {"path": DUPLICATES_FILE, "schema": schema_to_json(DUPLICATES_SCHEMA),
                                  "rows": sum(n for r, n in stats["dropped"].items() if r.endswith("_duplicate"))}}
        if self.lines_on(config):
            outputs["removed"] = {"path": REMOVED_DIR, "rows": stats["dropped"].get(EMPTY_REASON, 0),
                                  "reason": EMPTY_REASON}
        return outputs

    def resources(self, config: RunConfig) -> dict[str, Any]:
        resources = {"tasks": "signature, routing, verification and filter tasks per shard", "CPU per task": 1,
                     "partitions": f"{config.dedup.partitions} bucket/document partitions (1 CPU task each)"}
        if self.lines_on(config):
            resources["line actors"] = f"{config.dedup.lines.num_actors} count actors (0 CPU each)"
        return resources

    def report(self, manifest: dict[str, Any], skipped: bool = False) -> None:
        lines = manifest["stats"].get("lines")
        plain = {**manifest, "stats": {k: v for k, v in manifest["stats"].items() if k != "lines"}}
        publish_artifact(plain, skipped, lines_markdown(lines) if lines else "")

    def summary(self, result: StageResult) -> list[str]:
        stats = result["stats"]
        out = [f"clusters {stats['clusters']:,}, largest {stats['largest_cluster']:,}"]
        if "lines" in stats:
            lines = stats["lines"]
            out.append(f"{lines['mode']} dedup ({lines['rule']}): {lines['segments_removed']:,} of "
                       f"{lines['segments_seen']:,} segments removed from {lines['documents_affected']:,} documents, "
                       f"{lines['chars_removed']:,} characters")
        return out


def lines_markdown(lines: dict[str, Any]) -> str:
    """The line-dedup part of the dedup report: totals and the most frequent removed segments (for audit)."""
    rows = [f"| {row['docs']:,} | {row['removed_from_docs']:,} | {_table_text(row['text'])} |"
            for row in lines["top_removed"]]
    return "\n".join([
        f"## Line dedup ({lines['mode']}, {lines['rule']})", "",
        f"{lines['segments_removed']:,} of {lines['segments_seen']:,} segments removed from "
        f"{lines['documents_affected']:,} documents; {lines['chars_removed']:,} of {lines['chars_in']:,} characters.",
        "", "| documents containing it | removed from | segment |", "|---:|---:|---|", *rows, ""])


def _table_text(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


DEDUP = DedupStage()
dedup_flow = stage_flow(DEDUP)
