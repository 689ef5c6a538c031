"""Benchmark: LoRA against full finetuning (same model, same data), and serving with an adapter against the base.

1. Memory and speed at the 125m shape (GPT-2 small's size, random weights: neither depends on the values): each
   method in a fresh process runs `--steps` training steps of our finetune objective (packed rows, answer-only
   loss, AdamW on the trainable parameters) after one warm-up step. Measured: trainable parameters, the bytes
   the gradients and AdamW's moments actually hold after a step (summed over tensors), peak RSS, tokens/s. The
   planner's prediction (`workers.planner.finetune_state_bytes`) is printed beside each. Rounds alternate the
   methods; headline: median with min-max over `--repeat` rounds.
2. Quality on the demo run (`make demo` first): the real training loop (`workers.finetune.train`, one process)
   from the demo's pretrained model on the demo's instruction rows, LoRA and full, `--quality-steps` steps each;
   held-out answer loss of base, LoRA and full.
3. Serving: the demo model in one engine with the demo adapter loaded; greedy generation at 1 and 16 concurrent
   requests for the base and for the adapter, interleaved rounds after a warm-up each; tokens/s.

    .venv/bin/python benchmarks/finetune.py [--repeat 3] [--steps 4] [--run-dir runs/demo]

Last line: {"benchmark": "finetune", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._record import interleaved, per_second, record, spread  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One method's steps in this process: state bytes, peak RSS, tokens/s per timed step."""
    import torch

    from workers.finetune import summed_loss, trainable_model
    from workers.finetune_config import FinetuneConfig
    from workers.model import Transformer
    from workers.model_config import model_config

    torch.set_num_threads(args.threads)
    before = rss_mb()
    config = model_config(args.preset, max_seq_len=args.seq_len)
    base = Transformer(config)
    base.init_weights(0)
    settings = FinetuneConfig(method=method, lora={"rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0,
                                                   "target_modules": TARGETS})
    model = trainable_model(settings, base, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len), generator=generator)
    targets = tokens.roll(-1, dims=1)
    segments = torch.zeros_like(tokens)
    rates = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        loss, count = summed_loss(model, tokens, targets, segments)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, as they are during a step
        if step > 0:
            rates.append(tokens.numel() / (time.perf_counter() - started))
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    adam_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    return {"trainable_parameters": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in model.parameters()), "gradient_bytes": gradient_bytes,
            "adam_bytes": adam_bytes, "optimizer_and_gradients_bytes": gradient_bytes + adam_bytes,
            "peak_rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - before,
            "tokens_per_s": sorted(rates)[len(rates) // 2]}


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    from workers.model_config import model_config
    from workers.planner import finetune_state_bytes

    rounds: dict[str, list[dict[str, Any]]] = {"lora": [], "full": []}
    for number in range(args.repeat):
        for method in ("lora", "full"):
            done = subprocess.run([sys.executable, __file__, "--worker", method, "--preset", args.preset,
                                   "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                                   "--steps", str(args.steps), "--rank", str(args.rank), "--threads",
                                   str(args.threads)], capture_output=True, text=True, check=True)
            rounds[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {number + 1} {method}: {json.dumps(rounds[method][-1])}", flush=True)
    config = model_config(args.preset, max_seq_len=args.seq_len)
    result: dict[str, Any] = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                              "rank": args.rank, "targets": list(TARGETS)}
    for method, runs in rounds.items():
        first = runs[0]
        predicted = finetune_state_bytes(config, method, args.rank, TARGETS)
        result[method] = {
            "trainable_parameters": first["trainable_parameters"], "parameters": first["parameters"],
            "trainable_fraction": round(first["trainable_parameters"] / first["parameters"], 5),
            "optimizer_and_gradients_mb": round(first["optimizer_and_gradients_bytes"] / 2**20, 1),
            "predicted_optimizer_and_gradients_mb": round(predicted["optimizer_and_gradients"] / 2**20, 1),
            "predicted_weights_mb": round(predicted["weights"] / 2**20, 1),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]),
            "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
        }
    result["lora_state_share_of_full"] = round(result["lora"]["optimizer_and_gradients_mb"]
                                               / result["full"]["optimizer_and_gradients_mb"], 4)
    return result


