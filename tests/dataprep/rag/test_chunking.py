"""Chunks are exact slices, never exceed max_tokens, overlap as configured and prefer paragraph/sentence cuts."""

from __future__ import annotations

from itertools import pairwise

import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenizers import Tokenizer

from dataprep.rag.chunking import (
    CHUNK_SCHEMA,
    ChunkConfig,
    chunk_document,
    chunk_documents,
    chunks_to_table,
    token_counter,
)
from dataprep.rag.embedding import DEFAULT_MODEL
from tests.dataprep.rag.conftest import shared_tokenizer

PIECES = [
    "the", "river", "stone", "light", "antidisestablishmentarianism", "café", "naïve", "Überraschung", "日本語",
    "東京", "🙂", "x", "3.14", "e.g.", "U.S.A.", "don't", "(see", "below)", "—", ",", ".", "!", "?", "。", '."',
    " ", "  ", "\t", "\n", "\n\n", "\n \n", "\r\n\r\n", "http://example.com/a?b=c", "\u200b", "\x00", "ﬁ",
]
documents = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=400).map(lambda parts: " ".join(parts)),
    st.lists(st.sampled_from(PIECES), max_size=300).map("".join),
    st.text(max_size=600),
)
configs = st.integers(8, 64).flatmap(
    lambda max_tokens: st.builds(
        ChunkConfig,
        max_tokens=st.just(max_tokens),
        overlap_tokens=st.integers(0, max_tokens - 1),
        min_tokens=st.integers(1, max_tokens),
    )
)


def _sentences(count: int, start: int = 0) -> list[str]:
    words = ["river", "stone", "light", "window", "paper", "green", "system", "model", "garden", "letter"]
    return [
        f"Sentence {start + i} tells the {words[i % 10]} about the {words[(i * 3) % 10]} and the "
        f"{words[(i * 7) % 10]} near the old harbour."
        for i in range(count)
    ]


def _covered(text: str, tokenizer: Tokenizer, chunks) -> bool:
    spans = [(chunk.start_char, chunk.end_char) for chunk in chunks]
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    return all(any(s <= a and b <= e for s, e in spans) for a, b in offsets)


@pytest.mark.parametrize("name", ["minilm", "bpe"])
@settings(max_examples=150, deadline=None)
@given(text=documents, config=configs)
def test_chunks_are_slices_within_the_token_bound(name: str, text: str, config: ChunkConfig) -> None:
    tokenizer = shared_tokenizer(name)
    count = token_counter(tokenizer)
    chunks = chunk_document("d", text, tokenizer, config, url="http://x/")
    if not text.strip() or not count(text):
        assert chunks == []
        return
    assert chunks
    for index, chunk in enumerate(chunks):
        assert chunk.chunk_index == index and chunk.doc_id == "d" and chunk.url == "http://x/"
        assert chunk.text == text[chunk.start_char : chunk.end_char]
        assert chunk.text
        assert chunk.n_tokens == count(chunk.text) <= config.max_tokens
        assert chunk.chunk_id == xxhash.xxh3_64_hexdigest(chunk.text.encode("utf-8"))
    assert [c.start_char for c in chunks] == sorted(c.start_char for c in chunks)
    assert all(a.start_char < b.start_char and a.end_char < b.end_char for a, b in pairwise(chunks))
    assert _covered(text, tokenizer, chunks)


def test_consecutive_chunks_overlap_by_about_overlap_tokens(minilm_tokenizer: Tokenizer) -> None:
    text = " ".join(_sentences(60))
    count = token_counter(minilm_tokenizer)
    config = ChunkConfig(max_tokens=64, overlap_tokens=16, min_tokens=8)
    chunks = chunk_document("d", text, minilm_tokenizer, config)
    assert len(chunks) > 10
    for previous, following in pairwise(chunks):
        assert following.start_char < previous.end_char
        shared = text[following.start_char : previous.end_char]
        assert 8 <= count(shared) <= 16, shared
        assert text[following.start_char - 1] == " "  # starts at a word, not inside one


def test_zero_overlap_chunks_are_adjacent(minilm_tokenizer: Tokenizer) -> None:
    text = " ".join(_sentences(40))
    chunks = chunk_document("d", text, minilm_tokenizer, ChunkConfig(max_tokens=50, overlap_tokens=0, min_tokens=4))
    for previous, following in pairwise(chunks):
        assert following.start_char >= previous.end_char
        assert text[previous.end_char : following.start_char].strip() == ""
    assert chunks[-1].end_char == len(text)


