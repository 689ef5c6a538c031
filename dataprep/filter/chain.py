"""The filter chain: ordered steps (heuristic rules, language ID, blocklist, classifiers) over a shard's documents.

A step either drops (the first dropping step is recorded on the document) or only annotates (the document
keeps going with a flag). Every measured score becomes a column `score_<step>_<metric>`. Line-level steps
(C4, blocklist lines, toxic sentences) rewrite the text and count the lines and characters they removed.
Model steps run over the whole batch of surviving documents at once, so fastText predicts in batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from pydantic import Field

from dataprep.filter.fasttext_models import (
    Blocklist,
    FastTextClassifier,
    ModelError,
    default_blocklist_path,
    default_langid_path,
    default_toxicity_path,
)
from dataprep.filter.rules import HEURISTIC_RULES, RuleOutcome, RuleParams
from dataprep.shards import publish_table
from dataprep.stage import DATA_DIR, REMOVED_DIR, ConfigLocation, StageDir

_SENTENCE = re.compile(r"[^.!?。！？\n]+(?:[.!?。！？]+|$)")


class LanguageParams(RuleParams):
    model: ConfigLocation | None = Field(None, description="fastText LID model; default: the shipped lid.176.ftz")
    keep: tuple[str, ...] = ("en",)
    min_score: float = Field(0.65, ge=0.0, le=1.0)


class BlocklistParams(RuleParams):
    path: ConfigLocation | None = Field(None, description="one word per line; default better-profanity's list")
    max_hits: int | None = Field(5, ge=0, description="drop the document above this many listed words")
    max_fraction: float | None = Field(0.01, ge=0.0, le=1.0, description="drop above this share of its words")
    remove_lines: bool = True


class ToxicityParams(RuleParams):
    model: ConfigLocation | None = Field(None, description="fastText model path; default: the bundled distilled model")
    label: str = "toxic"
    max_score: float = Field(0.5, ge=0.0, le=1.0)
    sentence_level: bool = Field(False, description="remove toxic sentences instead of dropping the document")


class QualityParams(RuleParams):
    model: ConfigLocation = Field(description="fastText quality model (from `forgeline train-quality`)")
    label: str = "hq"
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    pareto_alpha: float | None = Field(None, gt=0.0, description="GPT-3 style: keep if pareto(α) > 1 - score")


MODEL_RULES: dict[str, type[RuleParams]] = {
    "language": LanguageParams, "blocklist": BlocklistParams, "toxicity": ToxicityParams, "quality": QualityParams,
}
RULE_PARAMS: dict[str, type[RuleParams]] = {name: rule.params for name, rule in HEURISTIC_RULES.items()} | MODEL_RULES


@dataclass(frozen=True)
class Step:
    """One configured step: a unique name, its rule, drop or annotate, its typed parameters."""

    name: str
    rule: str
    mode: Literal["drop", "annotate"]
    params: RuleParams


@dataclass
class StepStats:
    """What one step did to a shard."""

    docs_in: int = 0
    docs_dropped: int = 0
    chars_dropped: int = 0
    docs_flagged: int = 0
    lines_removed: int = 0
    chars_removed_in_lines: int = 0

    def add(self, other: StepStats) -> None:
        for key, value in vars(other).items():
            setattr(self, key, getattr(self, key) + value)


@dataclass
class ChainResult:
    """Per input document: kept or not, final text, first dropping step, flags, scores; per step: stats."""

    texts: list[str]
    kept: np.ndarray
    drop_step: list[str | None]
    drop_reason: list[str | None]
    flags: list[list[str]]
    scores: dict[str, np.ndarray]
    language: list[str | None]
    language_score: np.ndarray
    stats: dict[str, StepStats] = field(default_factory=dict)


StepFunction = Callable[[list[str], list[str]], list[RuleOutcome]]


def _heuristic(step: Step) -> StepFunction:
    rule = HEURISTIC_RULES[step.rule]
    return lambda texts, _ids: [rule.apply(text, step.params) for text in texts]


def _language(params: LanguageParams, model: FastTextClassifier) -> StepFunction:
    def apply(texts: list[str], _ids: list[str]) -> list[RuleOutcome]:
        labels, probabilities = model.top(texts)
        outcomes = []
        for label, probability in zip(labels, probabilities.tolist(), strict=True):
            reason = None
            if label not in params.keep:
                reason = f"language_{label}"
            elif probability < params.min_score:
                reason = "language_low_score"
            outcomes.append(RuleOutcome(reason, {"score": probability, "_label": label}))  # type: ignore[dict-item]
        return outcomes
    return apply


def _blocklist(params: BlocklistParams, blocklist: Blocklist) -> StepFunction:
    def one(text: str) -> RuleOutcome:
        hits, words = blocklist.hits(text)
        fraction = hits / words if words else 0.0
        scores = {"hits": float(hits), "fraction": fraction}
        if params.max_hits is not None and hits > params.max_hits:
            return RuleOutcome("blocklist_hits", scores)
        if params.max_fraction is not None and fraction > params.max_fraction:
            return RuleOutcome("blocklist_fraction", scores)
        if not params.remove_lines or not hits:
            return RuleOutcome(None, scores)
        lines = text.split("\n")
        kept = [line for line in lines if blocklist.hits(line)[0] == 0]
        return RuleOutcome(None, scores, "\n".join(kept), len(lines) - len(kept))
    return lambda texts, _ids: [one(text) for text in texts]


def _toxicity(params: ToxicityParams, model: FastTextClassifier) -> StepFunction:
    def apply(texts: list[str], _ids: list[str]) -> list[RuleOutcome]:
        scores = model.probability(texts, params.label).tolist()
        if not params.sentence_level:
            return [RuleOutcome("toxic" if score > params.max_score else None, {"score": score}) for score in scores]
        outcomes = []
        for text, score in zip(texts, scores, strict=True):
            sentences = [s for s in _SENTENCE.findall(text) if s.strip()]
            sentence_scores = model.probability(sentences, params.label) if sentences else np.empty(0)
            toxic = {i for i, value in enumerate(sentence_scores.tolist()) if value > params.max_score}
            new_text = "".join(s for i, s in enumerate(sentences) if i not in toxic).strip() if toxic else None
            outcomes.append(RuleOutcome(None, {"score": score}, new_text, len(toxic)))
        return outcomes
    return apply


def pareto_keep(doc_id: str, score: float, alpha: float) -> bool:
    """GPT-3's sampling: keep when a Pareto(α) draw exceeds 1 − score; the draw is seeded by the doc id."""
    uniform = (xxhash.xxh64_intdigest(doc_id.encode()) >> 11) / float(1 << 53)
    draw = (1.0 - uniform) ** (-1.0 / alpha) - 1.0  # numpy's pareto: Lomax with shape α
    return draw > 1.0 - score


