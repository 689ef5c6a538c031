"""The `evaluate` Prefect flows: every complete checkpoint of a pretrain stage, each evaluated once.

Output `<run_dir>/evaluate-<hash>/` (hash: the evaluate config, the task files' and data files' contents, and
the pretrain stage): `results/step-<n>.parquet` per checkpoint (written atomically: its presence means that
checkpoint is done for this eval config, so reruns skip it) with `results/step-<n>.json` (errors, generated
samples); `results.parquet` (run, pretrain, checkpoint, step, tokens, task, metric, value) for all of them;
`metrics.png`; the `evaluate-results` markdown artifact. `_SUCCESS` is written once the pretrain stage is
complete and all its checkpoints are evaluated.

Triggers: `forgeline run` (after pretrain); `forgeline evaluate CONFIG --watch --run PRETRAIN_DIR`, which
polls for new checkpoints; and `evaluate_checkpoint_flow`, the entry point of the `evaluate-on-checkpoint`
deployment in `infra/prefect.yaml`, run by Prefect for each `forgeline.checkpoint.saved` event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dataprep.evaluate.report import RESULT_SCHEMA, metrics_png, summary_markdown
from dataprep.evaluate.tasks import TaskError, load_task
from dataprep.shards import atomic_write_json, publish_table
from dataprep.stage import CHECKPOINTS_DIR, StageDir, file_digest
from flows.common import connect_ray, publish_plots
from flows.config import RunConfig, load_config
from flows.stage import Computed, StageInputs, StageResult, StageSpec, address, run_stage
from workers.checkpoint import complete_checkpoints
from workers.evaluate import evaluate_checkpoint_task

CODE_VERSION = "evaluate-1"
RESULTS_DIR = "results"
RESULTS_FILE = "results.parquet"
METRICS_PNG = "metrics.png"


def _digest(path: Path) -> str:
    return file_digest(path) if path.is_file() else "missing"


def load_tasks(config: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The task specs that load, and an error entry for each task file that does not."""
    tasks, errors = [], []
    for path in config.evaluate.tasks:
        try:
            spec = load_task(path)
            tasks.append({**spec.model_dump(mode="json"), "_fingerprint": _digest(path) + _digest(spec.data)})
        except TaskError as error:
            errors.append({"task": path.stem, "error": str(error), "step": None})
    return tasks, errors


def evaluate_params(config: RunConfig, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    settings = config.evaluate.model_dump(mode="json", exclude={"tasks", "use_gpu", "watch_interval"})
    return {**settings, "tasks": sorted((t["name"], t["_fingerprint"]) for t in tasks)}


def evaluate_stage(config: RunConfig, pretrain: StageDir) -> StageDir:
    """The evaluate stage directory for these tasks and this pretrain stage (the skeleton's address)."""
    spec = EvaluateStage()
    return address(spec, config, spec.resolve_inputs(config, pretrain)).stage


def result_path(stage: StageDir, checkpoint: Path) -> Path:
    return stage.path / RESULTS_DIR / f"{checkpoint.name}.parquet"


def pending_checkpoints(stage: StageDir, pretrain: StageDir) -> list[Path]:
    return [c for c in complete_checkpoints(pretrain.path / CHECKPOINTS_DIR) if not result_path(stage, c).is_file()]


def _store(config: RunConfig, stage: StageDir, pretrain: StageDir, checkpoint: Path, result: dict[str, Any]) -> None:
    """Side file (errors, samples) first, then the parquet that marks the checkpoint as done."""
    errors = [{**e, "step": result["step"]} for e in result["errors"]]
    atomic_write_json(stage.path / RESULTS_DIR / f"{checkpoint.name}.json",
                      {"checkpoint": str(checkpoint), "errors": errors, "samples": result["samples"]})
    rows = [{"run": config.name, "pretrain": pretrain.name, "checkpoint": checkpoint.name, "step": result["step"],
             "tokens": result["tokens"], **row} for row in result["rows"]]
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    publish_table(table, result_path(stage, checkpoint), stage.tmp_dir)


def evaluate_on_ray(config: RunConfig, stage: StageDir, pretrain: StageDir, tasks: list[dict[str, Any]],
                    checkpoints: list[Path]) -> int:
    """One Ray task per checkpoint (a GPU each with evaluate.use_gpu); results stored as they finish."""
    clean = [{k: v for k, v in t.items() if not k.startswith("_")} for t in tasks]
    remote = evaluate_checkpoint_task.options(num_gpus=1 if config.evaluate.use_gpu else 0)
    running = {remote.remote(str(path), clean, config.evaluate.max_windows, config.evaluate.batch): path
               for path in checkpoints}
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        checkpoint = running.pop(done[0])
        _store(config, stage, pretrain, checkpoint, ray.get(done[0]))
        get_run_logger().info("evaluated %s", checkpoint)
    return len(checkpoints)


def collect(stage: StageDir) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All stored rows (sorted by step) and errors."""
    files = sorted((stage.path / RESULTS_DIR).glob("*.parquet"))
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    errors = [e for f in sorted((stage.path / RESULTS_DIR).glob("*.json")) for e in json.loads(f.read_text())["errors"]]
    return sorted(rows, key=lambda r: (r["step"], r["task"], r["metric"])), errors


def refresh_outputs(config: RunConfig, stage: StageDir, load_errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Rewrite results.parquet, metrics.png and the artifact from everything stored so far."""
    rows, errors = collect(stage)
    errors = load_errors + errors
    publish_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), stage.path / RESULTS_FILE, stage.tmp_dir)
    metrics_png(rows, stage.path / METRICS_PNG, f"evaluation: {config.name}")
    table = summary_markdown(rows, errors)
    plots = publish_plots("evaluate", [stage.path / METRICS_PNG])
    create_markdown_artifact(key="evaluate-results", markdown=f"# evaluate — `{stage.name}`\n\n{table}{plots}",
                             description=f"evaluation of {config.name}")
    return {"checkpoints": len({r["step"] for r in rows}), "result_rows": len(rows), "errors": len(errors),
            "table": table}


