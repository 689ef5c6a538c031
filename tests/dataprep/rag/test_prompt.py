"""The prompt never exceeds its budget (counted on the final string), numbers sources and truncates at tokens."""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dataprep.rag.chunking import Chunk, token_counter
from dataprep.rag.prompt import (
    DEFAULT_INSTRUCTIONS,
    PromptBudgetError,
    RetrievedChunk,
    build_prompt,
    render_prompt,
)
from tests.dataprep.rag.conftest import sample_texts, shared_tokenizer

WORDS = sorted({word for text in sample_texts().values() for word in text.split()}) + ["\n\n", "[1]", "Answer:"]


def _chunk(number: int, text: str, score: float = 1.0) -> RetrievedChunk:
    return RetrievedChunk(f"c{number}", f"doc-{number}", text, score, f"https://site/{number}", 100, 100 + len(text))


def _token_ends(name: str):
    tokenizer = shared_tokenizer(name)
    return lambda text: [end for _, end in tokenizer.encode(text, add_special_tokens=False).offsets]


def _words(seed: int, length: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(length))


chunk_texts = st.builds(_words, st.integers(0, 2**32), st.integers(0, 400))


@pytest.mark.parametrize("name", ["minilm", "bpe"])
@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(chunk_texts, max_size=8),
    question=st.builds(_words, st.integers(0, 2**32), st.integers(1, 20)),
    context_window=st.integers(32, 2000),
    max_tokens=st.integers(0, 256),
    with_offsets=st.booleans(),
)
def test_prompt_budget_is_never_exceeded(
    name: str, texts: list[str], question: str, context_window: int, max_tokens: int, with_offsets: bool
) -> None:
    count = token_counter(shared_tokenizer(name))
    chunks = [_chunk(i, text, score=1.0 - i / 10) for i, text in enumerate(texts)]
    token_ends = _token_ends(name) if with_offsets else None
    try:
        plan = build_prompt(question, chunks, count, context_window, max_tokens, token_ends=token_ends)
    except PromptBudgetError as error:
        assert count(render_prompt(DEFAULT_INSTRUCTIONS, question, [])) + max_tokens > context_window
        assert str(context_window) in str(error)
        event("question alone over budget")
        return
    event(f"truncated: {any(entry.truncated for entry in plan.used)}")
    event(f"dropped for budget: {any(reason == 'context_budget' for _, reason in plan.dropped)}")
    assert plan.prompt_tokens == count(plan.prompt)
    assert plan.prompt_tokens + max_tokens <= context_window
    assert [entry.number for entry in plan.used] == list(range(1, len(plan.used) + 1))
    by_id = {chunk.chunk_id: chunk for chunk in chunks}
    assert sorted([e.chunk_id for e in plan.used] + [d for d, _ in plan.dropped]) == sorted(by_id)
    for entry in plan.used:
        original = by_id[entry.chunk_id]
        shown = original.text[: entry.end_char - entry.start_char]
        assert f"[{entry.number}] {original.url}\n{shown}" in plan.prompt
        assert entry.truncated == (entry.end_char < original.end_char)
        if entry.truncated and with_offsets:
            assert len(shown) in set(token_ends(original.text))  # cut where a token ends
    ranked = [c.chunk_id for c in chunks if c.text.strip()]
    assert [e.chunk_id for e in plan.used] == ranked[: len(plan.used)]  # rank order kept, no gaps


def test_sources_are_numbered_in_rank_order_and_duplicates_dropped(minilm_count) -> None:
    chunks = [_chunk(1, "The river floods in spring."), _chunk(2, "The museum shows ships."), _chunk(1, "x")]
    chunks.append(_chunk(3, "   "))
    plan = build_prompt("When does the river flood?", chunks, minilm_count, 512, 64)
    assert plan.prompt.startswith(DEFAULT_INSTRUCTIONS)
    assert "[1] https://site/1\nThe river floods in spring.\n\n[2] https://site/2\nThe museum" in plan.prompt
    assert plan.prompt.endswith("Question: When does the river flood?\nAnswer:")
    assert [(e.number, e.doc_id, e.start_char, e.end_char, e.truncated) for e in plan.used] == [
        (1, "doc-1", 100, 127, False), (2, "doc-2", 100, 123, False)
    ]
    assert plan.dropped == [("c1", "duplicate"), ("c3", "empty")]
    assert plan.budget == 448


def test_the_first_chunk_that_does_not_fit_is_truncated_and_later_ones_dropped(minilm_count) -> None:
    long_text = " ".join(f"Sentence {i} describes the harbour and its ships." for i in range(60))
    chunks = [_chunk(1, "A short first source."), _chunk(2, long_text), _chunk(3, "A short third source.")]
    tokenizer = shared_tokenizer("minilm")
    ends = lambda text: [end for _, end in tokenizer.encode(text, add_special_tokens=False).offsets]  # noqa: E731
    plan = build_prompt("What is in the harbour?", chunks, minilm_count, 300, 100, token_ends=ends)
    assert [e.chunk_id for e in plan.used] == ["c1", "c2"] and plan.used[1].truncated
    assert plan.dropped == [("c3", "context_budget")]
    assert plan.prompt_tokens <= 200 and plan.prompt_tokens + 100 <= 300
    shown = long_text[: plan.used[1].end_char - plan.used[1].start_char]
    assert plan.used[1].end_char - plan.used[1].start_char in ends(long_text)
    assert f"[2] https://site/2\n{shown}\n\nQuestion:" in plan.prompt
    assert plan.prompt_tokens > 180  # the truncated source fills what is left


def test_question_alone_over_budget_raises_with_the_numbers(minilm_count) -> None:
    question = "why " * 200
    with pytest.raises(PromptBudgetError) as raised:
        build_prompt(question, [_chunk(1, "text")], minilm_count, 256, 64)
    message = str(raised.value)
    assert "256" in message and "64" in message and "192" in message
    needed = minilm_count(render_prompt(DEFAULT_INSTRUCTIONS, question, []))
    assert str(needed) in message


def test_from_chunk_carries_offsets() -> None:
    chunk = Chunk("d", "https://u/", 2, 10, 15, "hello", 1, "abc")
    retrieved = RetrievedChunk.from_chunk(chunk, 0.5)
    assert (retrieved.chunk_id, retrieved.start_char, retrieved.end_char, retrieved.url) == ("abc", 10, 15, "https://u/")
