"""The one stage skeleton: every pipeline stage is a `StageSpec` run by `run_stage`.

A spec says only what is its own: the config it hashes (`params`), where its inputs come from
(`resolve_inputs`), the checks that must fail before any work (`check`), the Ray work (`compute`, run inside a
Prefect task with retries after Ray is connected), driver-side finishing steps (`finish`: plots, exports), the
outputs it lists in the manifest, the Ray resources it asks for, and its console summary.

`run_stage` does the rest, the same way for every stage:

1. resolve the upstream stage (it must be complete) and the inputs; run the spec's checks;
2. content-address the output: `<run_dir>/<stage>-<hash>`, hash over the config, the input keys and the code
   version (the material is kept in the manifest so `plan_stage` can say what changed);
3. skip when that directory is complete (its report is re-attached to the flow run);
4. otherwise prepare it (clear `_tmp/`), compute with Prefect task retries (each retry resumes), finish,
   write the manifest and `_SUCCESS` last (atomic publish), attach the markdown artifact and emit the
   `forgeline.stage.published` event (resource `forgeline.stage.<stage>-<hash>`).

`plan_stage` computes the same address without running anything: the `--dry-run` of the CLI.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from dataprep.stage import StageDir, package_version, stage_hash
from flows.common import connect_ray, publish_artifact
from flows.config import RunConfig

PUBLISHED_EVENT = "forgeline.stage.published"


class StageResult(TypedDict):
    """What a stage flow returns: small, JSON-friendly, never documents."""

    stage: str
    path: str
    skipped: bool
    stats: dict[str, Any]


@dataclass(frozen=True)
class StageInputs:
    """A stage's resolved inputs: the keys its hash covers, the manifest's `inputs`, and what compute needs."""

    keys: list[str]
    manifest: list[dict[str, Any]]
    upstream: StageDir | None = None
    payload: Any = None


@dataclass(frozen=True)
class Computed:
    """The result of a stage's work: its stats, extra manifest blocks, and whether it may be published."""

    stats: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    complete: bool = True


class NotYetKnown(Exception):  # noqa: N818 (a signal for the planner, not an error)
    """A stage's address depends on an upstream output that does not exist yet (raised while planning)."""


class StageSpec(ABC):
    """What one stage supplies to the skeleton; everything else is `run_stage`'s."""

    name: ClassVar[str]
    code_version: ClassVar[str]
    upstream: ClassVar[str | None] = None
    upstream_must_be_complete: ClassVar[bool] = True
    output_names: ClassVar[tuple[str, ...]] = ("data",)

    def code(self) -> str:
        """The code version part of the hash: package version and the stage's own version."""
        return f"{package_version()}/{self.code_version}"

    @abstractmethod
    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """The config as it is hashed (defaults filled in, fingerprints of files it reads)."""

    def resolve_inputs(self, config: RunConfig, upstream: StageDir | None) -> StageInputs:
        """Default: the one upstream stage, keyed by its content-addressed name."""
        if upstream is None:
            raise ValueError(f"{self.name}: needs an upstream {self.upstream} stage")
        return StageInputs([upstream.name], [{"stage": upstream.name, "path": str(upstream.path)}], upstream)

    def prerequisites(self, config: RunConfig, inputs: StageInputs) -> None:
        """Work that must happen before the address is known (not run by the planner)."""
        return None

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        """Checks that must fail before any work starts."""
        return None

    @abstractmethod
    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """The stage's work (Ray connected, inside a Prefect task that retries it; a retry resumes)."""

    def finish(self, config: RunConfig, stage: StageDir, inputs: StageInputs, computed: Computed) -> Computed:
        """Driver-side steps after the work (plots, exports); may add stats."""
        return computed

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        """The manifest's `outputs` block."""
        return {}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        """The Ray resources the stage asks for (for the plan)."""
        return {}

    def on_skip(self, config: RunConfig, stage: StageDir, manifest: dict[str, Any]) -> dict[str, Any]:
        """Stats to return for a stage that was already complete (default: the manifest's, report re-attached)."""
        self.report(manifest, skipped=True)
        stats: dict[str, Any] = manifest["stats"]
        return stats

    def report(self, manifest: dict[str, Any], skipped: bool = False) -> None:
        """Attach the stage's report to the flow run."""
        publish_artifact(manifest, skipped)

    def summary(self, result: StageResult) -> list[str]:
        """Extra console lines for the CLI report."""
        return []


@dataclass(frozen=True)
class Address:
    """Where a stage's output lives and what its hash covered."""

    stage: StageDir
    material: dict[str, Any]


def address(spec: StageSpec, config: RunConfig, inputs: StageInputs) -> Address:
    """`<run_dir>/<stage>-<hash>` for this config, these inputs and this code."""
    material: dict[str, Any] = {"config": spec.params(config, inputs), "inputs": inputs.keys, "code": spec.code()}
    digest = stage_hash(spec.name, material["config"], material["inputs"], material["code"])
    return Address(StageDir.for_stage(config.run_dir, spec.name, digest), material)


