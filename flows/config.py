"""Typed run configuration loaded from YAML; every error names the file and the field.

Relative paths in a config file (run_dir, local inputs) are resolved against the directory that holds the
file, so a config runs the same from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dataprep.filtering import RULE_PARAMS, Step


class ConfigError(ValueError):
    """A configuration problem, with the file and field it concerns in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(_Strict):
    """How to reach Ray: a local single-node instance (address null) or an existing cluster."""

    address: str | None = Field(None, description="null = start Ray locally; 'auto' or 'ray://host:10001'")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for local Ray (default: all)")
    object_store_memory_mb: int | None = Field(None, ge=64)
    dashboard: bool = Field(False, description="start the Ray dashboard on 127.0.0.1:dashboard_port")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    temp_dir: Path | None = Field(None, description="Ray session files (default <run_dir>/ray)")
    task_max_retries: int = Field(3, ge=0, description="Ray retries of a task whose worker died")


class OrchestrationConfig(_Strict):
    """Prefect-side behaviour; not part of any stage hash."""

    task_retries: int = Field(1, ge=0, description="Prefect retries of a failed stage task (resumes)")
    retry_delay_seconds: float = Field(2.0, ge=0)


class FieldsConfig(_Strict):
    """Field names in JSONL / Parquet inputs."""

    text: str = "text"
    id: str = "id"
    url: str = "url"
    date: str = "date"


class IngestConfig(_Strict):
    """The ingest stage: crawl files → documents."""

    inputs: list[str] = Field(..., min_length=1, description="paths, globs or fsspec URLs")
    format: Literal["auto", "warc", "wet", "jsonl", "parquet"] = "auto"
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    max_payload_bytes: int = Field(10_000_000, ge=1)
    min_text_chars: int = Field(1, ge=0)
    max_invalid_fraction: float = Field(0.01, ge=0.0, le=1.0)
    shard_max_records: int = Field(2000, ge=1)
    shard_max_bytes: int = Field(64_000_000, ge=1)
    fields: FieldsConfig = FieldsConfig()


class DedupConfig(_Strict):
    """The dedup stage: exact, URL and MinHash-LSH near-duplicate removal."""

    exact: bool = Field(True, description="drop documents whose normalised text is identical")
    url: bool = Field(True, description="drop re-captures of the same normalised URL")
    fuzzy: bool = Field(True, description="MinHash-LSH near-duplicates")
    threshold: float = Field(0.7, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets")
    num_perm: int = Field(128, ge=8, le=1024)
    seed: int = Field(1, ge=0)
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(5, ge=1, description="words (or characters) per shingle")
    shingle_hash: Literal["xxh32-words", "xxh32", "sha1"] = "xxh32-words"
    false_positive_weight: float = Field(0.2, ge=0.0, le=1.0, description="LSH tuning; verification removes FPs")
    false_negative_weight: float = Field(0.8, ge=0.0, le=1.0, description="LSH tuning: favour recall")
    bands: int | None = Field(None, ge=1, description="override datasketch's optimal bands")
    rows: int | None = Field(None, ge=1, description="override datasketch's optimal rows per band")
    verify: bool = Field(True, description="keep a fuzzy edge only if exact Jaccard >= threshold")
    num_actors: int = Field(2, ge=1, description="LSH bucket actors (each holds 1/N of the keys)")
    keep: Literal["earliest_crawl", "longest_text", "lowest_id"] = "earliest_crawl"


RuleName = Literal["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity",
                   "quality"]


class FilterStepConfig(_Strict):
    """One step of the filter chain: a rule, drop or annotate, and the rule's typed thresholds."""

    rule: RuleName
    name: str | None = Field(None, description="unique step name (default: the rule); names removed/<name>/")
    mode: Literal["drop", "annotate"] = "drop"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_params(self) -> FilterStepConfig:
        try:
            RULE_PARAMS[self.rule].model_validate(self.params)
        except ValidationError as error:
            problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ValueError(f"rule {self.rule!r}: {problems}") from None
        return self

    def step(self) -> Step:
        return Step(self.name or self.rule, self.rule, self.mode, RULE_PARAMS[self.rule].model_validate(self.params))


DEFAULT_FILTER_STEPS = tuple(FilterStepConfig(rule=rule) for rule in (  # type: ignore[arg-type]
    "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity"))


class TrainQualityConfig(_Strict):
    """Train the fastText quality classifier before filtering (GPT-3 / DCLM style)."""

    positives: list[str] = Field(..., min_length=1, description="JSONL(.gz) or Parquet files with a text field")
    negatives: list[str] | None = Field(None, description="default: the filter stage's own input documents")
    output: Path = Field(..., description="where the model goes (an existing file is reused; delete it to retrain)")
    positive_label: str = "hq"
    negative_label: str = "cc"
    max_examples: int = Field(20_000, ge=10, description="per class")
    holdout: float = Field(0.2, gt=0.0, lt=1.0)
    epoch: int = Field(25, ge=1)
    lr: float = Field(1.0, gt=0.0)
    word_ngrams: int = Field(2, ge=1)
    seed: int = 0


class FilterConfig(_Strict):
    """The filter stage: an ordered chain of steps over the dedup output."""

    steps: list[FilterStepConfig] = Field(default_factory=lambda: list(DEFAULT_FILTER_STEPS), min_length=1)
    num_actors: int = Field(2, ge=1, description="filter actors (each loads the models once)")
    train_quality: TrainQualityConfig | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> FilterConfig:
        names = [step.name or step.rule for step in self.steps]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"step names must be unique; repeated: {duplicates} (set `name:` on one of them)")
        return self


