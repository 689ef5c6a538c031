"""`forgeline plan`: memory per GPU, compute-optimal tokens and training time for a model shape.

Memory per device (bytes):
- model states, mixed-precision AdamW: fp32 weights 4, fp32 gradients 4, Adam moments 8 per parameter
  (the usual 16 bytes); FSDP divides all three by the number of GPUs. With bf16 FSDP2 also holds the
  all-gathered bf16 copy of about two blocks at a time (the one computing and the one prefetched).
- activations kept for backward, per token and layer (with SDPA/flash attention, so no T×T scores):
  8·dim + 3·kv_dim + 4·ffn values (norm inputs/outputs, q/k/v before and after RoPE, attention output,
  residual, SwiGLU gate/up/silu/product), each 2 bytes in bf16 or 4 in fp32 (norms are saved in fp32);
  with activation checkpointing only each block's input (dim) plus one block's full set are kept;
  plus the logits: tokens × vocab × (dtype + 4 + 4) bytes (the logits, their fp32 copy for the loss, its grad).
Compute: training FLOPs = 6·N·D (+ attention 12·layers·dim·seq per token), Chinchilla D = 20·N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.model_config import PEAK_BF16_FLOPS, ModelConfig, flops_per_token, parameter_count

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# Dense fp32 (TF32 tensor core) peaks for fp32 planning.
PEAK_TF32_FLOPS = {"H200": 494.7e12, "H100": 494.7e12, "A100": 156e12, "L40S": 183e12, "L4": 60e12,
                   "A10G": 35e12, "A10": 62.5e12, "V100": 15.7e12}


@dataclass(frozen=True)
class PlanInputs:
    config: ModelConfig
    gpus: int = 8
    dtype: str = "bf16"
    micro_batch: int = 8
    seq_len: int | None = None
    activation_checkpointing: bool = False
    gpu: str = "H100"
    mfu: float = 0.4
    tokens: float | None = None  # default: Chinchilla-optimal


def activation_bytes(config: ModelConfig, tokens: int, dtype: str, checkpointing: bool) -> dict[str, int]:
    """Activations kept for backward on one device for `tokens` = micro_batch × seq_len."""
    width = DTYPE_BYTES[dtype]
    kv_dim = config.n_kv_heads * config.head_dim
    per_layer_values = 8 * config.dim + 3 * kv_dim + 4 * config.ffn_dim
    per_layer = tokens * per_layer_values * width
    blocks = (tokens * config.dim * width * config.n_layers + per_layer) if checkpointing \
        else per_layer * config.n_layers
    logits = tokens * config.vocab_size * (width + 4 + 4)
    return {"blocks": blocks, "logits": logits, "total": blocks + logits}


def model_state_bytes(config: ModelConfig, gpus: int, dtype: str, sharded: bool) -> dict[str, int]:
    params = parameter_count(config)["total"]
    shards = gpus if sharded else 1
    states = {"weights": 4 * params // shards, "gradients": 4 * params // shards, "adam": 8 * params // shards}
    if dtype == "bf16":
        block = parameter_count(config)["non_embedding"] // max(1, config.n_layers)
        states["bf16_gathered"] = 2 * 2 * block if sharded else 2 * params
    return states


def plan(inputs: PlanInputs) -> dict[str, Any]:
    """Every figure `forgeline plan` prints, as a dict."""
    config = inputs.config
    seq_len = inputs.seq_len or config.max_seq_len
    counts = parameter_count(config)
    tokens_per_step = inputs.micro_batch * seq_len
    activations = activation_bytes(config, tokens_per_step, inputs.dtype, inputs.activation_checkpointing)
    memory = {}
    for label, sharded in (("fsdp", True), ("replicated", False)):
        states = model_state_bytes(config, inputs.gpus, inputs.dtype, sharded)
        memory[label] = {**states, "activations": activations["total"],
                         "total": sum(states.values()) + activations["total"]}
    train_tokens = inputs.tokens or 20 * counts["total"]
    flops_6nd = 6 * counts["total"] * train_tokens
    flops_total = flops_per_token(config, seq_len) * train_tokens
    table = PEAK_BF16_FLOPS if inputs.dtype == "bf16" else PEAK_TF32_FLOPS
    peak = table.get(inputs.gpu)
    if peak is None:
        raise ValueError(f"gpu {inputs.gpu!r}: choose one of {', '.join(table)}")
    seconds = flops_total / (inputs.gpus * peak * inputs.mfu)
    return {"parameters": counts, "seq_len": seq_len, "micro_batch": inputs.micro_batch, "gpus": inputs.gpus,
            "dtype": inputs.dtype, "activations": activations, "memory_per_gpu": memory,
            "chinchilla_tokens": 20 * counts["total"], "train_tokens": train_tokens, "flops_6nd": flops_6nd,
            "flops_with_attention": flops_total, "gpu": inputs.gpu, "peak_flops": peak, "mfu": inputs.mfu,
            "hours": seconds / 3600}


def format_plan(result: dict[str, Any]) -> str:
    """A human-readable table of a plan."""
    counts, memory = result["parameters"], result["memory_per_gpu"]
    rows = ["weights", "gradients", "adam", "bf16_gathered", "activations", "total"]
    lines = [
        f"parameters: {counts['total'] / 1e6:,.1f} M ({counts['non_embedding'] / 1e6:,.1f} M in matmuls); "
        f"seq_len {result['seq_len']}, micro-batch {result['micro_batch']}, {result['gpus']} × {result['gpu']} "
        f"({result['dtype']})",
        "",
        f"{'memory per GPU (GiB)':<22}{'FSDP (sharded)':>16}{'no sharding':>14}",
    ]
    for row in rows:
        if row in memory["fsdp"]:
            lines.append(f"{row:<22}{memory['fsdp'][row] / GIB:>16.2f}{memory['replicated'][row] / GIB:>14.2f}")
    lines += [
        "",
        f"Chinchilla-optimal tokens (20 per parameter): {result['chinchilla_tokens'] / 1e9:,.2f} B",
        f"training tokens: {result['train_tokens'] / 1e9:,.2f} B; 6·N·D = {result['flops_6nd']:.3e} FLOPs "
        f"({result['flops_with_attention']:.3e} with attention)",
        f"time at {result['mfu']:.0%} MFU of {result['peak_flops'] / 1e12:,.0f} TFLOP/s per GPU: "
        f"{result['hours']:,.2f} h on {result['gpus']} GPUs",
    ]
    return "\n".join(lines)


LORA_SHAPES = {  # (in, out) of each Llama linear a LoRA may target, from the model shape
    "q_proj": lambda c: (c.dim, c.n_heads * c.head_dim), "k_proj": lambda c: (c.dim, c.n_kv_heads * c.head_dim),
    "v_proj": lambda c: (c.dim, c.n_kv_heads * c.head_dim), "o_proj": lambda c: (c.n_heads * c.head_dim, c.dim),
    "gate_proj": lambda c: (c.dim, c.ffn_dim), "up_proj": lambda c: (c.dim, c.ffn_dim),
    "down_proj": lambda c: (c.ffn_dim, c.dim),
}


def lora_parameters(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: rank·(in + out) per targeted linear per layer."""
    per_layer = sum(rank * sum(LORA_SHAPES[name](config)) for name in targets)
    return per_layer * config.n_layers


def finetune_state_bytes(config: ModelConfig, method: str, rank: int = 16,
                         targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> dict[str, int]:
    """fp32 training state on one device (no sharding): weights (frozen base + trainable), gradients and AdamW's
    two moments, for the trainable parameters only. LoRA's optimizer + gradient memory is 12 bytes per adapter
    parameter against 12 per model parameter for full finetuning."""
    total = parameter_count(config)["total"]
    trainable = total if method == "full" else lora_parameters(config, rank, targets)
    weights = 4 * total + (0 if method == "full" else 4 * trainable)
    return {"trainable_parameters": trainable, "weights": weights, "gradients": 4 * trainable,
            "adam": 8 * trainable, "optimizer_and_gradients": 12 * trainable}