def complete_upstream(path: str | None, spec: StageSpec) -> StageDir | None:
    """The upstream stage at `path` (None for a first stage), or a ValueError when it is not complete."""
    if spec.upstream is None:
        return None
    if path is None:
        raise ValueError(f"{spec.name}: needs the path of a complete {spec.upstream} stage")
    upstream = StageDir(Path(path))
    if not upstream.path.is_dir():
        raise ValueError(f"{spec.name}: no {spec.upstream} stage at {upstream.path}")
    if spec.upstream_must_be_complete and not upstream.is_complete():
        raise ValueError(f"{spec.name} input {upstream.path} is not a complete stage (no _SUCCESS)")
    return upstream


def latest_complete(run_dir: Path, stage: str, exclude: Path | None = None) -> dict[str, Any] | None:
    """The manifest of the most recently published output of `stage` in `run_dir` (other than `exclude`)."""
    done = [StageDir(p) for p in Path(run_dir).glob(f"{stage}-*") if StageDir(p).is_complete() and p != exclude]
    if not done:
        return None
    return max(done, key=lambda s: (s.path / "_SUCCESS").stat().st_mtime).read_manifest()


def timings(started: float) -> dict[str, Any]:
    """The manifest's `timings` block for a stage that started at `started` (epoch seconds)."""
    return {"started_at": datetime.fromtimestamp(started, UTC).isoformat(),
            "finished_at": datetime.now(UTC).isoformat(), "seconds": round(time.time() - started, 3)}


@task(name="compute", cache_policy=NO_CACHE)
def compute_task(spec: StageSpec, config: RunConfig, stage_path: str, inputs: StageInputs) -> Computed:
    """Connect Ray, then run the spec's work (Prefect retries this task; the work resumes per shard)."""
    get_run_logger().info("Ray: %s", connect_ray(config))
    return spec.compute(config, StageDir(Path(stage_path)), inputs)


def _manifest(spec: StageSpec, config: RunConfig, target: Address, inputs: StageInputs, computed: Computed,
              started: float) -> dict[str, Any]:
    stage = target.stage
    return {"stage": spec.name, "name": stage.name, "path": str(stage.path), "hash": stage.digest,
            "code_version": target.material["code"], "config": target.material["config"],
            "hash_material": target.material, "inputs": inputs.manifest,
            "outputs": spec.outputs(config, stage, computed), "stats": computed.stats,
            **computed.manifest, "timings": timings(started)}


def _announce(stage: StageDir, stats: dict[str, Any]) -> None:
    counts = {key: stats[key] for key in ("records_in", "records_out") if isinstance(stats.get(key), int)}
    emit_event(event=PUBLISHED_EVENT, resource={"prefect.resource.id": f"forgeline.stage.{stage.name}",
                                                "forgeline.path": str(stage.path)},
               payload={"stage": stage.name, "path": str(stage.path), **counts})


def run_stage(spec: StageSpec, config: RunConfig, upstream_path: str | None = None) -> StageResult:
    """Run one stage through the skeleton (called inside the stage's Prefect flow)."""
    logger = get_run_logger()
    started = time.time()
    inputs = spec.resolve_inputs(config, complete_upstream(upstream_path, spec))
    spec.prerequisites(config, inputs)
    spec.check(config, inputs)
    target = address(spec, config, inputs)
    stage = target.stage
    if stage.is_complete():
        logger.info("%s: %s is complete; skipping", spec.name, stage.path)
        return {"stage": spec.name, "path": str(stage.path), "skipped": True,
                "stats": spec.on_skip(config, stage, stage.read_manifest())}
    stage.prepare()
    runner = compute_task.with_options(name=f"{spec.name}-compute", retries=config.orchestration.task_retries,
                                       retry_delay_seconds=config.orchestration.retry_delay_seconds)
    computed = spec.finish(config, stage, inputs, runner(spec, config, str(stage.path), inputs))
    if computed.complete:
        manifest = _manifest(spec, config, target, inputs, computed, started)
        stage.publish(manifest)
        spec.report(manifest)
        _announce(stage, computed.stats)
        logger.info("%s: published %s", spec.name, stage.path)
    return {"stage": spec.name, "path": str(stage.path), "skipped": False, "stats": computed.stats}


def stage_flow(spec: StageSpec) -> Any:
    """The Prefect flow of a stage: `<name>(config, upstream_path=None)`, named after the stage."""

    def run(config: RunConfig, upstream_path: str | None = None) -> StageResult:
        return run_stage(spec, config, upstream_path)

    run.__doc__ = f"The `{spec.name}` stage (see flows/stage.py for the skeleton)."
    return flow(name=spec.name, log_prints=True)(run)
