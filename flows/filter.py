"""The `filter` stage: the quality/language/toxicity chain over the dedup output, on Ray actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from dataprep.filter.chain import load_resources, merge_shard_stats
from dataprep.filter.funnel import funnel_markdown, funnel_png
from dataprep.stage import DATA_DIR, REMOVED_DIR, StageDir, file_digest
from flows.config import RunConfig
from flows.stage import Computed, NotYetKnown, StageInputs, StageResult, StageSpec, stage_flow
from flows.train import train_quality_flow
from workers.filter import retried_shards, run_filter

FUNNEL_PNG = "funnel.png"


class FilterStage(StageSpec):
    """Dedup documents → kept documents, removed documents per step (`removed/<step>/`), a funnel chart."""

    name = "filter"
    code_version = "filter-2"
    upstream = "dedup"
    output_names = (DATA_DIR, REMOVED_DIR, FUNNEL_PNG)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """The chain as it is hashed: steps with every default filled in, plus each model file's fingerprint."""
        steps = []
        for spec in config.filter.steps:
            step = spec.step()
            params = step.params.model_dump(mode="json")
            for key in ("model", "path"):
                if params.get(key):
                    path = Path(params[key])
                    if not path.is_file():
                        raise NotYetKnown(f"{path} does not exist yet")
                    params[f"{key}_fingerprint"] = file_digest(path)
            steps.append({"name": step.name, "rule": step.rule, "mode": step.mode, "params": params})
        return {"steps": steps}

    def prerequisites(self, config: RunConfig, inputs: StageInputs) -> None:
        """Train the quality model first when `filter.train_quality` is set and its output does not exist."""
        training = config.filter.train_quality
        if training is not None and not training.output.exists() and inputs.upstream is not None:
            train_quality_flow(training, [str(inputs.upstream.path / DATA_DIR)], config.ray)

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        load_resources([spec.step() for spec in config.filter.steps])  # bad models fail before any document

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        assert inputs.upstream is not None
        steps = [spec.step() for spec in config.filter.steps]
        sources = sorted((inputs.upstream.path / DATA_DIR).glob("*.parquet"))
        shard_stats = run_filter(stage, sources, steps, config.filter.num_actors)
        stats = merge_shard_stats(shard_stats, [step.name for step in steps])
        return Computed({**stats, "recovery": {"shards_retried": retried_shards(stage)}})

    def finish(self, config: RunConfig, stage: StageDir, inputs: StageInputs, computed: Computed) -> Computed:
        funnel_png(computed.stats, stage.path / FUNNEL_PNG, f"filter funnel: {config.name}")
        return computed

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        stats = computed.stats
        return {"data": {"path": DATA_DIR, "rows": stats["records_out"]},
                "removed": {"path": REMOVED_DIR, "rows": stats["records_in"] - stats["records_out"]},
                "funnel": {"path": FUNNEL_PNG}}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        return {"actors": f"{config.filter.num_actors} filter actors (1 CPU each, models loaded once per actor)"}

    def report(self, manifest: dict[str, Any], skipped: bool = False) -> None:
        publish_funnel(manifest, skipped)

    def summary(self, result: StageResult) -> list[str]:
        lines = [f"funnel ({result['path']}/{FUNNEL_PNG}; removed documents in {REMOVED_DIR}/<step>/):"]
        return lines + ["  " + line for line in funnel_markdown(result["stats"]).splitlines()]


def publish_funnel(manifest: dict[str, Any], skipped: bool = False) -> None:
    """The filter report: totals, the per-step funnel and the drops per reason, as markdown tables."""
    stats = manifest["stats"]
    reasons = "\n".join(f"| {reason} | {count:,} |" for reason, count in stats["reasons"].items())
    create_markdown_artifact(
        key="filter-funnel",
        markdown=(f"# filter — `{manifest['name']}`\n\n{'_already complete: skipped on this run_' if skipped else ''}"
                  f"\n\nOutput: `{manifest['path']}` (chart: `{FUNNEL_PNG}`; removed documents under "
                  f"`{REMOVED_DIR}/<step>/`)\n\n{stats['records_in']:,} documents in, {stats['records_out']:,} "
                  f"kept; {stats['chars_in']:,} → {stats['chars_out']:,} characters.\n\n## Funnel\n\n"
                  f"{funnel_markdown(stats)}\n## Drops by reason\n\n| step:reason | documents |\n|---|---:|\n"
                  f"{reasons}\n"),
        description=f"filter funnel for {manifest['name']}",
    )


FILTER = FilterStage()
filter_flow = stage_flow(FILTER)
