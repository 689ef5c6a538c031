"""The filter stage's config: an ordered chain of typed rule steps, and the optional quality-model training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from dataprep.filter.chain import RULE_PARAMS, Step
from dataprep.stage import ConfigLocation, ConfigPath, StageConfig

RuleName = Literal["language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity",
                   "quality"]


class FilterStepConfig(StageConfig):
    """One step of the filter chain: a rule, drop or annotate, and the rule's typed thresholds."""

    rule: RuleName
    name: str | None = Field(None, description="unique step name (default: the rule); names removed/<name>/")
    mode: Literal["drop", "annotate"] = "drop"
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                   description="the rule's thresholds (defaults filled in)")

    @field_validator("params")
    @classmethod
    def _typed_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validate against the rule's typed parameters; keep every effective value (paths resolved)."""
        rule = info.data.get("rule")
        if rule is None:
            return params
        try:
            typed = RULE_PARAMS[rule].model_validate(params, context=info.context)
        except ValidationError as error:
            problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ValueError(f"rule {rule!r}: {problems}") from None
        return typed.model_dump(mode="json")

    def step(self) -> Step:
        return Step(self.name or self.rule, self.rule, self.mode, RULE_PARAMS[self.rule].model_validate(self.params))


DEFAULT_FILTER_STEPS = tuple(FilterStepConfig(rule=rule) for rule in (
    "language", "gopher_repetition", "gopher_quality", "c4", "fineweb", "blocklist", "toxicity"))


class TrainQualityConfig(StageConfig):
    """Train the fastText quality classifier before filtering (GPT-3 / DCLM style)."""

    positives: list[ConfigLocation] = Field(..., min_length=1, description="JSONL(.gz) or Parquet with a text field")
    negatives: list[ConfigLocation] | None = Field(None, description="default: the filter stage's input documents")
    output: ConfigPath = Field(..., description="where the model goes (an existing one is reused; delete to retrain)")
    positive_label: str = "hq"
    negative_label: str = "cc"
    max_examples: int = Field(20_000, ge=10, description="per class")
    holdout: float = Field(0.2, gt=0.0, lt=1.0)
    epoch: int = Field(25, ge=1)
    lr: float = Field(1.0, gt=0.0)
    word_ngrams: int = Field(2, ge=1)
    bucket: int = Field(200_000, ge=1, description="hash buckets for word n-grams (fastText's default 2,000,000 "
                        "makes an 800 MB model whatever the data: size it to the vocabulary)")
    dim: int = Field(50, ge=1, description="vector size (fastText's default: 100)")
    quantize: bool = Field(True, description="product-quantise the model (a few MB instead of bucket × dim floats)")
    seed: int = 0


class FilterConfig(StageConfig):
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
