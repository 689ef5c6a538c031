"""The `filter` Prefect flow: the quality/language/toxicity chain over the dedup output, on Ray actors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import xxhash
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dataprep.filtering import REMOVED_DIR, load_resources, merge_shard_stats
from dataprep.funnel import funnel_markdown, funnel_png
from dataprep.ingest import DATA_DIR
from dataprep.stage import StageDir, package_version, stage_hash
from flows.common import (
    complete_upstream,
    completed_stage_result,
    connect_ray,
    stage_manifest,
    stage_task_options,
)
from flows.config import RunConfig
from workers.filter import run_filter

STAGE = "filter"
CODE_VERSION = "filter-2"
FUNNEL_PNG = "funnel.png"


def file_digest(path: Path) -> str:
    """xxh64 of a model or list file's bytes: retraining a model changes the stage hash."""
    return xxhash.xxh64_hexdigest(path.read_bytes())


def filter_params(config: RunConfig) -> dict[str, Any]:
    """The chain as it is hashed: steps with every default filled in, plus each model file's fingerprint."""
    steps = []
    for spec in config.filter.steps:
        step = spec.step()
        params = step.params.model_dump(mode="json")
        for key in ("model", "path"):
            if params.get(key):
                params[f"{key}_fingerprint"] = file_digest(Path(params[key]))
        steps.append({"name": step.name, "rule": step.rule, "mode": step.mode, "params": params})
    return {"steps": steps}


def filter_stage_dir(config: RunConfig, upstream: StageDir) -> StageDir:
    digest = stage_hash(STAGE, filter_params(config), [upstream.name], f"{package_version()}/{CODE_VERSION}")
    return StageDir.for_stage(config.run_dir, STAGE, digest)


@task(name="filter-documents", cache_policy=NO_CACHE)
def filter_task(config: RunConfig, upstream_path: str, stage_path: str) -> dict[str, Any]:
    """Run the chain on Ray actors; returns the merged stats."""
    get_run_logger().info("Ray: %s", connect_ray(config))
    steps = [spec.step() for spec in config.filter.steps]
    sources = sorted((Path(upstream_path) / DATA_DIR).glob("*.parquet"))
    shard_stats = run_filter(StageDir(Path(stage_path)), sources, steps, config.filter.num_actors)
    return merge_shard_stats(shard_stats, [step.name for step in steps])


def publish_funnel(manifest: dict[str, Any], skipped: bool = False) -> None:
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


@flow(name="filter", log_prints=True)
def filter_flow(config: RunConfig, upstream_path: str) -> dict[str, Any]:
    """Filter a complete upstream stage (dedup or ingest) into `<run_dir>/filter-<hash>/`."""
    logger = get_run_logger()
    started = time.time()
    upstream = complete_upstream(upstream_path, STAGE)
    load_resources([spec.step() for spec in config.filter.steps])  # bad models fail here, before any document
    stage = filter_stage_dir(config, upstream)
    if (done := completed_stage_result(stage)) is not None:
        publish_funnel(stage.read_manifest(), skipped=True)
        return done
    stage.prepare()
    stats = filter_task.with_options(**stage_task_options(config))(config, str(upstream.path), str(stage.path))
    funnel_png(stats, stage.path / FUNNEL_PNG, f"filter funnel: {config.name}")
    outputs = {"data": {"path": DATA_DIR, "rows": stats["records_out"]},
               "removed": {"path": REMOVED_DIR, "rows": stats["records_in"] - stats["records_out"]},
               "funnel": {"path": FUNNEL_PNG}}
    manifest = stage_manifest(stage, STAGE, f"{package_version()}/{CODE_VERSION}", filter_params(config), upstream,
                              outputs, stats, started)
    stage.publish(manifest)
    publish_funnel(manifest)
    logger.info("filter: published %s (%d → %d documents)", stage.path, stats["records_in"], stats["records_out"])
    return {"path": str(stage.path), "skipped": False, "stats": stats}
