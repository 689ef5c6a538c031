"""Fixtures shared by the RAG tests: the shipped MiniLM model and tokenizer, a byte-level BPE, sample texts."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from dataprep.rag.chunking import load_tokenizer, token_counter
from dataprep.rag.embedding import DEFAULT_MODEL

SAMPLE_TEXT_DIR = Path(__file__).resolve().parents[3] / "dataprep" / "sample" / "sample_text"


def sample_texts() -> dict[str, str]:
    """The repository's sample texts by file stem (de, es, fr, offensive, ru, spam, zh)."""
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(SAMPLE_TEXT_DIR.glob("*.txt"))}


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """n isotropic random unit vectors."""
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@functools.cache
def shared_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name, built once per session: "minilm" is all-MiniLM-L6-v2's WordPiece (truncation and
    padding off); "bpe" a small byte-level BPE trained on the sample texts, its counts far from additive."""
    if name == "minilm":
        return load_tokenizer(DEFAULT_MODEL)
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(sample_texts().values(), trainer)
    return tokenizer


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Tokenizer:
    return shared_tokenizer("minilm")


@pytest.fixture(scope="session")
def minilm_count(minilm_tokenizer: Tokenizer):
    return token_counter(minilm_tokenizer)


@pytest.fixture(scope="session")
def minilm():
    """The shipped all-MiniLM-L6-v2 `SentenceTransformer`, loaded once per session."""
    from dataprep.rag.embedding import load_encoder

    return load_encoder(DEFAULT_MODEL)
