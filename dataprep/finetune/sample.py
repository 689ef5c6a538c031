"""The demo's instruction set, derived from the sample corpus's prose: three small tasks a tiny model can learn
(repeat a phrase, name a sentence's first word, name its last word), one per JSONL layout, so the demo
exercises every reader."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataprep.evaluate.tasks import sentences_for_tasks
from dataprep.shards import atomic_write_bytes


def _bare(word: str) -> str:
    return re.sub(r"^\W+|\W+$", "", word) or word


def instruction_rows(texts: Sequence[str], count: int = 600, seed: int = 0) -> list[dict[str, Any]]:
    """`count` examples over sentences of the texts, cycling through the three tasks and layouts."""
    sentences = [words[:12] for words in sentences_for_tasks(texts, min_words=8)]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for index in range(count):
        words = sentences[rng.randrange(len(sentences))]
        kind = index % 3
        if kind == 0:
            phrase = " ".join(words[:rng.randint(3, 6)])
            rows.append({"prompt": f"Repeat this phrase: {phrase}", "completion": phrase})
        elif kind == 1:
            rows.append({"messages": [
                {"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": f"What is the first word of this sentence? {' '.join(words)}"},
                {"role": "assistant", "content": _bare(words[0])}]})
        else:
            rows.append({"instruction": "Give the last word of the text.", "input": " ".join(words),
                         "output": _bare(words[-1])})
    return rows


def write_instructions(path: Path, texts: Sequence[str], count: int = 600, seed: int = 0) -> Path:
    rows = instruction_rows(texts, count, seed)
    atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    return path
