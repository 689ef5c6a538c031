"""The pretraining loop: one function that runs the same under `torchrun` and under Ray Train's TorchTrainer.

- Process group: Ray Train sets it up (gloo on CPU, NCCL on GPU); under `torchrun` (`python -m
  workers.pretrain SPEC.json`) it is initialised from the environment; a plain single process gets a
  one-rank gloo group, so FSDP2 is always on.
- Model: built and initialised on CPU from the seed (identical at any world size), `fully_shard` per block
  and at the root, with `MixedPrecisionPolicy(bf16 params, fp32 reduce)` when `precision` is bf16 (GPU).
  Optional activation checkpointing and `torch.compile` per block.
- Data: the packed windows of `dataprep.tokenize.packing`; the global batch of step `s` is a fixed slice of seeded
  per-epoch permutations, so the data position is the step itself and any world size sees the same batches.
- AdamW (weight decay on matrices only), linear warm-up + cosine decay, gradient clipping, accumulation
  (gradient sync only on the last micro-batch).
- Checkpoints (`workers.checkpoint`) every `checkpoint_every` steps and at the end; a run resumes from its
  latest complete checkpoint, restoring RNG states, so a killed run continues bit-identically on CPU.
- Metrics (rank 0): `metrics.jsonl` with loss, lr, grad norm, tokens/s, MFU (GPU only), peak memory, and
  periodic held-out loss; a progress line with an ETA.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dataprep.shards import atomic_write_bytes
from dataprep.stage import CHECKPOINTS_DIR
from dataprep.tokenize.packing import TokenWindows, read_index
from workers.checkpoint import check_compatible, latest_checkpoint, load_checkpoint, save_checkpoint
from workers.model import Transformer
from workers.model_config import PEAK_BF16_FLOPS, ModelConfig, flops_per_token, parameter_count
from workers.train_config import TrainJob

METRICS_FILE = "metrics.jsonl"


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device


def setup_distributed(job: TrainJob) -> Context:
    """Use the process group Ray Train or torchrun made, or a one-rank gloo group for a plain process."""
    return init_distributed(job.config.use_gpu, job.config.cpus_per_worker)


def init_distributed(use_gpu: bool, cpus_per_worker: int) -> Context:
    """The process group (Ray Train's, torchrun's or a one-rank gloo group) and this rank's device."""
    use_cuda = use_gpu and torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpus_per_worker)
    return Context(dist.get_rank(), dist.get_world_size(), device)


def build_model(config: ModelConfig, job: TrainJob, device: torch.device) -> Transformer:
    """Initialise on CPU from the seed, move, then shard each block and the root with FSDP2."""
    model = Transformer(config)
    model.init_weights(job.config.seed)
    model.activation_checkpointing = job.config.activation_checkpointing
    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if job.config.resolved_precision() == "bf16" else MixedPrecisionPolicy()
    for block in model.model.layers:
        if job.config.compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def build_optimizer(model: torch.nn.Module, job: TrainJob) -> tuple[torch.optim.Optimizer, Any]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": job.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=job.config.lr, betas=job.config.betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, job))
    return optimizer, scheduler


def lr_factor(step: int, job: TrainJob) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    settings = job.config
    return warmup_cosine(step, settings.warmup_steps, settings.steps, settings.min_lr / settings.lr)


