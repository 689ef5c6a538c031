"""The `pretrain` stage: FSDP2 training on Ray Train's TorchTrainer, checkpoint events, HF export.

Output `<run_dir>/pretrain-<hash>/`: `checkpoints/step-*/` (DCP), `metrics.jsonl`, `loss.png`, `hf/` (the
exported Llama-format model) and the manifest. The hash covers the model, optimisation and data (not the
worker count or checkpoint cadence), so a rerun of an unfinished stage resumes from its latest checkpoint,
and Ray Train's `FailureConfig(max_failures)` restarts failed workers from it within a run.

While training runs the stage watches `checkpoints/` and emits a Prefect event `forgeline.checkpoint.saved`
per checkpoint (resource `forgeline.checkpoint.<stage>.<step>`), which automations can use to trigger
evaluation.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from dataprep.evaluate.curves import loss_curve_png, read_metrics
from dataprep.stage import CHECKPOINTS_DIR, HF_DIR, TOKENIZER_DIR, TOKENS_DIR, StageDir
from dataprep.tokenize.packing import read_index
from flows.common import injected_fault
from flows.config import RunConfig
from flows.stage import Computed, NotYetKnown, StageInputs, StageResult, StageSpec, stage_flow
from workers.checkpoint import check_compatible, complete_checkpoints, latest_checkpoint, read_journal, read_state
from workers.model_config import ModelConfig, parameter_count
from workers.pretrain import METRICS_FILE, read_resumes
from workers.train_config import OPERATIONAL_FIELDS, TrainJob

LOSS_PNG = "loss.png"
CHECKPOINT_EVENT = "forgeline.checkpoint.saved"


def train_job(config: RunConfig, tokenize_path: Path, stage_path: Path) -> TrainJob:
    """The job every worker receives; fails here (before Ray) on a shape/context/data mismatch."""
    index = read_index(tokenize_path / TOKENS_DIR)
    model = config.pretrain.model.resolve(index["vocab_size"])
    if index["seq_len"] > model.max_seq_len:
        raise ValueError(f"tokenize.seq_len {index['seq_len']} is larger than the model's context "
                         f"(pretrain.model.max_seq_len {model.max_seq_len})")
    if index["splits"]["train"]["windows"] == 0:
        raise ValueError(f"{tokenize_path}: no training windows (corpus shorter than seq_len + 1 tokens)")
    fault = injected_fault("pretrain")
    return TrainJob(config=config.pretrain, model=model.to_dict(), data_dir=str(tokenize_path / TOKENS_DIR),
                    out_dir=str(stage_path), fault_step=fault.after if fault else None)


class PretrainStage(StageSpec):
    """Packed windows → checkpoints, metrics, loss curve and the exported HF model."""

    name = "pretrain"
    code_version = "pretrain-1"
    upstream = "tokenize"
    output_names = (CHECKPOINTS_DIR, METRICS_FILE, LOSS_PNG, HF_DIR)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        """Model (with the tokenizer's vocabulary), optimisation and data; not workers or checkpoint cadence."""
        assert inputs.upstream is not None
        if not (inputs.upstream.path / TOKENS_DIR).is_dir():
            raise NotYetKnown("the model's vocabulary comes from the tokenize output")
        job = train_job(config, inputs.upstream.path, Path("."))
        return {"model": job.model, **config.pretrain.model_dump(mode="json", exclude={"model", *OPERATIONAL_FIELDS})}

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        assert inputs.upstream is not None
        train_job(config, inputs.upstream.path, Path("."))

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """Train (resuming from the stage's latest checkpoint); announce each checkpoint as it is saved."""
        assert inputs.upstream is not None
        job = train_job(config, inputs.upstream.path, stage.path)
        latest = latest_checkpoint(stage.path / CHECKPOINTS_DIR)
        if latest is not None:  # a checkpoint of another model shape is an error before any worker starts
            check_compatible(latest, job.model)
        seen: set[str] = set()
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(fit, config, job, stage)
            while not running.done():
                emit_checkpoint_events(stage, seen)
                time.sleep(1.0)
            running.result()
        emit_checkpoint_events(stage, seen)
        latest = latest_checkpoint(stage.path / CHECKPOINTS_DIR)
        if latest is None or read_state(latest)["step"] != config.pretrain.steps:
            raise RuntimeError(f"pretrain: training ended without a final checkpoint in {stage.path}")
        return Computed({}, {"latest": str(latest), "model": job.model})

    def finish(self, config: RunConfig, stage: StageDir, inputs: StageInputs, computed: Computed) -> Computed:
        """Export the final checkpoint as an HF model, draw the loss curve, gather the stats."""
        assert inputs.upstream is not None
        latest = Path(computed.manifest["latest"])
        export_task(str(latest), str(inputs.upstream.path / TOKENIZER_DIR), str(stage.path / HF_DIR))
        index = read_index(inputs.upstream.path / TOKENS_DIR)
        loss_curve_png(read_metrics(stage.path / METRICS_FILE), stage.path / LOSS_PNG, f"pretrain: {config.name}",
                       index["unigram_val_loss"])
        stats = pretrain_stats(stage, ModelConfig(**computed.manifest["model"]), index)
        return Computed(stats, {"latest_checkpoint": latest.name})

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"checkpoints": {"path": CHECKPOINTS_DIR, "latest": computed.manifest["latest_checkpoint"]},
                "metrics": METRICS_FILE, "loss_curve": LOSS_PNG, "hf": HF_DIR}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        settings = config.pretrain
        return {"train workers": settings.num_workers, "CPU per worker": settings.cpus_per_worker,
                "GPU per worker": 1 if settings.use_gpu else 0}

    def summary(self, result: StageResult) -> list[str]:
        stats, path = result["stats"], result["path"]
        return [f"{stats['parameters']:,} parameters, {stats['steps']} steps, {stats['tokens']:,} tokens; "
                f"loss {stats['final_loss']}, held-out {stats['final_val_loss']} (unigram baseline "
                f"{stats['unigram_val_loss']}); {stats['tokens_per_s']:,.0f} tokens/s",
                f"checkpoints: {path}/{CHECKPOINTS_DIR}; HF model: {path}/{HF_DIR}; curve: {path}/{LOSS_PNG}"]