def _quality(params: QualityParams, model: FastTextClassifier) -> StepFunction:
    def apply(texts: list[str], ids: list[str]) -> list[RuleOutcome]:
        scores = model.probability(texts, params.label).tolist()
        outcomes = []
        for doc_id, score in zip(ids, scores, strict=True):
            if params.pareto_alpha is not None:
                keep = pareto_keep(doc_id, score, params.pareto_alpha)
            else:
                keep = score >= params.min_score
            outcomes.append(RuleOutcome(None if keep else "low_quality", {"score": score}))
        return outcomes
    return apply


def step_function(step: Step, resources: dict[str, Any]) -> StepFunction:
    """The batch function of a step, given loaded models (`resources[step.name]`)."""
    if step.rule in HEURISTIC_RULES:
        return _heuristic(step)
    builders: dict[str, Callable[[Any, Any], StepFunction]] = {
        "language": _language, "blocklist": _blocklist, "toxicity": _toxicity, "quality": _quality}
    return builders[step.rule](step.params, resources[step.name])


def run_chain(steps: Sequence[Step], resources: dict[str, Any], doc_ids: list[str], texts: list[str]) -> ChainResult:
    """Apply the steps in order to one batch of documents."""
    count = len(texts)
    result = ChainResult(
        texts=list(texts), kept=np.ones(count, dtype=bool), drop_step=[None] * count, drop_reason=[None] * count,
        flags=[[] for _ in range(count)], scores={}, language=[None] * count,
        language_score=np.full(count, math.nan),
    )
    for step in steps:
        alive = np.flatnonzero(result.kept).tolist()
        outcomes = step_function(step, resources)([result.texts[i] for i in alive], [doc_ids[i] for i in alive])
        result.stats[step.name] = _record(step, result, alive, outcomes)
    return result


def _record(step: Step, result: ChainResult, alive: list[int], outcomes: list[RuleOutcome]) -> StepStats:
    stats = StepStats(docs_in=len(alive))
    for index, outcome in zip(alive, outcomes, strict=True):
        label = outcome.scores.pop("_label", None)
        if label is not None:
            result.language[index] = str(label)
            result.language_score[index] = outcome.scores["score"]
        for metric, value in outcome.scores.items():
            column = result.scores.setdefault(f"score_{step.name}_{metric}", np.full(len(result.texts), math.nan))
            column[index] = value
        if outcome.reason is not None and step.mode == "drop":
            result.kept[index] = False
            result.drop_step[index], result.drop_reason[index] = step.name, outcome.reason
            stats.docs_dropped += 1
            stats.chars_dropped += len(result.texts[index])
            continue
        if outcome.reason is not None:
            result.flags[index].append(f"{step.name}:{outcome.reason}")
            stats.docs_flagged += 1
        if outcome.text is not None and step.mode == "drop":
            stats.lines_removed += outcome.lines_removed
            stats.chars_removed_in_lines += len(result.texts[index]) - len(outcome.text)
            result.texts[index] = outcome.text
    return stats


