"""Our MinHash signatures equal datasketch 2.x `MinHash` hash values exactly."""

from __future__ import annotations

import random
import re
import unicodedata

import numpy as np
import pytest
from datasketch import MinHash

from dataprep.dedup.minhash import (
    MinHasher,
    char_shingles,
    jaccard,
    sha1_shingle_hash,
    text_words,
    word_shingles,
    xxh32_shingle_hash,
    xxh32_words_shingle_hash,
)

WORDS = (
    'the', 'of', 'and', 'to', 'in', 'river', 'stone', 'light',
    'model', 'window', 'paper', 'green', 'quickly', 'simple', 'system', 'later',
)


def _random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed"]) for _ in range(words))


HASHES = [("sha1", sha1_shingle_hash), ("xxh32", xxh32_shingle_hash), ("xxh32-words", xxh32_words_shingle_hash)]
MIXED_PIECES = [
    "abc", "DEF", "ghi,", "ü", "ß", "İ", "K", "é\u00a0", "—", "’s", "12_3", "日本語", "\t\n", "Ⅻ", "ﬁ", " ", ".",
]


def _mixed_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(MIXED_PIECES) for _ in range(pieces))


@pytest.mark.parametrize(("shingle_hash", "function"), HASHES)
@pytest.mark.parametrize(("num_perm", "seed"), [(128, 1), (64, 42), (256, 7)])
def test_signatures_equal_datasketch(shingle_hash: str, function, num_perm: int, seed: int) -> None:
    rng = random.Random(seed)
    hasher = MinHasher(num_perm=num_perm, seed=seed, shingle_hash=shingle_hash)
    for _ in range(20):
        shingles = word_shingles(_random_text(rng, rng.randrange(1, 300)))
        reference = MinHash(num_perm=num_perm, seed=seed, hashfunc=function)
        reference.update_batch(shingles)
        assert reference.scheme == "affine32"
        np.testing.assert_array_equal(hasher.signature(shingles), reference.hashvalues)


@pytest.mark.parametrize(("shingle_hash", "function"), HASHES)
@pytest.mark.parametrize("ngram", [1, 3, 5, 9])
def test_batched_text_signatures_equal_datasketch(shingle_hash: str, function, ngram: int) -> None:
    """The vectorised batch path (`text_signatures`) equals datasketch fed `word_shingles` one by one."""
    rng = random.Random(ngram)
    texts = [_mixed_text(rng, rng.randrange(0, 150)) for _ in range(60)] + ["", "one", "two words", "a b c d"]
    hasher = MinHasher(num_perm=64, seed=3, shingle_hash=shingle_hash)
    batch = hasher.text_signatures(texts, ngram)
    for text, row in zip(texts, batch, strict=True):
        reference = MinHash(num_perm=64, seed=3, hashfunc=function)
        reference.update_batch(word_shingles(text, ngram))
        np.testing.assert_array_equal(row, reference.hashvalues)


def test_text_words_equal_unicode_regex() -> None:
    """The byte-table fast path gives exactly the `\\w+` runs of the NFC, lower-cased text."""
    rng = random.Random(5)
    for _ in range(2000):
        text = _mixed_text(rng, rng.randrange(0, 40))
        expected = [word.encode() for word in re.findall(r"\w+", unicodedata.normalize("NFC", text).lower())]
        assert text_words(text) == expected, text


def test_words_hash_is_linear_in_word_hashes() -> None:
    assert xxh32_words_shingle_hash(b"a b") != xxh32_words_shingle_hash(b"b a")
    assert xxh32_words_shingle_hash(b"a") != xxh32_shingle_hash(b"a")  # position 0 is multiplied too


def test_empty_document_matches_datasketch_empty() -> None:
    np.testing.assert_array_equal(MinHasher().signature([]), MinHash(num_perm=128, seed=1).hashvalues)


def test_sha1_hash_is_datasketch_default() -> None:
    from datasketch.hashfunc import sha1_hash32

    assert all(sha1_shingle_hash(b) == sha1_hash32(b) for b in (b"", b"a", "grüße".encode(), b"x" * 1000))


def test_estimate_tracks_jaccard() -> None:
    rng = random.Random(3)
    base = _random_text(rng, 400).split()
    edited = list(base)
    for position in rng.sample(range(len(edited)), 20):
        edited[position] = "zebra"
    first, second = word_shingles(" ".join(base)), word_shingles(" ".join(edited))
    hasher = MinHasher(num_perm=256)
    estimate = float(np.mean(hasher.signature(first) == hasher.signature(second)))
    assert abs(estimate - jaccard(set(first), set(second))) < 0.08


def test_shingles_normalise_and_dedupe() -> None:
    assert word_shingles("A  b\nC d E f", n=5) == [b"a b c d e", b"b c d e f"]
    assert word_shingles("Ünïcode", n=5) == ["ünïcode".encode()]
    assert word_shingles("   ") == []
    assert char_shingles("abcab", n=2) == [b"ab", b"bc", b"ca"]
    with pytest.raises(ValueError, match="xxh32"):
        MinHasher(shingle_hash="md5")
