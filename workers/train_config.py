"""The pretrain stage's config: what the flow validates is the object every training worker receives."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dataprep.stage import StageConfig
from workers.model_config import ModelChoice

OPERATIONAL_FIELDS = ("num_workers", "use_gpu", "cpus_per_worker", "placement_strategy", "max_failures",
                      "checkpoint_every", "keep_last", "log_every", "checkpoint_initial")


class PretrainConfig(StageConfig):
    """The pretrain stage: FSDP2 training on Ray Train with sharded checkpoints and exact resume."""

    model: ModelChoice = ModelChoice()
    steps: int = Field(300, ge=1)
    micro_batch: int = Field(8, ge=1, description="windows per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = Field(50, ge=1)
    eval_windows: int = Field(64, ge=1)
    # operational: not part of the stage hash (a run may resume with other values)
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU with use_gpu)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the training workers on nodes (SPREAD: one per node where possible)")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts from the latest checkpoint")
    checkpoint_every: int = Field(50, ge=1)
    checkpoint_initial: bool = Field(True, description="also save step 0 (the initialised model) for evaluation")
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 needs use_gpu: true (CPU training runs in fp32)")
        return self

    def resolved_precision(self) -> Literal["bf16", "fp32"]:
        """`auto` → bf16 on GPU, fp32 on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.use_gpu else "fp32"


class TrainJob(StageConfig):
    """One training run: the validated pretrain config plus what the flow resolved (model, paths, drill)."""

    config: PretrainConfig
    model: dict[str, Any] = Field(description="the resolved ModelConfig as a dict")
    data_dir: str
    out_dir: str
    fault_step: int | None = Field(None, description="failure drill: the last rank SIGKILLs itself after this step")
