"""The `pretrain` Prefect flow: FSDP2 training on Ray Train's TorchTrainer, checkpoint events, HF export.

Output `<run_dir>/pretrain-<hash>/`: `checkpoints/step-*/` (DCP), `metrics.jsonl`, `loss.png`, `hf/` (the
exported Llama-format model) and the manifest. The hash covers the model, optimisation and data (not the
worker count or checkpoint cadence), so a rerun of an unfinished stage resumes from its latest checkpoint,
and Ray Train's `FailureConfig(max_failures)` restarts failed workers from it within a run.

While training runs the flow watches `checkpoints/` and emits a Prefect event `forgeline.checkpoint.saved`
per checkpoint (resource `forgeline.checkpoint.<stage>.<step>`), which automations can use to trigger
evaluation.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from dataprep.curves import loss_curve_png, read_metrics
from dataprep.packing import read_index
from dataprep.stage import StageDir, package_version, stage_hash
from flows.common import (
    FAULT_ENV,
    complete_upstream,
    completed_stage_result,
    connect_ray,
    publish_artifact,
    stage_manifest,
)
from flows.config import PretrainConfig, RunConfig
from workers.checkpoint import complete_checkpoints, latest_checkpoint, read_journal, read_state
from workers.model import ModelConfig, model_config, parameter_count
from workers.pretrain import CHECKPOINTS_DIR, METRICS_FILE, TrainSpec
from workers.tokenize import TOKENIZER_DIR, TOKENS_DIR

STAGE = "pretrain"
CODE_VERSION = "pretrain-1"
OPERATIONAL = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every", "keep_last",
               "log_every", "checkpoint_initial")
HF_DIR = "hf"
LOSS_PNG = "loss.png"
CHECKPOINT_EVENT = "forgeline.checkpoint.saved"


def resolved_model(config: PretrainConfig, vocab_size: int) -> ModelConfig:
    overrides = config.model.model_dump(exclude={"preset"})
    return model_config(config.model.preset, **{**overrides, "vocab_size": vocab_size})


def train_spec(config: RunConfig, tokenize_path: Path, stage_path: Path) -> TrainSpec:
    """The worker-side spec; fails here (before Ray) on a shape/context/data mismatch."""
    settings = config.pretrain
    index = read_index(tokenize_path / TOKENS_DIR)
    model = resolved_model(settings, index["vocab_size"])
    if index["seq_len"] > model.max_seq_len:
        raise ValueError(f"tokenize.seq_len {index['seq_len']} is larger than the model's context "
                         f"(pretrain.model.max_seq_len {model.max_seq_len})")
    if index["splits"]["train"]["windows"] == 0:
        raise ValueError(f"{tokenize_path}: no training windows (corpus shorter than seq_len + 1 tokens)")
    precision = settings.precision if settings.precision != "auto" else ("bf16" if settings.use_gpu else "fp32")
    fault = os.environ.get(FAULT_ENV, "")
    fault_step = int(fault.split(":")[1]) if fault.startswith(f"{STAGE}:") else None
    return TrainSpec(
        model=model.to_dict(), data_dir=str(tokenize_path / TOKENS_DIR), out_dir=str(stage_path),
        steps=settings.steps, micro_batch=settings.micro_batch, grad_accum=settings.grad_accum, lr=settings.lr,
        min_lr=settings.min_lr, warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay,
        betas=settings.betas, grad_clip=settings.grad_clip, seed=settings.seed, precision=precision,
        activation_checkpointing=settings.activation_checkpointing, compile=settings.compile,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_initial=settings.checkpoint_initial, keep_last=settings.keep_last, eval_every=settings.eval_every,
        eval_windows=settings.eval_windows, log_every=settings.log_every, threads=settings.cpus_per_worker,
        use_gpu=settings.use_gpu, fault_step=fault_step,
    )


def check_resume(stage_path: Path, model: ModelConfig) -> None:
    """A checkpoint in the stage from a different model shape is an error before any worker starts."""
    from workers.checkpoint import check_compatible

    latest = latest_checkpoint(stage_path / CHECKPOINTS_DIR)
    if latest is not None:
        check_compatible(latest, model.to_dict())


def pretrain_params(config: RunConfig, spec: TrainSpec) -> dict[str, Any]:
    return {"model": spec.model, **config.pretrain.model_dump(mode="json", exclude={"model", *OPERATIONAL})}


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


def fit(config: RunConfig, spec: TrainSpec, stage: StageDir) -> None:
    """Ray Train's TorchTrainer over `spec` (gloo on CPU, NCCL on GPU), restarting failed workers."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from workers.pretrain import ray_train_loop

    settings = config.pretrain
    trainer = TorchTrainer(
        ray_train_loop, train_loop_config=spec.to_dict(),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker={"CPU": settings.cpus_per_worker}),
        run_config=TrainRunConfig(name=stage.name, storage_path=str(stage.path / "ray-train"),
                                  failure_config=FailureConfig(max_failures=settings.max_failures)),
    )
    trainer.fit()


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: RunConfig, spec: TrainSpec, stage_path: str) -> None:
    """Run the trainer; meanwhile announce each new checkpoint as a Prefect event."""
    get_run_logger().info("Ray: %s", connect_ray(config))
    stage, seen = StageDir(Path(stage_path)), set()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(fit, config, spec, stage)
        while not running.done():
            emit_checkpoint_events(stage, seen)
            time.sleep(1.0)
        running.result()
    emit_checkpoint_events(stage, seen)


