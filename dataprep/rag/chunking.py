"""Token-aware chunking of documents for retrieval, with exact character offsets.

A document is tokenized once with the embedding model's tokenizer (no special tokens); every gap between two
tokens is a candidate cut, ranked paragraph (a blank line) > sentence end (or a line break) > word boundary >
any token boundary (a gap inside one character, where byte-level tokens split it, is never used). A chunk
ends at the best-ranked cut in the second half of its `max_tokens` window, the latest on ties (earlier only
for a word boundary when the second half has none), preferring cuts that leave at least `min_tokens` tokens
for the rest. The next chunk starts between `overlap_tokens` and half of it before that cut, at the earliest
sentence start there, else word start, so that it does not begin mid-word.

Guarantees: `chunk.text == document[start_char:end_char]`; `n_tokens` is the token count of `chunk.text` by
the same tokenizer without special tokens and never exceeds `max_tokens` (a candidate over the limit, which
can happen because a slice can tokenize differently from its span in the document, is shrunk and re-counted);
every token of the document is in some chunk (save one that alone re-tokenizes past `max_tokens`: skipped);
consecutive chunks advance (both offsets grow). Tails shorter
than `min_tokens` new tokens are avoided where the cuts allow; a document shorter than `min_tokens` tokens
is still one chunk; an empty or whitespace-only document has none.
`chunk_id` is the xxh3-64 hex digest of the chunk's UTF-8 text: a content hash that lets an incremental run
embed only chunks it has not seen.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
PARAGRAPH, SENTENCE, WORD, TOKEN, INSIDE_CHARACTER = 3, 2, 1, 0, -1

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’»)\]]*$")
_CJK_TERMINATORS = frozenset("。！？")

CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("chunk_index", pa.int32()),
        ("start_char", pa.int64()),
        ("end_char", pa.int64()),
        ("n_tokens", pa.int32()),
        ("text", pa.string()),
    ]
)


class ChunkConfig(BaseModel):
    """Chunk sizes in tokens of the embedding model's tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(200, ge=8, description="hard upper bound on a chunk's token count")
    overlap_tokens: int = Field(32, ge=0, description="tokens shared by consecutive chunks (about)")
    min_tokens: int = Field(16, ge=1, description="least new content of a chunk after the first")

    @field_validator("overlap_tokens")
    @classmethod
    def _overlap_below_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value >= max_tokens:
            raise ValueError(f"overlap_tokens ({value}) must be smaller than max_tokens ({max_tokens})")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_not_above_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})")
        return value


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrieval unit: `text == document[start_char:end_char]`, `chunk_id` = xxh3-64 of the text."""

    doc_id: str
    url: str | None
    chunk_index: int
    start_char: int
    end_char: int
    text: str
    n_tokens: int
    chunk_id: str


def content_hash(text: str) -> str:
    """The xxh3-64 hex digest of `text` as UTF-8 (lone surrogates passed through)."""
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))


def counting_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` itself when it neither truncates nor pads, else a copy that does neither.

    Tokenizer files shipped with models often enable both (MiniLM's: 128), which would hide tokens.
    """
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` (or a model directory holding one), without truncation or padding."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return counting_tokenizer(Tokenizer.from_file(str(path)))


def token_counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """`text -> number of tokens` without special tokens, truncation or padding."""
    prepared = counting_tokenizer(tokenizer)

    def count(text: str) -> int:
        return len(prepared.encode(text, add_special_tokens=False).ids)

    return count


def _cut_level(text: str, previous: tuple[int, int], following: tuple[int, int]) -> int:
    """How good a cut between two adjacent tokens is (higher is better)."""
    end, start = previous[1], following[0]
    if start < end:
        return INSIDE_CHARACTER  # both tokens cover the same character (byte-level BPE)
    gap = text[end:start]
    if _BLANK_LINE.search(gap):
        return PARAGRAPH
    if "\n" in gap:
        return SENTENCE
    if _SENTENCE_END.search(text[max(0, end - 4) : end]) and (gap or text[end - 1] in _CJK_TERMINATORS):
        return SENTENCE
    return WORD if gap else TOKEN


def cut_levels(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """`levels[i]` ranks a cut just before token `i` (`levels[0]` is unused and 0)."""
    return [TOKEN] + [_cut_level(text, offsets[i - 1], offsets[i]) for i in range(1, len(offsets))]


def _cut_rank(level: int, in_window: bool) -> float:
    """In the window, rank by level; before it (a short chunk), only word or better cuts beat a token cut."""
    if in_window:
        return float(level)
    return 0.5 + level / 10 if level >= WORD else -1.0


def _choose_cut(levels: Sequence[int], start: int, limit: int, min_cut: int, config: ChunkConfig) -> int | None:
    """Where a chunk starting at token `start` ends (exclusive), `min_cut <= cut <= limit < len(levels)`.

    Preference, in order: not inside a character; leaves at least `min_tokens` tokens for the rest; the best
    cut at or after half the window (`_cut_rank`); the latest. None when every candidate is inside a character.
    """
    floor = start + max(config.min_tokens, config.overlap_tokens + 1, config.max_tokens // 2)
    tail = len(levels) - config.min_tokens
    best, best_key = None, None
    for position in range(min_cut, limit + 1):
        level = levels[position]
        key = (level > INSIDE_CHARACTER, position <= tail, _cut_rank(level, position >= floor), position)
        if best_key is None or key > best_key:
            best, best_key = position, key
    return best if best_key is not None and best_key[0] else None


def _next_start(levels: Sequence[int], start: int, cut: int, overlap: int) -> int:
    """The first token of the next chunk: between `overlap` and `overlap / 2` tokens before `cut`.

    The earliest best-ranked start in that range (a sentence start over a word start), so the overlap stays
    close to `overlap` without beginning mid-word; `cut` itself (no overlap) when every candidate would
    start inside a character.
    """
    first = max(start + 1, cut - overlap)
    last = min(cut - 1, max(first, cut - overlap // 2))
    best, best_level = cut, INSIDE_CHARACTER
    for position in range(first, last + 1):
        if levels[position] > best_level:
            best, best_level = position, levels[position]
    return best


def _next_legal(levels: Sequence[int], position: int) -> int:
    """The first position after `position` where a chunk may start (not inside a character)."""
    position += 1
    while position < len(levels) and levels[position] == INSIDE_CHARACTER:
        position += 1
    return position


def _fit(
    text: str, offsets: Sequence[tuple[int, int]], ends: Sequence[int], levels: Sequence[int],
    start: int, min_cut: int, count: Callable[[str], int], config: ChunkConfig,
) -> tuple[int, int, int, int] | None:
    """(cut, start_char, end_char, n_tokens) of the chunk of tokens `[start, cut)`, re-counted to fit.

    `cut >= min_cut` (past the previous chunk's end). None when no such chunk fits: a slice can tokenize into
    more tokens than its span had in the whole document (a start inside a word, for instance).
    """
    total = len(offsets)
    limit = min(total, start + config.max_tokens)
    while limit >= min_cut:
        cut = limit if limit == total else _choose_cut(levels, start, limit, min_cut, config)
        if cut is None:
            return None
        start_char, end_char = offsets[start][0], ends[cut - 1]
        n_tokens = count(text[start_char:end_char])
        if n_tokens <= config.max_tokens:
            return cut, start_char, end_char, n_tokens
        limit = cut - (n_tokens - config.max_tokens)
    return None


def chunk_spans(text: str, tokenizer: Tokenizer, config: ChunkConfig) -> Iterator[tuple[int, int, int]]:
    """(start_char, end_char, n_tokens) of each chunk of `text`, in order."""
    tokenizer = counting_tokenizer(tokenizer)
    count = token_counter(tokenizer)
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    if not offsets or not text.strip():
        return
    levels = cut_levels(text, offsets)
    ends, furthest = [], 0
    for _, end in offsets:
        furthest = max(furthest, end)
        ends.append(furthest)
    start, covered = 0, 0  # covered: tokens [0, covered) are in emitted chunks
    while covered < len(offsets):
        fitted = _fit(text, offsets, ends, levels, start, covered + 1, count, config)
        if fitted is None:
            # drop the overlap; if even that fails, skip one token rather than exceed max_tokens
            start = covered if start < covered else _next_legal(levels, start)
            covered = max(covered, start)
            continue
        cut, start_char, end_char, n_tokens = fitted
        yield start_char, end_char, n_tokens
        start, covered = _next_start(levels, start, cut, config.overlap_tokens), cut


def chunk_document(
    doc_id: str, text: str, tokenizer: Tokenizer, config: ChunkConfig, url: str | None = None
) -> list[Chunk]:
    """The chunks of one document, in order (`chunk_index` 0, 1, ...)."""
    prepared = counting_tokenizer(tokenizer)
    return [
        Chunk(doc_id, url, index, start, end, text[start:end], n_tokens, content_hash(text[start:end]))
        for index, (start, end, n_tokens) in enumerate(chunk_spans(text, prepared, config))
    ]


def chunk_documents(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Tokenizer,
    config: ChunkConfig | None = None,
    *,
    text_key: str = "text",
    id_key: str = "doc_id",
    url_key: str = "url",
) -> Iterator[Chunk]:
    """The chunks of every row (`doc_id`, `text`, optional `url`), rows in order."""
    config = config or ChunkConfig()
    prepared = counting_tokenizer(tokenizer)
    for row in rows:
        text = row.get(text_key) or ""
        if text.strip():
            yield from chunk_document(str(row[id_key]), text, prepared, config, url=row.get(url_key))


def chunks_to_table(chunks: Iterable[Chunk]) -> pa.Table:
    """A table with `CHUNK_SCHEMA`."""
    chunks = list(chunks)
    columns = {name: [getattr(chunk, name) for chunk in chunks] for name in CHUNK_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=CHUNK_SCHEMA)