class TokenizeConfig(_Strict):
    """The tokenize stage: train (or load) a byte-level BPE, pack fixed windows with end-of-text separators."""

    tokenizer: Path | None = Field(None, description="an existing tokenizer.json (or its directory); null = train")
    vocab_size: int = Field(8192, ge=257, le=2**31, description="BPE vocabulary incl. 256 bytes + end-of-text")
    min_frequency: int = Field(2, ge=1)
    eot_token: str = Field("<|endoftext|>", min_length=1)
    seq_len: int = Field(256, ge=2, description="tokens per training window (windows hold seq_len + 1)")
    holdout: float = Field(0.02, gt=0.0, lt=0.5, description="fraction of documents held out (by doc id hash)")
    windows_per_shard: int = Field(4096, ge=1)


class ModelSection(_Strict):
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
        from workers.model import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class PretrainConfig(_Strict):
    """The pretrain stage: FSDP2 training on Ray Train with sharded checkpoints and exact resume."""

    model: ModelSection = ModelSection()
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


class EvaluateConfig(_Strict):
    """The evaluate stage: held-out perplexity plus YAML-defined few-shot and generation tasks per checkpoint."""

    tasks: list[Path] = Field(default_factory=list, description="task YAML files (see dataprep/eval_tasks.py)")
    max_windows: int = Field(256, ge=1, description="held-out windows for perplexity")
    batch: int = Field(8, ge=1)
    use_gpu: bool = Field(False, description="one GPU per checkpoint evaluation")
    watch_interval: float = Field(5.0, gt=0, description="seconds between polls with --watch")


class RunConfig(_Strict):
    """A whole pipeline run."""

    name: str = Field("forgeline", min_length=1)
    run_dir: Path
    ray: RayConfig = RayConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    ingest: IngestConfig
    dedup: DedupConfig = DedupConfig()
    filter: FilterConfig = FilterConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("use letters, digits, '-', '_' or '.' only")
        return value


STAGES: tuple[str, ...] = ("ingest", "dedup", "filter", "tokenize", "pretrain", "evaluate")


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(base: Path, value: str) -> str:
    if _is_url(value):
        return value
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else str((base / expanded).resolve())


def _resolve_filter_paths(base: Path, section: Any) -> Any:
    """Model, blocklist and training paths in `filter:` resolve against the config's directory."""
    if not isinstance(section, dict):
        return section if section is not None else {}
    section = dict(section)
    steps = section.get("steps")
    if isinstance(steps, list):
        resolved = []
        for step in steps:
            params = step.get("params") if isinstance(step, dict) else None
            if isinstance(params, dict):
                params = {k: _resolve(base, v) if k in ("model", "path") and isinstance(v, str) else v
                          for k, v in params.items()}
                step = {**step, "params": params}
            resolved.append(step)
        section["steps"] = resolved
    training = section.get("train_quality")
    if isinstance(training, dict):
        training = dict(training)
        for key in ("positives", "negatives"):
            if isinstance(training.get(key), list):
                training[key] = [_resolve(base, str(p)) for p in training[key]]
        if isinstance(training.get("output"), str):
            training["output"] = _resolve(base, training["output"])
        section["train_quality"] = training
    return section


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a mapping as a RunConfig; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    base = base_dir or Path.cwd()
    data = dict(data)
    if isinstance(data.get("run_dir"), str):
        data["run_dir"] = _resolve(base, data["run_dir"])
    ingest = data.get("ingest")
    if isinstance(ingest, dict) and isinstance(ingest.get("inputs"), list):
        data["ingest"] = {**ingest, "inputs": [_resolve(base, str(p)) for p in ingest["inputs"]]}
    data["filter"] = _resolve_filter_paths(base, data.get("filter"))
    tokenize = data.get("tokenize")
    if isinstance(tokenize, dict) and isinstance(tokenize.get("tokenizer"), str):
        data["tokenize"] = {**tokenize, "tokenizer": _resolve(base, tokenize["tokenizer"])}
    evaluate = data.get("evaluate")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("tasks"), list):
        data["evaluate"] = {**evaluate, "tasks": [_resolve(base, str(t)) for t in evaluate["tasks"]]}
    ray = data.get("ray")
    if isinstance(ray, dict) and isinstance(ray.get("temp_dir"), str):
        data["ray"] = {**ray, "temp_dir": _resolve(base, ray["temp_dir"])}
    try:
        return RunConfig.model_validate(data)
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
