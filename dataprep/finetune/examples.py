"""Chat examples → token ids with a completion-only loss mask, and the packing of short examples into rows.

Tokenization renders the whole conversation with the chat template and tokenizes it once (so the ids are those
the server sees for the same chat), then marks as targets the tokens whose characters fall in an assistant
span (`dataprep.finetune.chat.assistant_spans`). Targets are the next token (labels shifted by one), -100
where no loss is taken.

Packing (first-fit decreasing by length, deterministic) puts several examples in one row of `seq_len` tokens;
`segments` numbers the examples along a row (-1 for padding), and the model attends only within an example
and restarts positions at each one (`workers.model.segment_positions_and_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from dataprep.finetune.chat import assistant_spans
from dataprep.finetune.instructions import Messages

IGNORE = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Input ids and per-position targets (the next token where it is an answer token, else -100)."""

    ids: list[int]
    targets: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


def tokenize_example(tokenizer: Tokenizer, messages: Messages, eos_token: str) -> TokenizedExample:
    """One conversation → ids and shifted targets (loss on assistant content and its end-of-text only)."""
    text, spans = assistant_spans(messages, eos_token)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    learned = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
    ids = list(encoding.ids)
    targets = [ids[i + 1] if learned[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return TokenizedExample(ids, targets)


@dataclass
class FitResult:
    """Examples that fit the context, and how many were truncated or dropped for length."""

    examples: list[TokenizedExample]
    truncated: int = 0
    dropped: int = 0


def fit_to_context(examples: list[TokenizedExample], seq_len: int, overlong: Literal["truncate", "drop"]
                   ) -> FitResult:
    """Examples longer than `seq_len` are cut at `seq_len` (when they still hold an answer token) or dropped."""
    result = FitResult([])
    for example in examples:
        if len(example.ids) <= seq_len:
            result.examples.append(example)
            continue
        cut = TokenizedExample(example.ids[:seq_len], example.targets[:seq_len - 1] + [IGNORE])
        if overlong == "truncate" and cut.target_tokens > 0:
            result.examples.append(cut)
            result.truncated += 1
        else:
            result.dropped += 1
    return result


@dataclass(frozen=True)
class PackedRows:
    """(rows, seq_len) arrays: tokens, targets (-100: no loss) and example numbers (-1: padding)."""

    tokens: np.ndarray
    targets: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def pack(examples: list[TokenizedExample], seq_len: int, pad_id: int) -> PackedRows:
    """First-fit decreasing: longest examples first, each into the first row with room; padding at row ends."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].ids), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index].ids)
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= size
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, members in enumerate(rows):
        start = 0
        for number, index in enumerate(members):
            example = examples[index]
            end = start + len(example.ids)
            tokens[r, start:end], targets[r, start:end], segments[r, start:end] = example.ids, example.targets, number
            start = end
    return PackedRows(tokens, targets, segments)
