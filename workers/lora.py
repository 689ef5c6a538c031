"""LoRA adapters for inference: a PEFT adapter directory read into the decoder's fused layout, applied per token.

`LoraWeights.load(dir, config)` reads `adapter_config.json` and `adapter_model.safetensors` (PEFT's format,
Llama module names) and builds, per layer, one low-rank pair (A, B) per fused decoder matrix: q/k/v share one
pair (A stacked, B block-diagonal), gate/up another, o and down one each; the scale (alpha / r, or alpha / sqrt(r)
with rsLoRA) is folded into B. `apply` adds `B (A x)` to the base product for the tokens of one adapter, so a
batch can mix requests for the base model and several adapters (as vLLM's multi-LoRA batching does): the base
matmul runs once for every token, then two thin matmuls per adapter present in the step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workers.model_config import ModelConfig

SUPPORTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "forgeline_adapter.json"


class AdapterError(ValueError):
    """An adapter that cannot be applied to this base model (format, shape or base-model mismatch)."""


@dataclass
class LowRank:
    a: torch.Tensor  # (rank, in)
    b: torch.Tensor  # (out, rank), scale folded in

    def __post_init__(self) -> None:
        self.b_t = self.b.t().contiguous()  # (rank, out): the right operand of addmm

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + B A x in two kernels (the add fused into the second product)."""
        return torch.addmm(out, F.linear(x, self.a), self.b_t)


@dataclass
class LoraWeights:
    """One adapter in the decoder's layout: per layer, a LowRank for each fused matrix it changes."""

    name: str
    layers: list[dict[str, LowRank]] = field(default_factory=list)
    rank: int = 0
    base_digest: str | None = None

    @classmethod
    def load(cls, name: str, directory: Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
             device: torch.device | None = None) -> LoraWeights:
        from safetensors.torch import load_file

        directory = Path(directory)
        settings = _adapter_config(directory)
        rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
        scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
        info_path = directory / ADAPTER_INFO
        digest = json.loads(info_path.read_text()).get("base_weights_digest") if info_path.is_file() else None
        adapter = cls(name, [], rank, digest)
        for layer in range(config.n_layers):
            pairs = {module: _pair(tensors, layer, module, scale) for module in SUPPORTED}
            adapter.layers.append(_fused(pairs, config, dtype, device))
        used = sum(len(_present(tensors, layer)) for layer in range(config.n_layers))
        if used != len(tensors) or used == 0:
            unused = sorted(set(tensors) - {k for layer in range(config.n_layers) for k in _present(tensors, layer)})
            raise AdapterError(f"adapter {name!r}: {len(unused)} tensors this base model has no place for "
                               f"(another layer count or module?): {unused[:3]}")
        return adapter


def _adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{directory}: not a PEFT adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    settings: dict[str, Any] = json.loads(path.read_text())
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{directory}: peft_type {settings.get('peft_type')!r}; only LORA adapters are served")
    if settings.get("use_dora") or settings.get("bias", "none") != "none" or settings.get("modules_to_save"):
        raise AdapterError(f"{directory}: DoRA, LoRA biases and modules_to_save are not supported by the server")
    return settings


def _stem(layer: int, module: str) -> str:
    part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{module}"


def _present(tensors: dict[str, torch.Tensor], layer: int) -> list[str]:
    """The A and B keys of a layer's modules that have both."""
    keys = []
    for module in SUPPORTED:
        pair = [f"{_stem(layer, module)}.lora_A.weight", f"{_stem(layer, module)}.lora_B.weight"]
        if all(key in tensors for key in pair):
            keys += pair
    return keys


def _pair(tensors: dict[str, torch.Tensor], layer: int, module: str, scale: float) -> LowRank | None:
    stem = _stem(layer, module)
    a, b = tensors.get(f"{stem}.lora_A.weight"), tensors.get(f"{stem}.lora_B.weight")
    if a is None or b is None:
        return None
    return LowRank(a.float(), b.float() * scale)


def _fused(pairs: dict[str, LowRank | None], config: ModelConfig, dtype: torch.dtype,
           device: torch.device | None) -> dict[str, LowRank]:
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    groups = {"qkv": [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)], "o": [("o_proj", config.dim)],
              "gate_up": [("gate_proj", config.ffn_dim), ("up_proj", config.ffn_dim)],
              "down": [("down_proj", config.dim)]}
    inputs = {"qkv": config.dim, "o": q_dim, "gate_up": config.dim, "down": config.ffn_dim}
    fused: dict[str, LowRank] = {}
    for target, members in groups.items():
        present = [(module, rows, pair) for module, rows in members if (pair := pairs[module]) is not None]
        if not present:
            continue
        total_rows, ranks = sum(rows for _, rows in members), sum(int(pair.a.shape[0]) for _, _, pair in present)
        a = torch.zeros(ranks, inputs[target])
        b = torch.zeros(total_rows, ranks)
        row_start = {module: sum(r for m, r in members[:i]) for i, (module, _) in enumerate(members)}
        column = 0
        for module, rows, pair in present:
            if pair.a.shape[1] != inputs[target] or pair.b.shape[0] != rows:
                raise AdapterError(f"{module}: adapter shape A {tuple(pair.a.shape)} B {tuple(pair.b.shape)} does "
                                   f"not fit the base model ({inputs[target]} in, {rows} out)")
            rank = pair.a.shape[0]
            a[column:column + rank] = pair.a
            b[row_start[module]:row_start[module] + rows, column:column + rank] = pair.b
            column += rank
        fused[target] = LowRank(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return fused


TokenGroups = list[tuple[LoraWeights, torch.Tensor | None]]
"""The adapters of one step and the flat token positions each applies to (None: every token)."""


def token_groups(per_token: list[LoraWeights | None], device: torch.device) -> TokenGroups:
    """Group a step's tokens by adapter (base tokens, None, need nothing)."""
    present = {id(a): a for a in per_token if a is not None}
    if not present:
        return []
    if len(present) == 1 and all(a is not None for a in per_token):
        return [(next(iter(present.values())), None)]
    return [(adapter, torch.tensor([i for i, a in enumerate(per_token) if a is adapter], device=device))
            for adapter in present.values()]


def apply(out: torch.Tensor, x: torch.Tensor, layer: int, target: str, groups: TokenGroups) -> torch.Tensor:
    """`out` (N, out) plus each adapter's low-rank update for its tokens of `x` (N, in)."""
    for adapter, index in groups:
        pair = adapter.layers[layer].get(target)
        if pair is None:
            continue
        out = pair.add_to(out, x) if index is None else out.index_add(0, index, pair.delta(x.index_select(0, index)))
    return out
