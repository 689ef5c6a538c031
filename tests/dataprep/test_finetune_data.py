"""Instruction data: the three JSONL layouts, bad lines counted by reason, the chat template (identical to
transformers' rendering), the completion-only loss mask, length handling and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataprep.finetune.chat import CHAT_TEMPLATE, assistant_spans, render_chat
from dataprep.finetune.examples import IGNORE, fit_to_context, pack, tokenize_example
from dataprep.finetune.instructions import parse_lines, read_instructions
from dataprep.tokenize.tokenizer import EOT_TOKEN, load_tokenizer, save_tokenizer, train_bpe

TEXT = "the cat sat on the mat. a dog ran in the park. what is the first word? answer with one word."
GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first word of: the cat"},
                  {"role": "assistant", "content": "the"}]},
    {"prompt": "Repeat: a dog", "completion": "a dog"},
    {"instruction": "Give the last word.", "input": "the sun is hot", "output": "hot"},
    {"instruction": "Say yes.", "output": "yes"},
]
BAD = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ('{"question": "x", "answer": "y"}', "unknown_layout"),
    ('{"prompt": "x"}', "missing_field"),
    ('{"prompt": "x", "completion": "  "}', "empty_field"),
    ('{"prompt": "x", "completion": 3}', "not_a_string"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "bad_role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no_assistant_reply"),
    ('{"messages": []}', "bad_messages"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe([TEXT] * 30, 400), folder)
    return folder


def test_layouts_become_messages_and_bad_lines_are_counted(tmp_path: Path) -> None:
    lines = [json.dumps(row) for row in GOOD] + [line for line, _ in BAD] + [""]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    parsed = read_instructions(str(path))
    assert len(parsed.examples) == 4
    assert parsed.examples[1] == [{"role": "user", "content": "Repeat: a dog"},
                                  {"role": "assistant", "content": "a dog"}]
    assert parsed.examples[2][0]["content"] == "Give the last word.\n\nthe sun is hot"
    assert parsed.examples[3][0]["content"] == "Say yes."
    assert parsed.rejected_by_reason == dict(sorted((reason, 1) for _, reason in BAD))
    assert [row["line"] for row in parsed.rejected] == list(range(5, 5 + len(BAD)))
    assert all(row["source"] == str(path) and row["detail"] for row in parsed.rejected)


def test_chat_template_renders_as_transformers_does(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf.chat_template == CHAT_TEMPLATE, "the template is stored with the tokenizer"
    messages = parse_lines([json.dumps(GOOD[0])], "x").examples[0]
    for generation in (False, True):
        ours = render_chat(messages, EOT_TOKEN, generation)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert render_chat(messages[:-1], EOT_TOKEN, True) == (
        "<|system|>\nBe brief.<|endoftext|><|user|>\nfirst word of: the cat<|endoftext|><|assistant|>\n")
    text, spans = assistant_spans(messages, EOT_TOKEN)
    assert text == render_chat(messages, EOT_TOKEN, False)
    assert [text[a:b] for a, b in spans] == ["the<|endoftext|>"]


def test_loss_only_on_answer_tokens(tokenizer_dir: Path) -> None:
    tokenizer, eot_id = load_tokenizer(tokenizer_dir)
    messages = [{"role": "user", "content": "Repeat: the cat sat"}, {"role": "assistant", "content": "the cat sat"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "a dog"}]
    example = tokenize_example(tokenizer, messages, EOT_TOKEN)
    assert example.ids == tokenizer.encode(render_chat(messages, EOT_TOKEN, False), add_special_tokens=False).ids
    learned = [t for t in example.targets if t != IGNORE]
    # targets are the next token: the answer tokens of both assistant turns, each followed by end-of-text
    assert tokenizer.decode(learned, skip_special_tokens=False) == "the cat sat<|endoftext|>a dog<|endoftext|>"
    assert learned.count(eot_id) == 2 and example.targets[-1] == IGNORE
    for position, target in enumerate(example.targets):
        if target != IGNORE:
            assert target == example.ids[position + 1]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer_dir: Path) -> None:
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    short = tokenize_example(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                             EOT_TOKEN)
    long_answer = tokenize_example(tokenizer, [{"role": "user", "content": "go"},
                                               {"role": "assistant", "content": TEXT * 3}], EOT_TOKEN)
    long_prompt = tokenize_example(tokenizer, [{"role": "user", "content": TEXT * 3},
                                               {"role": "assistant", "content": "ok"}], EOT_TOKEN)
    limit = len(short.ids) + 4
    cut = fit_to_context([short, long_answer, long_prompt], limit, "truncate")
    assert (len(cut.examples), cut.truncated, cut.dropped) == (2, 1, 1), "a cut prompt with no answer left is dropped"
    assert len(cut.examples[1].ids) == limit and cut.examples[1].targets[-1] == IGNORE
    dropped = fit_to_context([short, long_answer, long_prompt], limit, "drop")
    assert (len(dropped.examples), dropped.truncated, dropped.dropped) == (1, 0, 2)


def test_packing_keeps_every_token_once(tokenizer_dir: Path) -> None:
    tokenizer, eot_id = load_tokenizer(tokenizer_dir)
    examples = [tokenize_example(tokenizer, [{"role": "user", "content": " ".join(TEXT.split()[:n])},
                                             {"role": "assistant", "content": "ok"}], EOT_TOKEN) for n in range(1, 15)]
    rows = pack(examples, 96, eot_id)
    placed = []
    for r in range(len(rows)):
        for segment in sorted(set(rows.segments[r].tolist()) - {-1}):
            mask = rows.segments[r] == segment
            assert mask.nonzero()[0].tolist() == list(range(mask.nonzero()[0][0], mask.nonzero()[0][-1] + 1))
            placed.append((rows.tokens[r][mask].tolist(), rows.targets[r][mask].tolist()))
        assert (rows.targets[r][rows.segments[r] == -1] == IGNORE).all()
    assert sorted(placed) == sorted((e.ids, e.targets) for e in examples)
    assert len(rows) < len(examples) and rows.tokens.shape[1] == 96, "short examples share rows"
    assert (rows.segments >= 0).mean() > 0.8
