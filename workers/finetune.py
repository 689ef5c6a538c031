"""The finetuning loop (LoRA with `peft`, or full finetuning) on the pretraining path: Ray Train's process
group, FSDP2 per block, DCP checkpoints with exact resume; plus the adapter export.

- Model: the pretrain checkpoint loaded on every rank, wrapped by `peft.get_peft_model` (LoRA: only the adapter
  matrices require grad) or left fully trainable, then `fully_shard` per block and at the root.
- Data: packed rows (`dataprep.finetune.examples.pack`) with example numbers, so attention stays inside an
  example; the loss is token-weighted over answer tokens across all ranks (each rank's sum divided by the
  global count of answer tokens), so the world size does not change the objective.
- Checkpoints (`workers.checkpoint`): a LoRA run saves only the trainable parameters and their optimizer state;
  a rerun resumes from the latest one, RNG included (the same rows, dropout masks and losses).
- Export (driver side, one process): `peft`'s `save_pretrained` (`adapter_config.json` +
  `adapter_model.safetensors`) with `base_model_name_or_path` pointing at the exported base and
  `forgeline_adapter.json` recording the base weights' digest; optionally a merged HF model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

from dataprep.finetune.examples import IGNORE, PackedRows
from dataprep.shards import atomic_write_json
from dataprep.stage import CHECKPOINTS_DIR
from workers.checkpoint import check_compatible, latest_checkpoint, load_checkpoint, load_full_model, save_checkpoint
from workers.finetune_config import FinetuneConfig, FinetuneJob, LoraSettings
from workers.model import Transformer
from workers.model_config import ModelConfig
from workers.pretrain import (
    BatchPlan,
    Context,
    Reporter,
    init_distributed,
    keep_metrics_until,
    kill_at_fault_step,
    peak_memory_bytes,
    record_resume,
    say,
    warmup_cosine,
)

METRICS_FILE = "metrics.jsonl"
ADAPTER_INFO = "forgeline_adapter.json"


def save_rows(path: Path, rows: PackedRows) -> None:
    np.savez(path, tokens=rows.tokens, targets=rows.targets, segments=rows.segments)


def load_rows(path: Path) -> PackedRows:
    with np.load(path) as data:
        return PackedRows(data["tokens"], data["targets"], data["segments"])


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none")


def base_model(job: FinetuneJob) -> Transformer:
    """The pretrained model the run starts from (full weights, one process's copy)."""
    return load_full_model(Path(job.base_checkpoint), Transformer(ModelConfig(**job.model)))


def trainable_model(config: FinetuneConfig, base: Transformer, seed: int) -> nn.Module:
    """LoRA: the base wrapped by peft (adapters initialised from `seed`, base frozen); full: the base itself."""
    if config.method == "full":
        return base
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, lora_config(config.lora))


def inner_transformer(model: nn.Module) -> Transformer:
    """Our Transformer inside a peft wrapper (or the model itself)."""
    while not isinstance(model, Transformer):
        model = model.base_model.model if hasattr(model, "base_model") else model.model  # type: ignore[assignment,union-attr]
    return model


def build(job: FinetuneJob, device: torch.device) -> nn.Module:
    model = trainable_model(job.config, base_model(job), job.config.seed).to(device)
    transformer = inner_transformer(model)
    for block in transformer.model.layers:
        fully_shard(block)
    fully_shard(transformer)
    return model


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Parameters that train and in total (the local, unsharded model)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "parameters": total}


def batch_tensors(rows: PackedRows, positions: np.ndarray, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(part[positions]).to(device) for part in  # type: ignore[return-value]
                 (rows.tokens, rows.targets, rows.segments))


def summed_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor
                ) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over answer tokens, and how many there were."""
    logits = model(tokens, segments=segments)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def held_out_loss(model: nn.Module, rows: PackedRows, micro: int, ctx: Context) -> float:
    """Mean cross-entropy per answer token over every held-out row (ranks split the rows, same call count)."""
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    per_rank = math.ceil(len(rows) / ctx.world)
    mine = np.arange(len(rows))[ctx.rank::ctx.world]
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro):
            chunk = mine[start:start + micro]
            weight = 1.0 if len(chunk) else 0.0
            chunk = chunk if len(chunk) else np.array([0])
            loss, count = summed_loss(model, *batch_tensors(rows, chunk, ctx.device))
            totals += torch.tensor([float(loss) * weight, count * weight], dtype=torch.float64, device=ctx.device)
    model.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def _optimizer(model: nn.Module, config: FinetuneConfig) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    floor = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.warmup_steps, config.steps, floor))
    return optimizer, scheduler


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _resume(job: FinetuneJob, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """The step to start from: the latest finetune checkpoint's (model, optimizer, RNG restored), else 0."""
    latest = latest_checkpoint(Path(job.out_dir) / CHECKPOINTS_DIR)
    if latest is None:
        return 0
    check_compatible(latest, job.model)
    state = load_checkpoint(latest, model, optimizer, restore_rng=True, trainable_only=job.config.method == "lora")
    scheduler.load_state_dict(state["scheduler"])
    if dist.get_rank() == 0:
        keep_metrics_until(Path(job.out_dir) / METRICS_FILE, state["step"])
        record_resume(Path(job.out_dir), state["step"], latest)
    return int(state["step"])


