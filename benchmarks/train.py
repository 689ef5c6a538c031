"""Benchmark: our training loop (FSDP2, one process) vs a plain single-process PyTorch loop, same model and data.

Both run in fresh subprocesses with the same torch thread count, the same model (initialised from the same
seed), the same AdamW/clipping/schedule and the same batches (`BatchPlan`). Reported: median tokens/s over the
timed steps (after warm-up) for each, our overhead (1 - ours / plain), the largest per-step loss difference
between the two, and the planner's memory estimate for this shape next to the measured peak RSS growth of
the plain loop (peak RSS minus RSS before the model was built).

    .venv/bin/python benchmarks/train.py [--steps 40] [--threads 2] [--preset small --seq-len 256]

On a GPU machine add `--gpu --precision bf16 --preset 125m --seq-len 1024 --micro-batch 16` to get tokens/s
and MFU of our loop on one device. Last line: {"benchmark": "train", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dataprep.tokenize.packing import SplitPacker, token_dtype, write_index  # noqa: E402


def make_data(directory: Path, vocab: int, seq_len: int, windows: int) -> None:
    """Random tokens packed like the tokenize stage's output (throughput does not depend on the text)."""
    rng = np.random.default_rng(0)
    index = {"seq_len": seq_len, "vocab_size": vocab, "eot_id": 0, "splits": {}, "unigram_val_loss": float("nan")}
    for split, count in (("train", windows), ("val", 8)):
        packer = SplitPacker(directory, split, seq_len, token_dtype(vocab), windows_per_shard=1024)
        packer.add(rng.integers(1, vocab, size=count * (seq_len + 1)).astype(token_dtype(vocab)))
        index["splits"][split] = packer.finish()
    write_index(directory, index)


def spec_for(args: argparse.Namespace, data: Path, out: Path):
    from workers.model_config import model_config
    from workers.train_config import PretrainConfig, TrainJob

    model = model_config(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 64))
    settings = PretrainConfig(steps=args.steps, micro_batch=args.micro_batch, lr=1e-3, min_lr=1e-4, warmup_steps=5,
                              seed=0, precision=args.precision, checkpoint_every=10**9, eval_every=10**9,
                              eval_windows=1, log_every=10**9, cpus_per_worker=args.threads, use_gpu=args.gpu)
    return TrainJob(config=settings, model=model.to_dict(), data_dir=str(data), out_dir=str(out))


def run_ours(args: argparse.Namespace, data: Path, out: Path) -> dict:
    from workers.pretrain import train

    spec = spec_for(args, data, out)
    train(spec)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [r["step_seconds"] for r in rows], "losses": [r["loss"] for r in rows],
            "mfu": [r.get("mfu") for r in rows], "tokens_per_step": rows[0]["tokens"]}


def run_plain(args: argparse.Namespace, data: Path) -> dict:
    """The baseline: nn.Module + AdamW + clip, no process group, no wrapping."""
    import torch

    from dataprep.tokenize.packing import TokenWindows
    from workers.model import Transformer
    from workers.model_config import ModelConfig
    from workers.pretrain import BatchPlan, lr_factor

    spec = spec_for(args, data, Path("."))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    windows = TokenWindows(data, "train")
    plan = BatchPlan(len(windows), spec.config.micro_batch, spec.config.seed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = Transformer(ModelConfig(**spec.model))
    model.init_weights(spec.config.seed)
    model.to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.config.weight_decay},
                                   {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=spec.config.lr, betas=spec.config.betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, spec))
    seconds, losses = [], []
    for step in range(spec.config.steps):
        tick = time.time()
        batch = torch.from_numpy(windows.batch(plan.step_positions(step))).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.config.resolved_precision() == "bf16"):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss))
        seconds.append(time.time() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_seconds": seconds, "losses": losses, "rss_growth": peak - rss_before,
            "tokens_per_step": spec.config.micro_batch * args.seq_len}


def subprocess_result(args: argparse.Namespace, role: str, data: Path, out: Path) -> dict:
    passed = {k: v for k, v in vars(args).items() if k not in ("role", "data", "out", "gpu")}
    command = [sys.executable, __file__, "--role", role, "--data", str(data), "--out", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in passed.items()]]
    if args.gpu:
        command.append("--gpu")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each loop; best median kept")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--role", default="driver")
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.role == "ours":
        print(json.dumps(run_ours(args, Path(args.data), Path(args.out))))
        return
    if args.role == "plain":
        print(json.dumps(run_plain(args, Path(args.data))))
        return
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "tokens"
        data.mkdir()
        make_data(data, args.vocab, args.seq_len, args.steps * args.micro_batch + 64)
        runs: dict[str, list[dict]] = {"ours": [], "plain": []}
        for attempt in range(args.repeat):
            for role in ("plain", "ours"):
                runs[role].append(subprocess_result(args, role, data, Path(work) / f"{role}-{attempt}"))
    speed = {}
    for role, results in runs.items():
        speed[role] = max(results[0]["tokens_per_step"] / statistics.median(r["step_seconds"][args.warmup:])
                          for r in results)
        print(f"{role:6s} {speed[role]:>10,.0f} tokens/s (median step after {args.warmup} warm-up steps, "
              f"best of {args.repeat})")
    loss_gap = max(abs(a - b) for a, b in zip(runs["ours"][0]["losses"], runs["plain"][0]["losses"], strict=True))
    from workers.model_config import model_config, parameter_count
    from workers.planner import PlanInputs, plan

    config = model_config(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 64))
    estimate = plan(PlanInputs(replace(config), gpus=1, dtype=args.precision, micro_batch=args.micro_batch,
                               seq_len=args.seq_len, gpu="H100"))["memory_per_gpu"]["replicated"]["total"]
    measured = runs["plain"][0]["rss_growth"]
    print(f"loss difference ours vs plain, max over {args.steps} steps: {loss_gap:.2e}")
    print(f"planner estimate {estimate / 2**20:,.0f} MiB vs measured peak RSS growth {measured / 2**20:,.0f} MiB")
    mfu = [m for m in runs["ours"][0]["mfu"][args.warmup:] if m is not None]
    metrics = {
        "preset": args.preset, "parameters": parameter_count(config)["total"], "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "threads": args.threads, "device": "cuda" if args.gpu else "cpu",
        "ours_tokens_per_s": round(speed["ours"], 1), "plain_tokens_per_s": round(speed["plain"], 1),
        "overhead": round(1 - speed["ours"] / speed["plain"], 4), "max_loss_difference": loss_gap,
        "planner_estimate_mib": round(estimate / 2**20, 1), "measured_rss_growth_mib": round(measured / 2**20, 1),
        **({"mfu": round(statistics.median(mfu), 4)} if mfu else {}),
    }
    print(json.dumps({"benchmark": "train", "metrics": metrics}))


if __name__ == "__main__":
    main()