def demo_job(run_dir: Path) -> Any:
    from workers.checkpoint import complete_checkpoints, read_state
    from workers.finetune_config import FinetuneJob

    stages = sorted(run_dir.glob("finetune-*/_SUCCESS"), key=lambda p: p.stat().st_mtime)
    if not stages:
        raise SystemExit(f"no complete finetune stage in {run_dir}: run `make demo` first")
    final = complete_checkpoints(stages[-1].parent / "checkpoints")[-1]
    return FinetuneJob.model_validate(read_state(final)["spec"]), stages[-1].parent


def quality_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from workers.finetune import train

    job, _ = demo_job(Path(args.run_dir))
    lr = args.full_lr if method == "full" else job.config.lr
    settings = job.config.model_copy(update={"method": method, "steps": args.quality_steps, "lr": lr,
                                             "min_lr": lr / 10, "checkpoint_every": args.quality_steps,
                                             "log_every": 10**9})
    with tempfile.TemporaryDirectory() as out:
        last = train(job.model_copy(update={"config": settings, "out_dir": out, "fault_step": None}))
    return {"val_loss": last["val_loss"], "tokens_per_s": last["tokens_per_s"], "lr": lr}


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    _, stage = demo_job(Path(args.run_dir))
    base = next(r for r in json.loads((stage / "comparison.json").read_text()) if r["model"] == "base")
    result: dict[str, Any] = {"steps": args.quality_steps, "base_held_out_loss": round(base["held_out_loss"], 4)}
    for method in ("lora", "full"):
        done = subprocess.run([sys.executable, __file__, "--quality-worker", method, "--run-dir", args.run_dir,
                               "--quality-steps", str(args.quality_steps), "--full-lr", str(args.full_lr)],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        result[method] = {"held_out_loss": round(row["val_loss"], 4), "lr": row["lr"]}
    return result


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from serving.engine import Engine
    from serving.sampling import SamplingParams

    torch.set_num_threads(1)
    _, stage = demo_job(Path(args.run_dir))
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    engine = Engine.load(Path(adapter_config["base_model_name_or_path"]), max_batch=64, prefix_cache_mb=0)
    engine.add_adapter("instruct", stage / "adapter")
    prompt = engine.encode("The for statement is used to iterate over the elements of a sequence.")
    new_tokens = 32

    def generate(adapter: str | None, clients: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, adapter=adapter)
        requests = [engine.submit(prompt, params) for _ in range(clients)]
        engine.run_until_idle()
        assert all(len(r.output_ids) == new_tokens for r in requests)

    result: dict[str, Any] = {"new_tokens": new_tokens, "threads": 1}
    for clients in (1, 16):
        runs = {name: per_second(clients * new_tokens, lambda a=adapter, c=clients: generate(a, c))
                for name, adapter in (("base", None), ("adapter", "instruct"))}
        rates = interleaved(runs, args.repeat)
        result[f"clients_{clients}"] = {name: spread(values) for name, values in rates.items()}
        result[f"clients_{clients}"]["adapter_over_base"] = round(
            spread(rates["adapter"], 4)["median"] / spread(rates["base"], 4)["median"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--run-dir", default=str(Path(__file__).resolve().parents[1] / "runs" / "demo"))
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--full-lr", type=float, default=3e-4, help="full finetuning's lr (LoRA: the demo's)")
    parser.add_argument("--worker", choices=("lora", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--quality-worker", choices=("lora", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", default=[], choices=("memory", "quality", "serving"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args)))
        return
    if args.quality_worker:
        print(json.dumps(quality_worker(args.quality_worker, args)))
        return
    metrics: dict[str, Any] = {}
    for part, run in (("memory", run_memory), ("quality", run_quality), ("serving", run_serving)):
        if part not in args.skip:
            metrics[part] = run(args)
            print(f"{part}: {json.dumps(metrics[part])}", flush=True)
    record("finetune", metrics)


if __name__ == "__main__":
    main()
