"""Vectorised MinHash signatures, bit-identical to datasketch 2.x's `affine32` scheme.

datasketch computes, for each shingle s: h = hashfunc(s) (uint32), h = fmix32(h) (MurmurHash3's finaliser),
then for each permutation i: (a_i * h + b_i) mod 2^32, and keeps the minimum per permutation. The
parameters a (odd), b come from `numpy.random.RandomState(seed)`. We do the same on a whole document's
shingle hashes at once with numpy, so a signature costs one (shingles × permutations) array operation.

The shingle hash is the real cost. datasketch's default (first 4 bytes of SHA-1) is reproduced exactly
(`sha1_shingle_hash`); the fast default `xxh32_shingle_hash` is xxHash32, which datasketch also accepts as
`hashfunc`, so signatures stay comparable with datasketch given the same function.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import xxhash

ShingleHash = Callable[[bytes], int]
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
EMPTY_VALUE = np.uint32(0xFFFFFFFF)
_WORD = re.compile(r"\w+", re.UNICODE)


def sha1_shingle_hash(data: bytes) -> int:
    """datasketch's default `sha1_hash32`: the first 4 bytes of SHA-1, little-endian."""
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


def xxh32_shingle_hash(data: bytes) -> int:
    """xxHash32 (seed 0): about 10× cheaper than SHA-1 per shingle."""
    return xxhash.xxh32_intdigest(data)


SHINGLE_HASHES: dict[str, ShingleHash] = {"sha1": sha1_shingle_hash, "xxh32": xxh32_shingle_hash}


def fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, element-wise (uint32 arithmetic wraps as intended)."""
    s1, m1, s2, m2, s3 = _FMIX
    values = values ^ (values >> s1)
    values = values * m1
    values = values ^ (values >> s2)
    values = values * m2
    return values ^ (values >> s3)


def affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters datasketch 2.x draws for the affine32 scheme."""
    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def normalise_text(text: str) -> str:
    """Unicode NFC, lower case, whitespace folded (the text exact and fuzzy dedup compare)."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def word_shingles(text: str, n: int = 5) -> list[bytes]:
    """Word n-grams of normalised text, UTF-8 encoded, space-joined; a short text is one shingle.

    Words are the `\\w+` runs of the NFC, lower-cased text (whitespace folding cannot change them).
    """
    words = _WORD.findall(unicodedata.normalize("NFC", text).lower())
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words).encode()]
    grams = map(" ".join, zip(*(words[i:] for i in range(n)), strict=False))
    return [gram.encode() for gram in dict.fromkeys(grams)]


def char_shingles(text: str, n: int = 24) -> list[bytes]:
    """Character n-grams of normalised text (NeMo Curator uses 24)."""
    normal = normalise_text(text)
    if len(normal) <= n:
        return [normal.encode()] if normal else []
    return list(dict.fromkeys(normal[i : i + n].encode() for i in range(len(normal) - n + 1)))


@dataclass(frozen=True)
class MinHasher:
    """Signatures for many documents with fixed permutations (build once per worker)."""

    num_perm: int = 128
    seed: int = 1
    shingle_hash: str = "xxh32"

    def __post_init__(self) -> None:
        if self.shingle_hash not in SHINGLE_HASHES:
            raise ValueError(f"unknown shingle hash {self.shingle_hash!r}; choose one of {sorted(SHINGLE_HASHES)}")
        a, b = affine32_permutations(self.num_perm, self.seed)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    @property
    def hashfunc(self) -> ShingleHash:
        return SHINGLE_HASHES[self.shingle_hash]

    def hash_shingles(self, shingles: Iterable[bytes]) -> np.ndarray:
        function = self.hashfunc
        return np.fromiter((function(s) for s in shingles), dtype=np.uint32)

    def signature_from_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Min over shingles of (a · fmix32(h) + b) mod 2^32, for every permutation."""
        if hashes.size == 0:
            return np.full(self.num_perm, EMPTY_VALUE, dtype=np.uint32)
        mixed = fmix32(hashes.astype(np.uint32, copy=False))
        permuted = mixed[:, None] * self._a[None, :] + self._b[None, :]  # type: ignore[attr-defined]
        return permuted.min(axis=0)

    def signature(self, shingles: Iterable[bytes]) -> np.ndarray:
        return self.signature_from_hashes(self.hash_shingles(shingles))

    def signatures(self, shingle_sets: Iterable[Iterable[bytes]]) -> np.ndarray:
        """A (documents × num_perm) uint32 matrix."""
        rows = [self.signature(shingles) for shingles in shingle_sets]
        return np.stack(rows) if rows else np.empty((0, self.num_perm), dtype=np.uint32)


def jaccard(first: set[bytes], second: set[bytes]) -> float:
    """Exact Jaccard similarity of two shingle sets (1.0 for two empty sets)."""
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)
