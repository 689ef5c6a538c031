"""Ray side of filtering: actors that load the models once and filter shards; fastText training tasks.

`FilterActor` holds the compiled chain and its fastText models for its lifetime, so each model is loaded once
per actor, not per shard; an `ActorPool` spreads the upstream shards over `num_actors` of them. Training runs
in `train_fasttext_task`, a task with `max_calls=1` that starts a minimal Python process for fastText's
trainer (which hits NaN in processes that have loaded other native libraries); Ray retries failed attempts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
from ray.util import ActorPool

from dataprep.filter.chain import Step, filter_shard, load_resources
from dataprep.filter.fasttext_models import train_supervised
from dataprep.stage import UNITS_DIR, StageDir
from workers.drill import attempt, retried

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
class FilterActor:
    """Filters shards with the chain's models loaded once."""

    def __init__(self, stage_path: str, steps: list[Step]) -> None:
        self.stage = StageDir(Path(stage_path))
        self.steps = steps
        self.resources = load_resources(steps)

    def filter(self, source: str) -> dict[str, Any]:
        """One shard (a call retried on a restarted actor, after its node died, is counted: `retried_shards`)."""
        if self.stage.finished_unit(Path(source).stem) is None:  # a finished shard is only read back
            attempt(shard_target(self.stage, Path(source)))
        return filter_shard(self.stage, Path(source), self.steps, self.resources)


def shard_target(stage: StageDir, source: Path) -> Path:
    """The name a filter shard's attempts are recorded under (`workers.drill`)."""
    return stage.path / UNITS_DIR / f"filter-{source.stem}"


def retried_shards(stage: StageDir) -> int:
    """Filter shards processed more than once (an actor restarted after its node or process died)."""
    return retried(stage.path / UNITS_DIR)


def run_filter(stage: StageDir, sources: list[Path], steps: list[Step], num_actors: int) -> list[dict[str, Any]]:
    """Filter every shard on a pool of actors; per-shard stats in source order.

    At most as many actors as the cluster has CPUs (each takes one for its lifetime): an actor that can never be
    placed would hold the shards the pool gives it forever."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if num_actors > cpus:
        log.warning("filter.num_actors %d > %d CPUs in the cluster: using %d actors", num_actors, cpus, cpus)
    count = max(1, min(num_actors, len(sources), cpus))
    actors = [FilterActor.remote(str(stage.path), steps) for _ in range(count)]  # type: ignore[attr-defined]
    pool = ActorPool(actors)
    results = list(pool.map(lambda actor, source: actor.filter.remote(str(source)), sources))
    for actor in actors:
        ray.kill(actor)
    return results


@ray.remote(num_cpus=1, max_calls=1)
def train_fasttext_task(train_file: str, output: str, quantize: bool, options: dict[str, Any]) -> str:
    """Train one supervised fastText model in a fresh worker process and save it to `output`."""
    train_supervised(Path(train_file), Path(output), quantize, **options)
    return output


def train_fasttext(train_file: Path, output: Path, quantize: bool, options: dict[str, Any], retries: int = 3) -> Path:
    """Train on Ray with retries (fresh process per attempt, any exception retried)."""
    task = train_fasttext_task.options(max_retries=retries, retry_exceptions=True)
    return Path(ray.get(task.remote(str(train_file), str(output), quantize, options)))
