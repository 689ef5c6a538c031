"""The run configuration: one typed section per stage, each defined beside the code it configures.

`RunConfig` composes them (`dataprep.ingest.IngestConfig`, `dataprep.dedup.DedupConfig`,
`dataprep.filter_config.FilterConfig`, `dataprep.tokenizer.TokenizeConfig`, `workers.train_config.PretrainConfig`,
`workers.finetune_config.FinetuneConfig`,
and here the orchestration, Ray and evaluation sections); the object the flow validates is the object the Ray
workers receive. Relative paths resolve against the config file's folder (a validator with the file's folder in
the validation context), so a config runs the same from any working directory. Every error names the file and
the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dataprep.dedup.documents import DedupConfig
from dataprep.filter.config import FilterConfig
from dataprep.ingest.documents import IngestConfig
from dataprep.rag.config import RagConfig
from dataprep.stage import ConfigPath, StageConfig
from dataprep.tokenize.tokenizer import TokenizeConfig
from workers.finetune_config import FinetuneConfig
from workers.train_config import PretrainConfig


class ConfigError(ValueError):
    """A configuration problem, with the file and field it concerns in the message."""




class RayConfig(StageConfig):
    """How to reach Ray: a local single-node instance (address null) or an existing cluster."""

    address: str | None = Field(None, description="null = start Ray locally; 'auto' or 'ray://host:10001'")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for local Ray (default: all)")
    object_store_memory_mb: int | None = Field(None, ge=64)
    dashboard: bool = Field(False, description="start the Ray dashboard on 127.0.0.1:dashboard_port")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    temp_dir: ConfigPath | None = Field(None, description="Ray session files (default <run_dir>/ray)")
    task_max_retries: int = Field(3, ge=0, description="Ray retries of a task whose worker died")


class OrchestrationConfig(StageConfig):
    """Prefect-side behaviour; not part of any stage hash."""

    task_retries: int = Field(1, ge=0, description="Prefect retries of a failed stage task (resumes)")
    retry_delay_seconds: float = Field(2.0, ge=0)


class EvaluateConfig(StageConfig):
    """The evaluate stage: held-out perplexity plus YAML-defined few-shot and generation tasks per checkpoint."""

    tasks: list[ConfigPath] = Field(default_factory=list, description="task YAML files (see dataprep/eval_tasks.py)")
    max_windows: int = Field(256, ge=1, description="held-out windows for perplexity")
    batch: int = Field(8, ge=1)
    use_gpu: bool = Field(False, description="one GPU per checkpoint evaluation")
    watch_interval: float = Field(5.0, gt=0, description="seconds between polls with --watch")


class RunConfig(StageConfig):
    """A whole pipeline run."""

    name: str = Field("forgeline", min_length=1)
    run_dir: ConfigPath
    ray: RayConfig = RayConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    ingest: IngestConfig
    dedup: DedupConfig = DedupConfig()
    filter: FilterConfig = FilterConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    rag: RagConfig = RagConfig()

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("use letters, digits, '-', '_' or '.' only")
        return value

    @model_validator(mode="after")
    def _context_fits(self) -> RunConfig:
        """A window longer than the model's context fails here, not after the earlier stages ran."""
        context = self.pretrain.model.resolve(None).max_seq_len
        if self.tokenize.seq_len > context:
            raise ValueError(f"tokenize.seq_len {self.tokenize.seq_len} is larger than the model's context "
                             f"(pretrain.model.max_seq_len {context})")
        return self


STAGES: tuple[str, ...] = ("ingest", "dedup", "filter", "tokenize", "pretrain", "evaluate", "finetune", "rag")


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a mapping as a RunConfig; relative paths resolve against `base_dir` (default: the cwd)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return RunConfig.model_validate(data, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file; fails with a message naming the file (and field)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, str(path), path.resolve().parent)
