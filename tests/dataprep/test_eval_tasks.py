"""Task files, few-shot prompts, the choice scorer and the generation metrics (against sacrebleu/rouge-score)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataprep.evaluate.tasks import (
    TaskError,
    TaskSpec,
    build_prompt,
    cut_at_stop,
    generation_scores,
    load_task,
    read_examples,
    score_choices,
)


def write_task(tmp_path: Path, body: str, rows: list[dict]) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "task.yaml"
    path.write_text(body)
    return path


CHOICE = ('name: sentiment\ntype: choice\ndata: data.jsonl\ntemplate: "Review: {text}\\nSentiment:"\n'
          'choices: [bad, good]\nk: 2\n')


def test_task_yaml_loads_and_resolves_data(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, CHOICE, [{"text": "fine", "label": 1}]))
    assert task.data == (tmp_path / "data.jsonl").resolve() and task.k == 2


def test_missing_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="template: Field required"):
        load_task(write_task(tmp_path, "name: t\ntype: choice\ndata: data.jsonl\nchoices: [a, b]\n", []))
    task = load_task(write_task(tmp_path, CHOICE, [{"text": "x", "label": 0}, {"label": 1}]))
    with pytest.raises(TaskError, match=r"data.jsonl:2: missing field text"):
        read_examples(task)


def test_prompt_holds_k_demonstrations_and_never_the_example_itself(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(6)]
    task = load_task(write_task(tmp_path, CHOICE, rows))
    prompt = build_prompt(task, rows, 3)
    assert prompt.endswith("Review: review 3\nSentiment:")
    assert prompt.count("Review:") == 3 and "review 3\nSentiment: " not in prompt
    assert build_prompt(task, rows, 3) == prompt  # seeded


def test_choice_scorer_picks_the_more_likely_label() -> None:
    task = TaskSpec(name="t", type="choice", data=Path("unused"), template="{text}", choices=["no", "yes"])
    examples = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 0}]
    # a constructed scorer: " yes" is likelier after "a" and "c", " no" after "b"
    table = {("a", " yes"): -1.0, ("a", " no"): -3.0, ("b", " yes"): -2.0, ("b", " no"): -0.5,
             ("c", " yes"): -0.1, ("c", " no"): -0.2}
    result = score_choices(task, examples, lambda prompt, cont: table[(prompt, cont)])
    assert result == {"accuracy": pytest.approx(2 / 3), "chance": 0.5, "examples": 3}


def test_generation_scores_equal_the_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "a quick brown dog", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox", "hello world"]
    ours = generation_scores(hyps, refs)
    assert ours["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert ours["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, h)[name].fmeasure for h, r in zip(hyps, refs, strict=True)) / 3
        assert ours[name] == pytest.approx(expected)


def test_cut_at_stop() -> None:
    assert cut_at_stop("one two.\nthree", ["\n", "."]) == "one two"
    assert cut_at_stop("no stop", ["\n"]) == "no stop"
