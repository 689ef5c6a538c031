"""Our MinHash signatures equal datasketch 2.x `MinHash` hash values exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from dataprep.minhash import (
    MinHasher,
    char_shingles,
    jaccard,
    sha1_shingle_hash,
    word_shingles,
    xxh32_shingle_hash,
)

WORDS = (
    'the', 'of', 'and', 'to', 'in', 'river', 'stone', 'light',
    'model', 'window', 'paper', 'green', 'quickly', 'simple', 'system', 'later',
)


def _random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed"]) for _ in range(words))


@pytest.mark.parametrize(("shingle_hash", "function"), [("sha1", sha1_shingle_hash), ("xxh32", xxh32_shingle_hash)])
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
