"""Grounded prompts: retrieved chunks as numbered sources within the model's context window.

The budget is `context_window - max_tokens` (room kept for the answer). Token counts are always taken on the
complete prompt string as returned, never summed from pieces, because BPE counts are not additive across
concatenation. Chunks are taken in rank order and numbered [1], [2], ...; the first chunk that does not fit
whole is truncated at a token boundary (the longest prefix that fits, if it keeps at least
`min_truncated_tokens`), otherwise dropped, and every lower-ranked chunk is dropped ("context_budget").
Repeated chunk ids ("duplicate") and blank chunks ("empty") are dropped too. If the instructions and the
question alone exceed the budget, `PromptBudgetError` says by how much.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dataprep.rag.chunking import Chunk

DEFAULT_INSTRUCTIONS = (
    "Answer the question using only the numbered sources below and cite them like [1]. "
    "If the sources do not contain the answer, say that you do not know."
)
MIN_TRUNCATED_TOKENS = 16
_WORD = re.compile(r"\S+")


class PromptBudgetError(ValueError):
    """The instructions and question alone do not fit the context window once the answer is reserved."""


@dataclass(frozen=True)
class RetrievedChunk:
    """A retrieval result; `text == document[start_char:end_char]`."""

    chunk_id: str
    doc_id: str
    text: str
    score: float
    url: str | None = None
    start_char: int = 0
    end_char: int | None = None  # None: start_char + len(text)

    @classmethod
    def from_chunk(cls, chunk: Chunk, score: float) -> RetrievedChunk:
        """A retrieval result for `chunk`."""
        return cls(chunk.chunk_id, chunk.doc_id, chunk.text, score, chunk.url, chunk.start_char, chunk.end_char)


@dataclass(frozen=True)
class SourceEntry:
    """A chunk placed in the prompt as source `[number]` (`end_char` reflects any truncation)."""

    number: int
    chunk_id: str
    doc_id: str
    url: str | None
    score: float
    start_char: int
    end_char: int
    truncated: bool


@dataclass(frozen=True)
class PromptPlan:
    """The prompt, its sources, the chunks left out with why, and the prompt's token count."""

    prompt: str
    used: list[SourceEntry]
    dropped: list[tuple[str, str]]
    prompt_tokens: int
    budget: int


def render_prompt(instructions: str, question: str, sources: Sequence[tuple[str, str]]) -> str:
    """The prompt text; `sources` are (title, text) pairs, numbered from 1 in order."""
    parts = [instructions.strip()]
    if sources:
        blocks = [f"[{number}] {title}\n{text}" for number, (title, text) in enumerate(sources, start=1)]
        parts.append("Sources:\n" + "\n\n".join(blocks))
    parts.append(f"Question: {question.strip()}\nAnswer:")
    return "\n\n".join(parts)


def _title(chunk: RetrievedChunk) -> str:
    return chunk.url or chunk.doc_id


def default_cut_points(text: str) -> list[int]:
    """Where a chunk may be cut when no tokenizer offsets are given: word ends, else every character."""
    ends = [match.end() for match in _WORD.finditer(text)]
    return ends if len(ends) > 1 else list(range(1, len(text) + 1))


@dataclass
class _Builder:
    instructions: str
    question: str
    count_tokens: Callable[[str], int]
    budget: int
    sources: list[tuple[str, str]]

    def try_add(self, title: str, text: str) -> tuple[str, int] | None:
        """(prompt, tokens) with the source appended, if it fits the budget."""
        prompt = render_prompt(self.instructions, self.question, [*self.sources, (title, text)])
        tokens = self.count_tokens(prompt)
        return (prompt, tokens) if tokens <= self.budget else None

    def longest_prefix(self, title: str, text: str, cuts: Sequence[int]) -> tuple[str, str, int] | None:
        """(prefix, prompt, tokens) for the longest `text[:cut]` that fits (binary search, then verified)."""
        low, high, best = 0, len(cuts) - 1, None
        while low <= high:
            middle = (low + high) // 2
            fitted = self.try_add(title, text[: cuts[middle]].rstrip())
            if fitted is None:
                high = middle - 1
            else:
                best, low = (text[: cuts[middle]].rstrip(), *fitted), middle + 1
        return best


def _budget_error(base_tokens: int, context_window: int, max_tokens: int) -> PromptBudgetError:
    return PromptBudgetError(
        f"the instructions and question take {base_tokens} tokens, but a context window of {context_window} "
        f"tokens leaves {context_window - max_tokens} for the prompt after reserving {max_tokens} for the answer"
    )


def build_prompt(
    question: str,
    chunks_ranked: Sequence[RetrievedChunk],
    count_tokens: Callable[[str], int],
    context_window: int,
    max_tokens: int,
    instructions: str = DEFAULT_INSTRUCTIONS,
    token_ends: Callable[[str], Sequence[int]] | None = None,
    min_truncated_tokens: int = MIN_TRUNCATED_TOKENS,
) -> PromptPlan:
    """A prompt with as many top-ranked chunks as fit, so that `prompt_tokens + max_tokens <= context_window`.

    `token_ends(text)` gives the character offsets where the prompt tokenizer's tokens of `text` end; truncation
    cuts only there (at word ends when not given).
    """
    budget = context_window - max_tokens
    builder = _Builder(instructions, question, count_tokens, budget, [])
    prompt = render_prompt(instructions, question, [])
    prompt_tokens = count_tokens(prompt)
    if prompt_tokens > budget:
        raise _budget_error(prompt_tokens, context_window, max_tokens)
    used: list[SourceEntry] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    full = False
    for chunk in chunks_ranked:
        reason = _skip_reason(chunk, seen, full)
        if reason:
            dropped.append((chunk.chunk_id, reason))
            continue
        seen.add(chunk.chunk_id)
        text, truncated = chunk.text, False
        fitted = builder.try_add(_title(chunk), text)
        if fitted is None:
            full = True
            cuts = sorted({int(end) for end in (token_ends or default_cut_points)(text) if 0 < end < len(text)})
            prefix = builder.longest_prefix(_title(chunk), text, cuts)
            if prefix is None or count_tokens(prefix[0]) < min_truncated_tokens:
                dropped.append((chunk.chunk_id, "context_budget"))
                continue
            text, fitted, truncated = prefix[0], prefix[1:], True
        prompt, prompt_tokens = fitted
        builder.sources.append((_title(chunk), text))
        used.append(_entry(len(used) + 1, chunk, text, truncated))
    return PromptPlan(prompt, used, dropped, prompt_tokens, budget)


def _skip_reason(chunk: RetrievedChunk, seen: set[str], full: bool) -> str | None:
    if chunk.chunk_id in seen:
        return "duplicate"
    if not chunk.text.strip():
        return "empty"
    return "context_budget" if full else None


def _entry(number: int, chunk: RetrievedChunk, text: str, truncated: bool) -> SourceEntry:
    end_char = chunk.start_char + len(text) if truncated or chunk.end_char is None else chunk.end_char
    return SourceEntry(
        number, chunk.chunk_id, chunk.doc_id, chunk.url, float(chunk.score), chunk.start_char, end_char, truncated
    )
