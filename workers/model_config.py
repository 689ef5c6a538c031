"""Model shapes without torch: `ModelConfig` (the architecture), presets, the config section that picks one, and
the parameter and FLOP counts the planner and the training loop share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import Field, field_validator, model_validator

from dataprep.stage import StageConfig


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. `vocab_size` comes from the tokenizer at training time."""

    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim {self.dim} is not divisible by model.n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads {self.n_heads} is not divisible by model.n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("model head dimension (dim / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Presets: `tiny` trains on 2 CPU cores in minutes; the rest follow GPT-3/Llama shapes (SwiGLU width ≈ 8/3·dim).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256),
    "small": ModelConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512),
    "125m": ModelConfig(vocab_size=50_304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                        max_seq_len=1024, tie_embeddings=True),  # GPT-2 small's size (llm.c's MFU reference)
    "350m": ModelConfig(vocab_size=50_304, dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816,
                        max_seq_len=2048),
    "760m": ModelConfig(vocab_size=50_304, dim=1536, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=4096,
                        max_seq_len=2048),
    "1b": ModelConfig(vocab_size=50_304, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      max_seq_len=2048, rope_theta=500_000.0, tie_embeddings=True),
    # Llama-2-7B's shape (multi-head attention) with our 50k vocabulary: for planning
    "7b": ModelConfig(vocab_size=50_304, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11_008,
                      max_seq_len=4096, rope_theta=500_000.0),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset with fields replaced (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


class ModelChoice(StageConfig):
    """A preset (tiny, small, 125m, 350m, 760m, 1b) with optional overrides; vocab comes from the tokenizer."""

    preset: str = "tiny"
    dim: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=8)
    max_seq_len: int | None = Field(None, ge=2)
    rope_theta: float | None = Field(None, gt=0)
    tie_embeddings: bool | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _consistent_shape(self) -> ModelChoice:
        self.resolve(None)  # dim / heads / kv heads that do not divide fail here, not at pretrain
        return self

    def resolve(self, vocab_size: int | None) -> ModelConfig:
        """The concrete architecture: the preset with these overrides and the tokenizer's vocabulary."""
        overrides = self.model_dump(exclude={"preset"})
        return model_config(self.preset, **{**overrides, "vocab_size": vocab_size})


# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets); MFU is not reported for other devices.
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "A10": 125e12, "V100": 125e12}


def parameter_count(config: ModelConfig) -> dict[str, int]:
    """Total parameters, and the non-embedding part used in 6·N FLOPs (input embedding excluded)."""
    attn = config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    mlp = 3 * config.dim * config.ffn_dim
    per_layer = attn + mlp + 2 * config.dim
    embedding = config.vocab_size * config.dim
    head = 0 if config.tie_embeddings else config.vocab_size * config.dim
    total = embedding + head + config.n_layers * per_layer + config.dim
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding + (embedding if
            config.tie_embeddings else 0)}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (matmuls, forward + backward) + 12·layers·dim·seq_len (attention scores)."""
    return 6 * parameter_count(config)["non_embedding"] + 12 * config.n_layers * config.dim * seq_len
