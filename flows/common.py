"""Helpers every stage flow shares: Ray connection, fault injection, stats artifacts."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from dataprep.stage import FaultPlan, StageDir
from flows.config import RunConfig
from workers.ray_runtime import init_ray

FAULT_ENV = "FORGELINE_INJECT_FAULT"


def connect_ray(config: RunConfig) -> dict[str, object]:
    """Start local Ray (loopback, temp dir in the run dir) or attach to `config.ray.address`."""
    ray_cfg = config.ray
    return init_ray(
        ray_cfg.address,
        temp_dir=ray_cfg.temp_dir or Path(config.run_dir) / "ray",
        num_cpus=ray_cfg.num_cpus,
        object_store_memory_mb=ray_cfg.object_store_memory_mb,
        dashboard=ray_cfg.dashboard,
        dashboard_port=ray_cfg.dashboard_port,
    )


def injected_fault(stage: str) -> FaultPlan | None:
    """Failure drill: `FORGELINE_INJECT_FAULT=<stage>:<k>[:kill]` fails each unit of <stage> after k shards.

    Without `:kill` the unit raises (Prefect retries the stage task, or a rerun resumes); with `:kill`
    the Ray worker process dies and Ray retries the task, which resumes after the published shards.
    """
    value = os.environ.get(FAULT_ENV, "")
    name, _, spec = value.partition(":")
    if name != stage:
        return None
    try:
        return FaultPlan.parse(spec)
    except ValueError as error:
        raise ValueError(f"{FAULT_ENV}={value!r}: {error}") from None


def _counts_table(counts: dict[str, int], header: str) -> list[str]:
    if not counts:
        return [f"_no {header.lower()}_", ""]
    lines = [f"| {header} | records |", "|---|---:|"]
    lines += [f"| {key} | {value:,} |" for key, value in sorted(counts.items(), key=lambda kv: -kv[1])]
    return lines + [""]


def stats_markdown(manifest: dict[str, Any], skipped: bool = False) -> str:
    """A markdown report of a stage manifest: totals, drops per reason, details and per-unit rows."""
    stats = manifest["stats"]
    volume = [key for key in ("bytes_in", "chars_out") if key in stats]
    header = ["records in", "records out", "dropped", *[key.replace("_", " ") for key in volume], "seconds"]
    values = [stats["records_in"], stats["records_out"], sum(stats["dropped"].values()),
              *[stats[key] for key in volume]]
    lines = [
        f"# {manifest['stage']} — `{manifest['name']}`",
        "",
        "_already complete: skipped on this run_" if skipped else "",
        f"Output: `{manifest['path']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
        "| " + " | ".join(f"{v:,}" for v in values) + f" | {manifest['timings']['seconds']:.1f} |",
        "",
        "## Dropped, by reason",
        "",
        *_counts_table(stats["dropped"], "Reason"),
    ]
    if "skipped" in stats:
        lines += ["## Skipped (not documents)", "", *_counts_table(stats["skipped"], "Record type")]
    details = {k: v for k, v in stats.items() if k not in ("records_in", "records_out", "dropped", "skipped", *volume)}
    if details:
        lines += ["## Details", "", "| stat | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in details.items()] + [""]
    units = manifest.get("units", [])
    if units:
        lines += ["## Inputs", "", "| unit | input | in | out | dropped |", "|---|---|---:|---:|---:|"]
        for unit in units:
            dropped = sum(unit["quarantined"].values())
            records_in = unit["records_read"] - sum(unit["skipped"].values())
            lines.append(
                f"| {unit['unit']} | `{unit['uri']}` | {records_in:,} | {unit['docs_out']:,} | {dropped:,} |"
            )
    return "\n".join(lines) + "\n"


def publish_artifact(manifest: dict[str, Any], skipped: bool = False) -> None:
    """Attach the stage report to the current Prefect flow run as a markdown artifact."""
    create_markdown_artifact(
        key=f"{manifest['stage']}-stats",
        markdown=stats_markdown(manifest, skipped),
        description=f"{manifest['stage']} stats for {manifest['name']}",
    )


def completed_stage_result(stage: StageDir) -> dict[str, Any] | None:
    """For a complete stage: log the skip, re-attach its report, return its result; None otherwise."""
    if not stage.is_complete():
        return None
    manifest = stage.read_manifest()
    get_run_logger().info("%s: %s is complete; skipping", manifest["stage"], stage.path)
    publish_artifact(manifest, skipped=True)
    return {"path": str(stage.path), "skipped": True, "stats": manifest["stats"]}


def complete_upstream(path: str, stage: str) -> StageDir:
    """The upstream stage at `path`, or a ValueError when it has no `_SUCCESS`."""
    upstream = StageDir(Path(path))
    if not upstream.is_complete():
        raise ValueError(f"{stage} input {upstream.path} is not a complete stage (no _SUCCESS)")
    return upstream


def timings(started: float) -> dict[str, Any]:
    """The manifest's `timings` block for a stage that started at `started` (epoch seconds)."""
    return {"started_at": datetime.fromtimestamp(started, UTC).isoformat(),
            "finished_at": datetime.now(UTC).isoformat(), "seconds": round(time.time() - started, 3)}


def stage_manifest(stage: StageDir, name: str, code_version: str, config: dict[str, Any], upstream: StageDir,
                   outputs: dict[str, Any], stats: dict[str, Any], started: float) -> dict[str, Any]:
    """The manifest of a stage that reads one upstream stage (every stage after ingest)."""
    return {"stage": name, "name": stage.name, "path": str(stage.path), "hash": stage.digest,
            "code_version": code_version, "config": config,
            "inputs": [{"stage": upstream.name, "path": str(upstream.path)}],
            "outputs": outputs, "stats": stats, "timings": timings(started)}


def stage_task_options(config: RunConfig) -> dict[str, Any]:
    """Prefect retry options for a stage's compute task (a retry resumes per shard)."""
    return {"retries": config.orchestration.task_retries,
            "retry_delay_seconds": config.orchestration.retry_delay_seconds}
