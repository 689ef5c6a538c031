"""The `forgeline run` flow: every stage in order, each skipped when its output is already complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.config import STAGES, RunConfig
from flows.dedup import dedup_flow
from flows.evaluate import evaluate_flow
from flows.filter import filter_flow
from flows.ingest import ingest_flow
from flows.pretrain import pretrain_flow
from flows.tokenize import tokenize_flow
from flows.train import train_quality_flow


def stages_until(until: str | None) -> tuple[str, ...]:
    """The stages to run, in order, stopping after `until` (all when None)."""
    if until is None:
        return STAGES
    if until not in STAGES:
        raise ValueError(f"--until {until!r}: choose one of {', '.join(STAGES)}")
    return STAGES[: STAGES.index(until) + 1]


@flow(name="forgeline-run", log_prints=True)
def pipeline_flow(config: RunConfig, until: str | None = None) -> dict[str, Any]:
    """Run the pipeline's stages as subflows; returns each stage's output path and stats."""
    logger = get_run_logger()
    results: dict[str, Any] = {}
    selected = stages_until(until)
    logger.info("stages: %s", ", ".join(selected))
    results["ingest"] = ingest_flow(config)
    if "dedup" in selected:
        results["dedup"] = dedup_flow(config, results["ingest"]["path"])
    if "filter" in selected:
        upstream = results["dedup"]["path"]
        training = config.filter.train_quality
        if training is not None and not training.output.exists():
            train_quality_flow(training, [str(Path(upstream) / "data")], config.ray)
        results["filter"] = filter_flow(config, upstream)
    if "tokenize" in selected:
        results["tokenize"] = tokenize_flow(config, results["filter"]["path"])
    if "pretrain" in selected:
        results["pretrain"] = pretrain_flow(config, results["tokenize"]["path"])
    if "evaluate" in selected:
        results["evaluate"] = evaluate_flow(config, results["pretrain"]["path"])
    return results