def warmup_cosine(step: int, warmup: int, steps: int, floor: float) -> float:
    """The LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `floor` at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class BatchPlan:
    """Window positions of every step: consecutive slices of seeded per-epoch permutations."""

    def __init__(self, windows: int, global_batch: int, seed: int) -> None:
        if windows == 0:
            raise ValueError("no training windows: the corpus is shorter than one window (seq_len + 1 tokens)")
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self._epochs: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs = {epoch: torch.randperm(self.windows, generator=generator).numpy()}
        return self._epochs[epoch]

    def step_positions(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._permutation(int(i // self.windows))[int(i % self.windows)] for i in flat])

    def rank_micro_batches(self, step: int, rank: int, world: int, micro: int, accum: int) -> list[np.ndarray]:
        positions = self.step_positions(step)
        return [positions[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accum)]


def _tensors(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(windows).to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def evaluate(model: Transformer, val: TokenWindows, count: int, ctx: Context, micro: int) -> float:
    """Mean held-out cross-entropy over the first `count` windows (every rank runs the same number of batches)."""
    if len(val) == 0:
        return math.nan
    positions = np.arange(min(count, len(val)))[ctx.rank::ctx.world]
    per_rank = math.ceil(min(count, len(val)) / ctx.world)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro):
            chunk = positions[start:start + micro]
            weight = 1.0 if len(chunk) else 0.0
            chunk = chunk if len(chunk) else np.array([0])  # collectives need the same calls on every rank
            inputs, targets = _tensors(val.batch(chunk), ctx.device)
            loss = model(inputs, targets)
            totals += torch.tensor([loss.item() * len(chunk) * weight, len(chunk) * weight],
                                   dtype=torch.float64, device=ctx.device)
    model.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _progress(step: int, total: int, started: float, first: int) -> str:
    done = (step - first) / max(1, total - first)
    bar = "#" * int(20 * step / total) + "." * (20 - int(20 * step / total))
    elapsed = time.time() - started
    eta = elapsed / done * (1 - done) if done > 0 else 0.0
    return f"[{bar}] {step}/{total} eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume: drop metric lines past the checkpoint, so the file reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


def say(line: str) -> None:
    """One console line from rank 0. Written to stdout directly: Ray Train replaces `print` in its workers with a
    logger call that also tees to Ray's wrapped stdout, which showed every progress line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


RESUMES_FILE = "resumes.jsonl"


def record_resume(out: Path, step: int, checkpoint: Path) -> None:
    """One line per (re)start that resumed from a checkpoint: the evidence that recovery ran, and from where."""
    with open(out / RESUMES_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"from_step": step, "checkpoint": checkpoint.name, "time": round(time.time(), 3)})
                     + "\n")


def read_resumes(out: Path) -> list[dict[str, Any]]:
    """The resume records of a pretrain output directory (empty for a run that never restarted)."""
    path = Path(out) / RESUMES_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _validate(job: TrainJob, config: ModelConfig) -> dict[str, Any]:
    index = read_index(Path(job.data_dir))
    if index["seq_len"] > config.max_seq_len:
        raise ValueError(f"packed seq_len {index['seq_len']} exceeds the model's context model.max_seq_len "
                         f"{config.max_seq_len}")
    if index["vocab_size"] > config.vocab_size:
        raise ValueError(f"tokenizer vocabulary {index['vocab_size']} exceeds model.vocab_size {config.vocab_size}")
    return index


def _fault(job: TrainJob, step: int, ctx: Context) -> None:
    kill_at_fault_step(job.fault_step, Path(job.out_dir), step, ctx)


def kill_at_fault_step(fault_step: int | None, out_dir: Path, step: int, ctx: Context) -> None:
    """Failure drill: the last rank SIGKILLs itself once, after finishing `fault_step` (marker in `out_dir`)."""
    if fault_step != step or ctx.rank != ctx.world - 1:
        return
    marker = out_dir / f".fault-step-{step}"
    if marker.exists():
        return
    marker.write_text("fired\n")
    os.kill(os.getpid(), signal.SIGKILL)