def train(job: FinetuneJob, report: Reporter | None = None) -> dict[str, Any]:
    """Finetune (or resume) to `job.config.steps`; returns the last metrics row."""
    settings = job.config
    ctx = init_distributed(settings.use_gpu, settings.cpus_per_worker)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = load_rows(Path(job.data_dir) / "train.npz"), load_rows(Path(job.data_dir) / "val.npz")
    plan = BatchPlan(len(train_rows), settings.micro_batch * ctx.world, settings.seed)
    model = build(job, ctx.device)
    counts = trainable_counts(model)
    optimizer, scheduler = _optimizer(model, settings)
    start = _resume(job, model, optimizer, scheduler)
    lora = settings.method == "lora"

    def checkpoint(step: int, row: dict[str, Any]) -> None:
        save_checkpoint(out / CHECKPOINTS_DIR, step, model, optimizer,
                        {"scheduler": scheduler.state_dict(), "data_position": step, "model": job.model,
                         "method": settings.method, "spec": job.model_dump(mode="json"), "metrics": row},
                        settings.keep_last, trainable_only=lora)

    last: dict[str, Any] = {}
    for step in range(start, settings.steps):
        tick = time.time()
        positions = plan.rank_micro_batches(step, ctx.rank, ctx.world, settings.micro_batch, 1)[0]
        tokens, targets, segments = batch_tensors(train_rows, positions, ctx.device)
        answer_tokens = torch.tensor([float((targets != IGNORE).sum())], device=ctx.device)
        dist.all_reduce(answer_tokens)
        loss_sum, _ = summed_loss(model, tokens, targets, segments)
        # FSDP averages gradients over ranks: scale so the result is the global per-token mean
        (loss_sum * ctx.world / answer_tokens.clamp(min=1)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], settings.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        reduced = loss_sum.detach().reshape(1)
        dist.all_reduce(reduced)
        done, seconds = step + 1, time.time() - tick
        row: dict[str, Any] = {"step": done, "loss": float(reduced / answer_tokens.clamp(min=1)), "lr": lr,
                               "grad_norm": float(grad_norm), "answer_tokens": int(answer_tokens),
                               "tokens_per_s": tokens.numel() * ctx.world / seconds, "step_seconds": seconds,
                               "peak_memory_mb": peak_memory_bytes(ctx.device) / 2**20, **counts}
        saving = done % settings.checkpoint_every == 0 or done == settings.steps
        if saving:
            row["val_loss"] = held_out_loss(model, val_rows, settings.micro_batch, ctx)
            checkpoint(done, row)
        if ctx.rank == 0:
            _append(out / METRICS_FILE, row)
            if done % settings.log_every == 0 or saving:
                val = f" val {row['val_loss']:.4f}" if "val_loss" in row else ""
                say(f"finetune {done}/{settings.steps} loss {row['loss']:.4f}{val} lr {lr:.2e}")
        if report is not None and saving:
            report(row)
        last = row
        kill_at_fault_step(job.fault_step, out, done, ctx)
    return last


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    import ray.train

    train(FinetuneJob.model_validate(config), report=lambda metrics: ray.train.report(metrics))


# ---- export (driver side, one process)

def tuned_model(job: FinetuneJob, checkpoint: Path) -> nn.Module:
    """The base with the finetune checkpoint applied: a peft model (LoRA) or the finetuned Transformer."""
    model = trainable_model(job.config, base_model(job), job.config.seed)
    return load_full_model(checkpoint, model, trainable_only=job.config.method == "lora").eval()


def export_adapter(job: FinetuneJob, checkpoint: Path, base_dir: Path, base_digest: str, out_dir: Path) -> Path:
    """The LoRA adapter in PEFT's format, loadable with `PeftModel.from_pretrained(<base_dir model>, out_dir)`."""
    model = tuned_model(job, checkpoint)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))  # type: ignore[operator]
    config_path = tmp / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config.pop("auto_mapping", None)  # our training class; the adapter targets LlamaForCausalLM
    adapter_config.update({"base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM",
                           "inference_mode": True})
    atomic_write_json(config_path, adapter_config)
    atomic_write_json(tmp / ADAPTER_INFO, {"base_weights_digest": base_digest, "base_model": str(base_dir),
                                           "model": job.model, "checkpoint": checkpoint.name,
                                           "lora": job.config.lora.model_dump(mode="json")})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def merged_transformer(job: FinetuneJob, checkpoint: Path) -> Transformer:
    """The tuned model as one plain Transformer (LoRA folded into the weights)."""
    model = tuned_model(job, checkpoint)
    if job.config.method == "lora":
        model = model.merge_and_unload()  # type: ignore[operator]
    return inner_transformer(model)