@task(name="export-hf", cache_policy=NO_CACHE)
def export_task(checkpoint: str, tokenizer_dir: str, out_dir: str) -> str:
    from workers.export import export_hf

    return str(export_hf(Path(checkpoint), Path(tokenizer_dir), Path(out_dir)))


def pretrain_stats(stage: StageDir, spec: TrainSpec, index: dict[str, Any]) -> dict[str, Any]:
    rows = read_metrics(stage.path / METRICS_FILE)
    last = rows[-1]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    counts = parameter_count(ModelConfig(**spec.model))
    steady = rows[len(rows) // 5:] or rows  # skip warm-up steps in the throughput figure
    return {
        "records_in": index["splits"]["train"]["windows"], "records_out": len(complete_checkpoints(
            stage.path / CHECKPOINTS_DIR)), "dropped": {},
        "parameters": counts["total"], "steps": last["step"], "tokens": last["tokens"],
        "final_loss": round(last["loss"], 4),
        "final_val_loss": round(val_rows[-1]["val_loss"], 4) if val_rows else None,
        "unigram_val_loss": round(index["unigram_val_loss"], 4),
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in steady) / len(steady), 1),
        "peak_memory_mb": round(max(r["peak_memory_mb"] for r in rows), 1),
        **({"mfu": round(sum(r["mfu"] for r in steady) / len(steady), 4)} if "mfu" in last else {}),
    }


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: RunConfig, tokenize_path: str) -> dict[str, Any]:
    """Train the model on a complete tokenize stage into `<run_dir>/pretrain-<hash>/` (resuming if started)."""
    started = time.time()
    upstream = complete_upstream(tokenize_path, STAGE)
    probe = train_spec(config, upstream.path, Path("."))
    code = f"{package_version()}/{CODE_VERSION}"
    stage = StageDir.for_stage(config.run_dir, STAGE,
                               stage_hash(STAGE, pretrain_params(config, probe), [upstream.name], code))
    if (done := completed_stage_result(stage)) is not None:
        return done
    spec = replace(probe, out_dir=str(stage.path))
    check_resume(stage.path, ModelConfig(**spec.model))
    stage.prepare()
    train_task.with_options(retries=config.orchestration.task_retries,
                            retry_delay_seconds=config.orchestration.retry_delay_seconds)(config, spec,
                                                                                          str(stage.path))
    latest = latest_checkpoint(stage.path / CHECKPOINTS_DIR)
    if latest is None or read_state(latest)["step"] != spec.steps:
        raise RuntimeError(f"pretrain: training ended without a final checkpoint in {stage.path}")
    export_task(str(latest), str(upstream.path / TOKENIZER_DIR), str(stage.path / HF_DIR))
    index = read_index(upstream.path / TOKENS_DIR)
    stats = pretrain_stats(stage, spec, index)
    loss_curve_png(read_metrics(stage.path / METRICS_FILE), stage.path / LOSS_PNG, f"pretrain: {config.name}",
                   index["unigram_val_loss"])
    outputs = {"checkpoints": {"path": CHECKPOINTS_DIR, "latest": latest.name}, "metrics": METRICS_FILE,
               "loss_curve": LOSS_PNG, "hf": HF_DIR}
    manifest = stage_manifest(stage, STAGE, code, pretrain_params(config, spec), upstream, outputs, stats, started)
    stage.publish(manifest)
    publish_artifact(manifest)
    get_run_logger().info("pretrain: %s: val loss %s vs unigram %s", stage.path, stats["final_val_loss"],
                          stats["unigram_val_loss"])
    return {"path": str(stage.path), "skipped": False, "stats": stats}
