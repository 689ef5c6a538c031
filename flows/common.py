"""Helpers every stage flow shares: Ray connection, fault injection, stats artifacts."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_image_artifact, create_markdown_artifact

from dataprep.stage import FaultPlan
from flows.config import RunConfig
from workers.ray_runtime import init_ray

FAULT_ENV = "FORGELINE_INJECT_FAULT"
EMBED_MAX_BYTES = 2 << 20  # a plot larger than this is linked by path, not embedded in the artifact


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


def _cell(value: Any) -> str:
    """A table cell: numbers with separators, nested counts as `key: n` pairs (never a Python repr)."""
    if isinstance(value, dict):
        return "<br>".join(f"{key}: {_cell(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return "<br>".join(_cell(item) for item in value) or "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def stats_markdown(manifest: dict[str, Any], skipped: bool = False) -> str:
    """A markdown report of a stage manifest: totals, drops per reason, details and per-unit rows."""
    stats = manifest["stats"]
    counted = [key for key in ("records_in", "records_out") if key in stats]
    volume = [key for key in ("bytes_in", "chars_out") if key in stats]
    header = [*[key.replace("_", " ") for key in counted], *(["dropped"] if "dropped" in stats else []),
              *[key.replace("_", " ") for key in volume], "seconds"]
    values = [*[stats[key] for key in counted], *([sum(stats["dropped"].values())] if "dropped" in stats else []),
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
    ]
    if "dropped" in stats:
        lines += ["## Dropped, by reason", "", *_counts_table(stats["dropped"], "Reason")]
    if "skipped" in stats:
        lines += ["## Skipped (not documents)", "", *_counts_table(stats["skipped"], "Record type")]
    details = {k: v for k, v in stats.items() if k not in ("records_in", "records_out", "dropped", "skipped", *volume)}
    if details:
        lines += ["## Details", "", "| stat | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in details.items()] + [""]
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


def png_data_url(path: Path) -> str:
    """The PNG at `path` as a `data:` URL (the Prefect UI shows it with no file server in between)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def publish_plots(stage: str, plots: list[Path]) -> str:
    """Attach each existing plot as a Prefect image artifact `<stage>-<plot name>`; returns a markdown
    "Plots" section for the stage's report that names each plot's file and its artifact."""
    lines = []
    for plot in plots:
        if not plot.is_file():
            continue
        key = re.sub(r"[^a-z0-9-]+", "-", f"{stage}-{plot.stem}".lower())
        if plot.stat().st_size <= EMBED_MAX_BYTES:
            create_image_artifact(image_url=png_data_url(plot), key=key, description=f"{plot.name} of {stage}")
            lines.append(f"- `{plot}` (image artifact `{key}`)")
        else:
            lines.append(f"- `{plot}` (too large to embed)")
    return "\n".join(["", "## Plots", "", *lines, ""]) if lines else ""


def publish_artifact(manifest: dict[str, Any], skipped: bool = False, extra: str = "") -> None:
    """Attach the stage report (and `extra` markdown) to the current Prefect flow run as a markdown artifact,
    and the stage's PNG plots (any `*.png` at the top of its output folder) as image artifacts."""
    plots = sorted(Path(manifest["path"]).glob("*.png")) if manifest.get("path") else []
    create_markdown_artifact(
        key=f"{manifest['stage']}-stats",
        markdown=stats_markdown(manifest, skipped) + extra + publish_plots(manifest["stage"], plots),
        description=f"{manifest['stage']} stats for {manifest['name']}",
    )
