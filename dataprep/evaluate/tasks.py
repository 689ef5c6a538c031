"""Evaluation tasks defined in YAML: prompt-based few-shot choice tasks and generation tasks, and their scores.

A task file (YAML):

    name: continuation
    type: choice                 # or: generate
    data: continuation.jsonl     # JSONL, relative to the YAML file (or absolute / a URL-less path)
    template: "{context}"        # str.format over each example's fields
    choices_field: choices       # per-example list; or `choices: [yes, no]` for fixed labels
    label_field: label           # index into the choices (or the choice text itself)
    target_field: target         # generate: the reference text
    k: 3                         # demonstrations drawn (seeded) from the other examples
    separator: "\\n\\n"
    continuation_prefix: " "     # between the prompt and a choice / target
    max_examples: 200
    max_new_tokens: 24           # generate only
    stop: ["\\n"]

Choice tasks pick argmax_y log P(prefix + y | demonstrations + f(x)) (the lectures' prompt-based classification)
and report accuracy next to the chance baseline (mean 1/#choices). Generation tasks decode greedily and are
scored with sacrebleu (BLEU, chrF) and rouge-score (ROUGE-1/2/L F1, mean over examples).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TaskError(ValueError):
    """A task file or one of its examples is unusable; the message names the task and the field."""


class TaskSpec(BaseModel):
    """One evaluation task (see the module docstring for the YAML form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1)
    type: Literal["choice", "generate"]
    data: Path
    template: str = Field(..., min_length=1)
    choices: list[str] | None = None
    choices_field: str | None = None
    label_field: str = "label"
    target_field: str = "target"
    k: int = Field(0, ge=0, le=32)
    separator: str = "\n\n"
    continuation_prefix: str = " "
    max_examples: int = Field(200, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    seed: int = 0

    @model_validator(mode="after")
    def _choices_source(self) -> TaskSpec:
        if self.type == "choice" and (self.choices is None) == (self.choices_field is None):
            raise ValueError("a choice task needs exactly one of `choices` (fixed) or `choices_field`")
        return self


def load_task(path: Path) -> TaskSpec:
    """Read and validate a task YAML; `data` resolves against the YAML's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TaskError(f"task {path}: cannot read ({error})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"task {path}: the top level must be a mapping")
    if isinstance(raw.get("data"), str) and not Path(raw["data"]).is_absolute():
        raw["data"] = str((path.parent / raw["data"]).resolve())
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors())
        raise TaskError(f"task {path}: {problems}") from None


def _fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def read_examples(task: TaskSpec) -> list[dict[str, Any]]:
    """The task's examples (first `max_examples`), each checked for every field the task uses."""
    if not task.data.is_file():
        raise TaskError(f"task {task.name}: data file not found: {task.data}")
    examples = []
    for number, line in enumerate(task.data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"task {task.name}: {task.data}:{number}: invalid JSON ({error.msg})") from None
        needed = [*_fields(task.template)]
        needed += [task.label_field, *([task.choices_field] if task.choices_field else [])] \
            if task.type == "choice" else [task.target_field]
        missing = [name for name in needed if name not in example]
        if missing:
            raise TaskError(f"task {task.name}: {task.data}:{number}: missing field {', '.join(missing)}")
        examples.append(example)
        if len(examples) == task.max_examples:
            break
    if not examples:
        raise TaskError(f"task {task.name}: {task.data} has no examples")
    return examples


def choices_of(task: TaskSpec, example: dict[str, Any]) -> list[str]:
    return list(task.choices if task.choices is not None else example[task.choices_field])  # type: ignore[index]


def label_index(task: TaskSpec, example: dict[str, Any]) -> int:
    label, options = example[task.label_field], choices_of(task, example)
    if isinstance(label, int) and 0 <= label < len(options):
        return label
    if isinstance(label, str) and label in options:
        return options.index(label)
    raise TaskError(f"task {task.name}: label {label!r} is neither an index nor one of the choices {options}")


def answer_text(task: TaskSpec, example: dict[str, Any]) -> str:
    """What follows the prompt in a demonstration: the right choice, or the reference."""
    if task.type == "choice":
        return choices_of(task, example)[label_index(task, example)]
    return str(example[task.target_field])


def build_prompt(task: TaskSpec, examples: Sequence[dict[str, Any]], position: int) -> str:
    """k seeded demonstrations from the other examples, then the example's own prompt."""
    others = [i for i in range(len(examples)) if i != position]
    demos = random.Random(task.seed * 1_000_003 + position).sample(others, min(task.k, len(others)))
    shots = [task.template.format(**examples[i]) + task.continuation_prefix + answer_text(task, examples[i])
             for i in demos]
    return task.separator.join([*shots, task.template.format(**examples[position])])


def score_choices(task: TaskSpec, examples: Sequence[dict[str, Any]],
                  loglikelihood: Callable[[str, str], float]) -> dict[str, float]:
    """Accuracy of argmax log P(choice | prompt) and the chance baseline."""
    correct, chance = 0, 0.0
    for position, example in enumerate(examples):
        prompt = build_prompt(task, examples, position)
        options = choices_of(task, example)
        scores = [loglikelihood(prompt, task.continuation_prefix + option) for option in options]
        correct += int(max(range(len(options)), key=scores.__getitem__) == label_index(task, example))
        chance += 1.0 / len(options)
    return {"accuracy": correct / len(examples), "chance": chance / len(examples), "examples": len(examples)}


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.index(stop) for stop in stops if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    count = max(1, len(rouge))
    return {
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score,
        **{name: sum(r[name].fmeasure for r in rouge) / count for name in ("rouge1", "rouge2", "rougeL")},
        "examples": len(rouge),
    }


def score_generation(task: TaskSpec, examples: Sequence[dict[str, Any]],
                     generate: Callable[[str, int], str]) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Greedy generations scored against the references; returns the scores and the first few samples."""
    hypotheses, references = [], []
    for position, example in enumerate(examples):
        prompt = build_prompt(task, examples, position) + task.continuation_prefix
        hypotheses.append(cut_at_stop(generate(prompt, task.max_new_tokens), task.stop).strip())
        references.append(str(example[task.target_field]).strip())
    samples = [{"reference": r, "generated": h} for h, r in list(zip(hypotheses, references, strict=True))[:3]]
    return generation_scores(hypotheses, references), samples


def sentences_for_tasks(texts: Sequence[str], min_words: int = 16) -> list[list[str]]:
    """Sentences (as word lists) of at least `min_words` words, in order, each once."""
    import re

    seen, found = set(), []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            key = " ".join(words)
            if len(words) >= min_words and key not in seen:
                seen.add(key)
                found.append(words)
    return found


def write_bundled_tasks(out_dir: Path, texts: Sequence[str], count: int = 120, seed: int = 0) -> list[Path]:
    """Two tasks from real prose: `continuation` (2-way choice: the true next words vs another sentence's)
    and `completion` (generate the next 8 words). Returns the JSONL paths."""
    from dataprep.shards import atomic_write_bytes

    sentences = sentences_for_tasks(texts)
    rng = random.Random(seed)
    picked = rng.sample(sentences, min(count, len(sentences)))
    choice_rows, generate_rows = [], []
    for index, words in enumerate(picked):
        other = picked[(index + 1 + rng.randrange(len(picked) - 1)) % len(picked)] if len(picked) > 1 else words
        true_next, wrong_next = " ".join(words[10:16]), " ".join(other[10:16])
        label = rng.randrange(2)
        options = [true_next, wrong_next] if label == 0 else [wrong_next, true_next]
        choice_rows.append({"context": " ".join(words[:10]), "choices": options, "label": label})
        generate_rows.append({"prompt": " ".join(words[:10]), "target": " ".join(words[10:18])})
    paths = []
    for name, rows in (("continuation", choice_rows), ("completion", generate_rows)):
        path = out_dir / f"{name}.jsonl"
        atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        paths.append(path)
    return paths