def test_paragraph_boundaries_are_preferred(minilm_tokenizer: Tokenizer) -> None:
    paragraphs = [" ".join(_sentences(2, start=2 * i)) for i in range(12)]  # 32 tokens each
    text = "\n\n".join(paragraphs)
    chunks = chunk_document("d", text, minilm_tokenizer, ChunkConfig(max_tokens=100, overlap_tokens=0))
    ends = {text.index(p) + len(p) for p in paragraphs}
    starts = {text.index(p) for p in paragraphs}
    assert len(chunks) == 4
    for chunk in chunks:
        assert chunk.end_char in ends, chunk.text
        assert chunk.start_char in starts
        assert chunk.n_tokens > 90  # three paragraphs per chunk (the latest paragraph end), not one


def test_sentence_ends_are_preferred_inside_a_paragraph(minilm_tokenizer: Tokenizer) -> None:
    text = " ".join(_sentences(30))
    chunks = chunk_document("d", text, minilm_tokenizer, ChunkConfig(max_tokens=80, overlap_tokens=20))
    assert len(chunks) > 5
    assert all(chunk.text.endswith("harbour.") for chunk in chunks)
    assert all(chunk.text.startswith("Sentence") for chunk in chunks)  # the overlap starts at a sentence too


def test_long_text_without_breaks_is_cut_at_token_boundaries(minilm_tokenizer: Tokenizer) -> None:
    text = "東京" * 500
    chunks = chunk_document("d", text, minilm_tokenizer, ChunkConfig(max_tokens=64, overlap_tokens=8))
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    assert all(chunk.n_tokens <= 64 for chunk in chunks)


def test_min_tokens_keeps_tails_from_being_tiny(minilm_tokenizer: Tokenizer) -> None:
    config = ChunkConfig(max_tokens=60, overlap_tokens=10, min_tokens=25)
    for sentences in range(1, 30):
        text = " ".join(_sentences(sentences))
        chunks = chunk_document("d", text, minilm_tokenizer, config)
        total = token_counter(minilm_tokenizer)(text)
        assert all(chunk.n_tokens >= min(config.min_tokens, total) for chunk in chunks)


def test_short_document_is_one_chunk_and_blank_ones_none(minilm_tokenizer: Tokenizer) -> None:
    rows = [
        {"doc_id": "a", "text": "Just a few words.", "url": "https://a.example/"},
        {"doc_id": "b", "text": "   \n\n\t "},
        {"doc_id": "c", "text": ""},
        {"doc_id": "d", "text": None},
    ]
    chunks = list(chunk_documents(rows, minilm_tokenizer))
    assert [(c.doc_id, c.text, c.url, c.start_char, c.end_char) for c in chunks] == [
        ("a", "Just a few words.", "https://a.example/", 0, 17)
    ]


def test_truncating_tokenizer_file_is_not_truncated() -> None:
    raw = Tokenizer.from_file(f"{DEFAULT_MODEL}/tokenizer.json")  # ships with truncation at 128 and padding
    text = " ".join(_sentences(40))
    chunks = list(chunk_documents([{"doc_id": "d", "text": text}], raw, ChunkConfig()))
    assert chunks[-1].end_char == len(text) and len(chunks) > 2
    assert raw.truncation is not None  # the caller's tokenizer is left as it was


def test_table_has_the_chunk_schema(minilm_tokenizer: Tokenizer) -> None:
    rows = [{"doc_id": f"doc-{i}", "text": " ".join(_sentences(20, start=i))} for i in range(3)]
    chunks = list(chunk_documents(rows, minilm_tokenizer, ChunkConfig(max_tokens=64, overlap_tokens=8)))
    table = chunks_to_table(chunks)
    assert table.schema == CHUNK_SCHEMA and table.num_rows == len(chunks)
    assert table.column("text").to_pylist() == [c.text for c in chunks]
    assert table.column("url").null_count == len(chunks)
    assert chunks_to_table([]).schema == CHUNK_SCHEMA
    assert pa.types.is_int32(table.schema.field("n_tokens").type)


def test_identical_text_gives_identical_chunk_ids(minilm_tokenizer: Tokenizer) -> None:
    text = " ".join(_sentences(10))
    first = chunk_document("a", text, minilm_tokenizer, ChunkConfig(max_tokens=40, overlap_tokens=5))
    second = chunk_document("b", "Preface.\n\n" + text, minilm_tokenizer, ChunkConfig(max_tokens=40, overlap_tokens=5))
    assert {c.chunk_id for c in first} & {c.chunk_id for c in second}


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValidationError, match="overlap_tokens"):
        ChunkConfig(max_tokens=32, overlap_tokens=32)
    with pytest.raises(ValidationError, match="min_tokens"):
        ChunkConfig(max_tokens=32, min_tokens=33, overlap_tokens=4)
    with pytest.raises(ValidationError):
        ChunkConfig(max_token=10)  # extra fields are forbidden
    config = ChunkConfig()
    assert (config.max_tokens, config.overlap_tokens, config.min_tokens) == (200, 32, 16)
    with pytest.raises(ValidationError):
        config.max_tokens = 10  # frozen