class EvaluateStage(StageSpec):
    """Checkpoints of a pretrain stage → per-checkpoint results, `results.parquet`, `metrics.png`.

    The stage may run while training still writes checkpoints (`watch`): each checkpoint is evaluated once,
    and the stage is published (`_SUCCESS`) once training is complete and every checkpoint is evaluated.
    """

    name = "evaluate"
    code_version = CODE_VERSION
    upstream = "pretrain"
    upstream_must_be_complete = False
    output_names = (RESULTS_FILE, RESULTS_DIR, METRICS_PNG)

    def __init__(self, watch: bool = False, timeout_s: float | None = None) -> None:
        self.watch, self.timeout_s = watch, timeout_s

    def resolve_inputs(self, config: RunConfig, upstream: StageDir | None) -> StageInputs:
        inputs = super().resolve_inputs(config, upstream)
        return StageInputs(inputs.keys, inputs.manifest, upstream, load_tasks(config))

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        return evaluate_params(config, inputs.payload[0])

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        assert inputs.upstream is not None
        if not (inputs.upstream.path / CHECKPOINTS_DIR).is_dir() and not self.watch:
            raise ValueError(f"{inputs.upstream.path} has no {CHECKPOINTS_DIR}/ (not a pretrain stage)")
        for error in inputs.payload[1]:
            get_run_logger().error("task skipped: %s", error["error"])

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """Evaluate pending checkpoints; with `watch`, poll until training completes (or the timeout)."""
        assert inputs.upstream is not None
        pretrain, (tasks, load_errors) = inputs.upstream, inputs.payload
        started, evaluated = time.time(), 0
        while True:
            upstream_done = pretrain.is_complete()  # read before listing, so no final checkpoint is missed
            pending = pending_checkpoints(stage, pretrain)
            if pending:
                evaluated += evaluate_on_ray(config, stage, pretrain, tasks, pending)
                refresh_outputs(config, stage, load_errors)
                continue
            timed_out = self.timeout_s is not None and time.time() - started > self.timeout_s
            if not self.watch or upstream_done or timed_out:
                break
            time.sleep(config.evaluate.watch_interval)
        stats = {**refresh_outputs(config, stage, load_errors), "evaluated_now": evaluated}
        get_run_logger().info("evaluate: %s (%d checkpoints evaluated now)", stage.path, evaluated)
        return Computed(stats, complete=pretrain.is_complete() and not pending_checkpoints(stage, pretrain))

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"results": RESULTS_FILE, "per_checkpoint": RESULTS_DIR, "plot": METRICS_PNG}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        return {"tasks": "one per checkpoint", "CPU per task": 1, "GPU per task": 1 if config.evaluate.use_gpu else 0}

    def on_skip(self, config: RunConfig, stage: StageDir, manifest: dict[str, Any]) -> dict[str, Any]:
        tasks, load_errors = load_tasks(config)
        return {**manifest["stats"], **refresh_outputs(config, stage, load_errors)}

    def report(self, manifest: dict[str, Any], skipped: bool = False) -> None:
        return None  # refresh_outputs attached the results table

    def summary(self, result: StageResult) -> list[str]:
        path = result["path"]
        lines = [f"results: {path}/{RESULTS_FILE}; plot: {path}/{METRICS_PNG}"]
        return lines + ["  " + line for line in result["stats"]["table"].splitlines()]


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: RunConfig, pretrain_path: str, watch: bool = False, timeout_s: float | None = None
                  ) -> StageResult:
    """Evaluate every not-yet-evaluated checkpoint; with `watch`, keep polling until the stage is complete."""
    return run_stage(EvaluateStage(watch, timeout_s), config, pretrain_path)


@flow(name="evaluate-checkpoint", log_prints=True)
def evaluate_checkpoint_flow(config_path: str, checkpoint: str) -> dict[str, Any]:
    """One checkpoint (the deployment triggered by `forgeline.checkpoint.saved`); skipped if already done."""
    config = load_config(config_path)
    path = Path(checkpoint)
    if not path.is_dir():  # announced, then pruned by `pretrain.keep_last` before this run started
        get_run_logger().warning("checkpoint %s is gone (pruned by pretrain.keep_last); nothing to evaluate", path)
        return {"path": None, "skipped": True, "reason": f"checkpoint {path} no longer exists"}
    pretrain = StageDir(path.parent.parent)
    tasks, load_errors = load_tasks(config)
    stage = evaluate_stage(config, pretrain)
    stage.path.mkdir(parents=True, exist_ok=True)
    stage.tmp_dir.mkdir(exist_ok=True)
    if not result_path(stage, path).is_file():
        get_run_logger().info("Ray: %s", connect_ray(config))
        evaluate_on_ray(config, stage, pretrain, tasks, [path])
    return {"path": str(stage.path), "skipped": False, "stats": refresh_outputs(config, stage, load_errors)}
