"""The finetune stage's config: instruction data, LoRA (or full) settings and the training loop's knobs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dataprep.stage import ConfigLocation, StageConfig

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINETUNE_OPERATIONAL_FIELDS = ("adapter_name", "num_workers", "cpus_per_worker", "use_gpu", "max_failures",
                               "checkpoint_every", "keep_last", "log_every")


class LoraSettings(StageConfig):
    """PEFT's LoraConfig fields we expose (Llama module names)."""

    rank: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @model_validator(mode="after")
    def _known_modules(self) -> LoraSettings:
        unknown = sorted(set(self.target_modules) - set(LLAMA_LINEARS))
        if unknown or not self.target_modules:
            raise ValueError(f"lora.target_modules: unknown {unknown}; choose from {', '.join(LLAMA_LINEARS)}")
        return self


class FinetuneConfig(StageConfig):
    """Instruction tuning of the pretrained model with LoRA (or full finetuning), on Ray Train with FSDP2."""

    data: ConfigLocation | None = Field(None, description="instruction JSONL (path or fsspec URL); null = no stage")
    eval_data: ConfigLocation | None = Field(None, description="held-out JSONL; null = a holdout of `data`")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="fraction of `data` held out when eval_data is null")
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    checkpoint: int | None = Field(None, ge=0, description="pretrain step to start from (null: the latest)")
    seq_len: int | None = Field(None, ge=8, description="packed row length (default: the model's context)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="examples longer than seq_len")
    steps: int = Field(200, ge=1)
    micro_batch: int = Field(8, ge=1, description="packed rows per worker per step")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(10, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    merge: bool = Field(False, description="also write a merged HF model (adapter folded into the weights)")
    eval_answers: int = Field(64, ge=0, description="held-out answers generated for exact match / chrF")
    max_new_tokens: int = Field(32, ge=1)
    # operational: not part of the stage hash
    adapter_name: str = Field("instruct", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                              description="the model name `forgeline serve` gives the adapter")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        return self

    @property
    def enabled(self) -> bool:
        return self.data is not None


class FinetuneJob(StageConfig):
    """What every training worker receives: the config plus what the flow resolved."""

    config: FinetuneConfig
    model: dict[str, Any] = Field(description="the base model's ModelConfig as a dict")
    base_checkpoint: str
    data_dir: str = Field(description="the packed rows (train.npz, val.npz)")
    out_dir: str
    fault_step: int | None = None