def _score_columns(result: ChainResult, rows: np.ndarray) -> dict[str, pa.Array]:
    columns = {"language": pa.array([result.language[i] for i in rows], pa.string()),
               "language_score": pa.array(result.language_score[rows], pa.float64())}
    for name, values in sorted(result.scores.items()):
        columns[name] = pa.array(values[rows], pa.float64())
    columns["flags"] = pa.array([result.flags[i] for i in rows], pa.list_(pa.string()))
    return columns


def _with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def filter_shard(stage: StageDir, source: Path, steps: Sequence[Step], resources: dict[str, Any]) -> dict[str, Any]:
    """Filter one upstream shard into `data/<shard>` and `removed/<step>/<shard>`; resumable per shard.

    Kept documents carry the rewritten text; removed ones keep their original text plus `drop_step` and
    `drop_reason`. Every score column is on both. Returns (and records in `_units/`) the shard's stats.
    """
    unit = source.stem
    if (done := stage.finished_unit(unit)) is not None:
        return done
    table = pq.read_table(source)
    doc_ids, texts = table["doc_id"].to_pylist(), table["text"].to_pylist()
    result = run_chain(steps, resources, doc_ids, texts)
    kept_rows, dropped_rows = np.flatnonzero(result.kept), np.flatnonzero(~result.kept)
    kept = table.take(kept_rows).set_column(table.schema.get_field_index("text"), "text",
                                            pa.array([result.texts[i] for i in kept_rows], pa.string()))
    publish_table(_with_columns(kept, _score_columns(result, kept_rows)), stage.path / DATA_DIR / source.name,
                  stage.tmp_dir)
    removed = _with_columns(table.take(dropped_rows), _score_columns(result, dropped_rows))
    removed = removed.append_column("drop_step", pa.array([result.drop_step[i] for i in dropped_rows], pa.string()))
    removed = removed.append_column("drop_reason", pa.array([result.drop_reason[i] for i in dropped_rows],
                                                            pa.string()))
    for step in {result.drop_step[i] for i in dropped_rows}:
        mask = pa.array([result.drop_step[i] == step for i in dropped_rows])
        publish_table(removed.filter(mask), stage.path / REMOVED_DIR / str(step) / source.name, stage.tmp_dir)
    stats = {
        "records_in": len(texts),
        "records_out": len(kept_rows),
        "chars_in": sum(map(len, texts)),
        "chars_out": sum(len(result.texts[i]) for i in kept_rows),
        "steps": {name: vars(step_stats) for name, step_stats in result.stats.items()},
        "reasons": _reason_counts(result),
    }
    stage.finish_unit(unit, stats)
    return stats


def _reason_counts(result: ChainResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step, reason in zip(result.drop_step, result.drop_reason, strict=True):
        if step is not None:
            counts[f"{step}:{reason}"] = counts.get(f"{step}:{reason}", 0) + 1
    return counts


def merge_shard_stats(shards: Sequence[dict[str, Any]], step_names: Sequence[str]) -> dict[str, Any]:
    """Stage totals from per-shard stats, steps in chain order."""
    steps = {name: StepStats() for name in step_names}
    totals: dict[str, Any] = {"records_in": 0, "records_out": 0, "chars_in": 0, "chars_out": 0}
    reasons: dict[str, int] = {}
    for shard in shards:
        for key in totals:
            totals[key] += shard[key]
        for name, values in shard["steps"].items():
            steps[name].add(StepStats(**values))
        for reason, count in shard["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    dropped = {name: stats.docs_dropped for name, stats in steps.items() if stats.docs_dropped}
    return {**totals, "dropped": dropped, "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "steps": [{"name": name, **vars(stats)} for name, stats in steps.items()]}


def load_resources(steps: Sequence[Step]) -> dict[str, Any]:
    """Load every model and blocklist the steps need; raises `ModelError` naming the step on any problem."""
    resources: dict[str, Any] = {}
    for step in steps:
        params: Any = step.params
        try:
            if step.rule == "language":
                resources[step.name] = FastTextClassifier.load(params.model or default_langid_path())
            elif step.rule == "blocklist":
                resources[step.name] = Blocklist.load(params.path or default_blocklist_path())
            elif step.rule in ("toxicity", "quality"):
                path = params.model or default_toxicity_path()
                model = FastTextClassifier.load(path)
                if params.label not in model.labels:
                    raise ModelError(f"{model.path} has labels {model.labels}, not {params.label!r}")
                resources[step.name] = model
        except ModelError as error:
            raise ModelError(f"filter step {step.name!r} ({step.rule}): {error}") from None
    return resources