def train(job: TrainJob, report: Reporter | None = None) -> dict[str, Any]:
    """Run (or resume) training to `job.config.steps`; returns the last metrics on rank 0."""
    ctx = setup_distributed(job)
    config = ModelConfig(**job.model)
    index = _validate(job, config)
    out = Path(job.out_dir)
    ckpt_root = out / CHECKPOINTS_DIR
    train_data, val_data = TokenWindows(Path(job.data_dir), "train"), TokenWindows(Path(job.data_dir), "val")
    seq_len = int(index["seq_len"])
    plan = BatchPlan(len(train_data), job.config.micro_batch * job.config.grad_accum * ctx.world, job.config.seed)
    model = build_model(config, job, ctx.device)
    optimizer, scheduler = build_optimizer(model, job)
    start = 0
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is not None:
        check_compatible(resume_from, config.to_dict())
        state = load_checkpoint(resume_from, model, optimizer, restore_rng=True)
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        if start == 0:
            optimizer.state.clear()  # the step-0 checkpoint holds the zero-lr initialisation state (see below)
    metrics_path = out / METRICS_FILE
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        keep_metrics_until(metrics_path, start)
        if resume_from is not None:
            record_resume(out, start, resume_from)
        counts = parameter_count(config)
        say(f"model: {counts['total']:,} parameters ({counts['non_embedding']:,} in matmuls); world {ctx.world} "
             f"on {ctx.device.type}; {'resuming from ' + str(resume_from) if resume_from else 'from scratch'}")
    tokens_per_step = plan.global_batch * seq_len

    def checkpoint(step: int, metrics: dict[str, Any]) -> None:
        save_checkpoint(ckpt_root, step, model, optimizer,
                        {"scheduler": scheduler.state_dict(), "data_position": step, "model": config.to_dict(),
                         "world_size": ctx.world, "seed": job.config.seed, "spec": job.model_dump(mode="json"),
                         "metrics": metrics},
                        job.config.keep_last)

    if start == 0 and job.config.checkpoint_initial:
        checkpoint(0, {"step": 0, "tokens": 0})
        # DCP's get_state_dict initialises AdamW's state with a zero-lr step (step count 1); drop it so the
        # run is the same with or without this checkpoint.
        optimizer.state.clear()
    flops = flops_per_token(config, seq_len)
    peak = peak_flops(ctx.device, job.config.resolved_precision())
    autocast_dtype = torch.bfloat16 if job.config.resolved_precision() == "bf16" else None
    started, last = time.time(), {}
    for step in range(start, job.config.steps):
        tick = time.time()
        micro_batches = plan.rank_micro_batches(step, ctx.rank, ctx.world, job.config.micro_batch,
                                                job.config.grad_accum)
        loss_sum = torch.zeros((), device=ctx.device)
        for m, positions in enumerate(micro_batches):
            model.set_requires_gradient_sync(m == len(micro_batches) - 1)  # type: ignore[operator]  # FSDP2 method
            inputs, targets = _tensors(train_data.batch(positions), ctx.device)
            with torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(inputs, targets)
            (loss / job.config.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), job.config.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_sum /= ctx.world
        done = step + 1
        seconds = time.time() - tick
        row: dict[str, Any] = {
            "step": done, "loss": float(loss_sum) / job.config.grad_accum, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
            "step_seconds": seconds, "peak_memory_mb": peak_memory_bytes(ctx.device) / 2**20,
        }
        if peak is not None:
            row["mfu"] = flops * tokens_per_step / ctx.world / seconds / peak
        if done % job.config.eval_every == 0 or done == job.config.steps:
            row["val_loss"] = evaluate(model, val_data, job.config.eval_windows, ctx, job.config.micro_batch)
        checkpointing = done % job.config.checkpoint_every == 0 or done == job.config.steps
        if checkpointing:
            checkpoint(done, row)
        if ctx.rank == 0:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            if done % job.config.log_every == 0 or done == job.config.steps or "val_loss" in row:
                val = f" val {row['val_loss']:.4f}" if "val_loss" in row else ""
                say(f"{_progress(done, job.config.steps, started, start)} loss {row['loss']:.4f}{val} lr {lr:.2e} "
                     f"{row['tokens_per_s']:,.0f} tok/s")
        if report is not None and ("val_loss" in row or checkpointing):
            report(row)
        last = row
        _fault(job, done, ctx)
    return last


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for `ray.train.torch.TorchTrainer`: reports metrics at evals/checkpoints."""
    import ray.train

    train(TrainJob.model_validate(config), report=lambda metrics: ray.train.report(metrics))


def main(argv: list[str] | None = None) -> None:
    """torchrun entry: `torchrun --nproc-per-node N -m workers.pretrain SPEC.json`."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m workers.pretrain SPEC.json")
    train(TrainJob.model_validate_json(Path(args[0]).read_text()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