def emit_checkpoint_events(stage: StageDir, seen: set[str]) -> None:
    """One Prefect event per checkpoint in the save journal not announced yet (pruned ones too)."""
    for entry in read_journal(stage.path / CHECKPOINTS_DIR):
        path, step, metrics = entry["path"], entry["step"], entry.get("metrics", {})
        if path in seen:
            continue
        seen.add(path)
        emit_event(event=CHECKPOINT_EVENT,
                   resource={"prefect.resource.id": f"forgeline.checkpoint.{stage.name}.{step}",
                             "forgeline.path": path},
                   payload={"step": step, "path": path, "stage": stage.name, "on_disk": Path(path).is_dir(),
                            "loss": metrics.get("loss"), "val_loss": metrics.get("val_loss")})
        get_run_logger().info("checkpoint %s (step %d) → event %s", path, step, CHECKPOINT_EVENT)


def fit(config: RunConfig, job: TrainJob, stage: StageDir) -> None:
    """Ray Train's TorchTrainer over `job` (gloo on CPU, NCCL on GPU), restarting failed workers."""
    from workers.pretrain import ray_train_loop

    settings = config.pretrain
    run_trainer(ray_train_loop, job.model_dump(mode="json"), stage, settings.num_workers, settings.use_gpu,
                settings.cpus_per_worker, settings.placement_strategy, settings.max_failures)


def run_trainer(loop: Any, loop_config: dict[str, Any], stage: StageDir, workers: int, use_gpu: bool, cpus: int,
                placement: str, max_failures: int) -> None:
    """`TorchTrainer(loop).fit()` with the run's storage under the stage and `max_failures` restarts."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus},
                                     placement_strategy=placement),
        run_config=TrainRunConfig(name=stage.name, storage_path=str(stage.path / "ray-train"),
                                  failure_config=FailureConfig(max_failures=max_failures)),
    ).fit()


@task(name="export-hf", cache_policy=NO_CACHE)
def export_task(checkpoint: str, tokenizer_dir: str, out_dir: str) -> str:
    """The final checkpoint as a Hugging Face Llama model directory."""
    from workers.export import export_hf

    return str(export_hf(Path(checkpoint), Path(tokenizer_dir), Path(out_dir)))


def steady_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over the rows after the first fifth (warm-up steps left out of throughput figures)."""
    steady = rows[len(rows) // 5:] or rows
    return sum(r[key] for r in steady) / len(steady)


def pretrain_stats(stage: StageDir, model: ModelConfig, index: dict[str, Any]) -> dict[str, Any]:
    """Training totals: windows, checkpoints, parameters, steps, tokens, losses, throughput, memory."""
    rows = read_metrics(stage.path / METRICS_FILE)
    last = rows[-1]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    return {
        "train_windows": index["splits"]["train"]["windows"],
        "checkpoints": len(complete_checkpoints(stage.path / CHECKPOINTS_DIR)),
        "parameters": parameter_count(model)["total"], "steps": last["step"], "tokens": last["tokens"],
        "final_loss": round(last["loss"], 4),
        "final_val_loss": round(val_rows[-1]["val_loss"], 4) if val_rows else None,
        "unigram_val_loss": round(index["unigram_val_loss"], 4),
        "tokens_per_s": round(steady_mean(rows, "tokens_per_s"), 1),
        "peak_memory_mb": round(max(r["peak_memory_mb"] for r in rows), 1),
        "resumed_from_steps": [record["from_step"] for record in read_resumes(stage.path)],
        **({"mfu": round(steady_mean(rows, "mfu"), 4)} if "mfu" in last else {}),
    }


PRETRAIN = PretrainStage()
pretrain_flow = stage_flow(PRETRAIN)
