"""Labelled examples for the fastText classifiers: reading texts, Jigsaw CSVs, splits, distilled labels.

Quality (GPT-3 / DCLM style): positives from a reference corpus, negatives from the crawl. Toxicity: the
Jigsaw layout (`comment_text` or `text`, and a 0/1 `toxic` column). `profanity_distilled_examples` builds the
data behind the bundled default toxicity model: real English sentences (Python's own documentation, as the
sample uses), half of them with one word swapped for a word of better-profanity's list (of the words the
model flags on their own), each labelled by alt-profanity-check's trained model (a linear SVM trained on real
labelled comments), not by us.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def read_texts(paths: Iterable[str | Path], field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from JSONL(.gz) files, Parquet files or folders of Parquet shards (a stage's `data/`)."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        for file in files:
            texts.extend(_file_texts(file, field))
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
    return texts


def _file_texts(path: Path, field: str) -> Iterator[str]:
    if not path.is_file():
        raise FileNotFoundError(f"training input {path} does not exist")
    if path.suffix == ".parquet":
        yield from (t for t in pq.read_table(path, columns=[field])[field].to_pylist() if t)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(field)
            except (json.JSONDecodeError, AttributeError) as error:
                raise ValueError(f"{path}:{number}: not a JSON object with a {field!r} field ({error})") from None
            if isinstance(text, str) and text.strip():
                yield text


def chunk_words(texts: Iterable[str], words: int = 150, min_words: int = 20) -> list[str]:
    """Texts cut into pieces of `words` words (the last piece kept if it has `min_words`): more, evenly sized
    examples from a few long reference documents, and the same unit for both classes."""
    chunks = []
    for text in texts:
        tokens = text.split()
        for start in range(0, len(tokens), words):
            piece = tokens[start : start + words]
            if len(piece) >= min_words:
                chunks.append(" ".join(piece))
    return chunks


def read_jigsaw(path: Path) -> list[tuple[str, str]]:
    """(label, text) pairs from a Jigsaw-layout CSV: `toxic` 1/0 → 'toxic'/'clean'."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        text_column = "comment_text" if "comment_text" in columns else "text"
        if text_column not in columns or "toxic" not in columns:
            raise ValueError(f"{path}: need a 'comment_text' (or 'text') and a 'toxic' column; found {sorted(columns)}")
        return [("toxic" if float(row["toxic"] or 0) >= 0.5 else "clean", row[text_column])
                for row in reader if row[text_column].strip()]


def write_jigsaw(path: Path, examples: Sequence[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "comment_text", "toxic"])
        for number, (label, text) in enumerate(examples):
            writer.writerow([f"{number:07d}", text, int(label == "toxic")])


def split_holdout(examples: Sequence[tuple[str, str]], share: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle split into (train, held out)."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    cut = int(len(shuffled) * (1 - share))
    return shuffled[:cut], shuffled[cut:]


def sentences_of(texts: Iterable[str], min_words: int = 6) -> list[str]:
    return [s.strip() for text in texts for s in _SENTENCE.split(text) if len(s.split()) >= min_words]


def profanity_distilled_examples(sentences: Sequence[str], bad_words: Sequence[str], seed: int = 0,
                                 swap_share: float = 0.5) -> list[tuple[str, str]]:
    """Real sentences, some with a blocklist word swapped in, labelled by alt-profanity-check's model."""
    from profanity_check import predict_prob  # optional extra `labels`: scikit-learn + the shipped model

    rng = random.Random(seed)
    flagged = [word for word, p in zip(bad_words, predict_prob(list(bad_words)), strict=True) if p >= 0.5]
    bad_words = flagged or list(bad_words)  # words the model itself calls profane, for a useful share of positives
    texts = []
    for sentence in sentences:
        words = sentence.split()
        if rng.random() < swap_share:
            words[rng.randrange(len(words))] = rng.choice(bad_words)
        texts.append(" ".join(words))
    probabilities = predict_prob(texts)
    return [("toxic" if p >= 0.5 else "clean", text) for p, text in zip(probabilities, texts, strict=True)]
