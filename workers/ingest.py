"""Ray side of ingest: one task per input file, each streaming its file into resumable shards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from dataprep.ingest.documents import IngestConfig, IngestUnit, run_ingest_unit
from dataprep.stage import UNITS_DIR, FaultPlan, StageDir
from workers.drill import attempt, retried

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def ingest_file_task(
    stage_path: str, unit: IngestUnit, settings: IngestConfig, fault: FaultPlan | None
) -> dict[str, Any]:
    """Ray task: ingest one file into the stage directory and return its (small) stats dict. A retry (its worker
    or node died) resumes after the unit's published shards and is counted (`retried_units`)."""
    stage = StageDir(Path(stage_path))
    if stage.finished_unit(unit.name) is None:  # a finished unit is only read back, not rerun
        attempt(unit_target(stage.path, unit))
    return run_ingest_unit(stage, unit, settings, fault)


def unit_target(stage_path: Path, unit: IngestUnit) -> Path:
    """The name an ingest unit's attempts are recorded under (`workers.drill`)."""
    return stage_path / UNITS_DIR / f"unit-{unit.index:05d}"


def retried_units(stage: StageDir) -> int:
    """Ingest units Ray ran more than once (after a lost worker or node)."""
    return retried(stage.path / UNITS_DIR)


def run_ingest_units(
    stage: StageDir,
    units: list[IngestUnit],
    settings: IngestConfig,
    *,
    max_retries: int = 3,
    fault: FaultPlan | None = None,
    on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unit as a Ray task (retried by Ray if its worker dies); results in unit order.

    Raises the first task error after all other tasks have finished, so their shards are published and
    a rerun only redoes what failed.
    """
    task = ingest_file_task.options(max_retries=max_retries, retry_exceptions=False)
    pending = {
        task.remote(str(stage.path), unit, settings, fault): unit.index for unit in units
    }
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except Exception as error:  # keep going: other units still publish their shards
            log.error("ingest unit %05d failed: %s", index, error)
            errors.append(error)
            continue
        if on_progress is not None:
            on_progress(len(results), len(units), results[index])
    if errors:
        raise errors[0]
    return [results[unit.index] for unit in units]
