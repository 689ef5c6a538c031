"""Vectorised MinHash signatures, bit-identical to datasketch 2.x's `affine32` scheme.

datasketch computes, for each shingle s: h = hashfunc(s) (uint32), h = fmix32(h) (MurmurHash3's finaliser),
then for each permutation i: (a_i * h + b_i) mod 2^32, and keeps the minimum per permutation. The
parameters a (odd), b come from `numpy.random.RandomState(seed)`. We do the same on a whole document's
shingle hashes at once with numpy, so a signature costs one (shingles × permutations) array operation.

The shingle hash is the real cost. datasketch's default (first 4 bytes of SHA-1) is reproduced exactly
(`sha1_shingle_hash`), as is xxHash32 of the whole shingle (`xxh32_shingle_hash`). The default,
`xxh32_words_shingle_hash`, is also a plain `bytes -> int` function that datasketch accepts as `hashfunc`: the
xxHash32 of each space-separated word, combined as Σ_k xxh32(word_k)·M_k mod 2^32 with fixed odd multipliers
M_k per position. Because it is linear in per-word hashes, `MinHasher.text_signatures` computes it for a
whole batch with numpy: each word is hashed once (not n times, as every n-gram holding it would be) and no
n-gram string is ever built; that is what makes signatures an order of magnitude cheaper than shingle strings.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import xxhash

ShingleHash = Callable[[bytes], int]
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
EMPTY_VALUE = np.uint32(0xFFFFFFFF)
_WORD = re.compile(r"\w+", re.UNICODE)
_ASCII_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# ASCII non-word bytes → space and A-Z → a-z; bytes ≥ 0x80 (inside UTF-8 sequences) are left alone.
_ASCII_WORD_TABLE = bytes(
    (c if c >= 0x80 or c in _ASCII_WORD_BYTES else 0x20) if not 0x41 <= c <= 0x5A else c + 0x20 for c in range(256)
)
_PERMUTE_CHUNK_ROWS = 4096


def sha1_shingle_hash(data: bytes) -> int:
    """datasketch's default `sha1_hash32`: the first 4 bytes of SHA-1, little-endian."""
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


def xxh32_shingle_hash(data: bytes) -> int:
    """xxHash32 (seed 0): about 10× cheaper than SHA-1 per shingle."""
    return xxhash.xxh32_intdigest(data)


def position_multipliers(count: int) -> np.ndarray:
    """The odd uint32 multiplier M_k of the word at position k of a shingle (fixed forever: part of the hash)."""
    return np.array([xxhash.xxh32_intdigest(k.to_bytes(4, "little"), seed=0x5BD1E995) | 1 for k in range(count)],
                    dtype=np.uint32)


_MULTIPLIERS = [int(m) for m in position_multipliers(64)]


def xxh32_words_shingle_hash(data: bytes) -> int:
    """Σ_k xxh32(word_k)·M_k mod 2^32 over the space-separated words of a shingle (the fast default)."""
    total = 0
    for position, word in enumerate(data.split(b" ")):
        multiplier = _MULTIPLIERS[position] if position < 64 else int(position_multipliers(position + 1)[-1])
        total += xxhash.xxh32_intdigest(word) * multiplier
    return total & 0xFFFFFFFF


SHINGLE_HASHES: dict[str, ShingleHash] = {
    "sha1": sha1_shingle_hash,
    "xxh32": xxh32_shingle_hash,
    "xxh32-words": xxh32_words_shingle_hash,
}


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


def text_words(text: str) -> list[bytes]:
    """The `\\w+` runs of the NFC, lower-cased text, UTF-8 encoded.

    ASCII text (most of the web) never touches the regex engine: one byte-table translation and a split. Other
    text is split at ASCII separators the same way and only tokens with non-ASCII bytes go through the regex,
    which gives the same words because ASCII non-word characters are never part of a `\\w+` run.
    """
    if text.isascii():
        return text.encode().translate(_ASCII_WORD_TABLE).split()
    tokens = unicodedata.normalize("NFC", text).lower().encode().translate(_ASCII_WORD_TABLE).split()
    words: list[bytes] = []
    for token in tokens:
        if token.isascii():
            words.append(token)
        else:
            words.extend(word.encode() for word in _WORD.findall(token.decode()))
    return words


def word_shingles(text: str, n: int = 5) -> list[bytes]:
    """Word n-grams of normalised text, UTF-8 encoded, space-joined; a short text is one shingle."""
    words = text_words(text)
    if not words:
        return []
    if len(words) < n:
        return [b" ".join(words)]
    return list(dict.fromkeys(map(b" ".join, zip(*(words[i:] for i in range(n)), strict=False))))


# Scripts written without spaces between words: Han, Hiragana, Katakana (and their extensions), Thai, Lao,
# Khmer, Myanmar, Tibetan. Korean (Hangul) separates words with spaces and stays with word shingles.
_SPACELESS_RANGES = ("\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff"
                     "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f")
_LETTER = re.compile(r"[^\W\d_]")  # word characters that are not digits or underscore
_SPACELESS_LETTER = re.compile(rf"(?=[^\W\d_])[{_SPACELESS_RANGES}]")  # letters of those scripts only
SPACELESS_SHARE = 0.3
SCRIPT_SAMPLE_CHARS = 4096


def spaceless_share(text: str) -> float:
    """Share of the letters of `text` (digits, punctuation and combining marks left out) in a script written
    without spaces; only the first `SCRIPT_SAMPLE_CHARS` characters are looked at."""
    sample = text[:SCRIPT_SAMPLE_CHARS]
    letters = len(_LETTER.findall(sample))
    return len(_SPACELESS_LETTER.findall(sample)) / letters if letters else 0.0


def shingle_kind(text: str, threshold: float = SPACELESS_SHARE) -> str:
    """`char` when at least `threshold` of the text's word characters are CJK, Thai, ... (a "word" there would
    be a whole clause or line, so word n-grams see almost nothing), else `word`."""
    return "char" if spaceless_share(text) >= threshold else "word"


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
    shingle_hash: str = "xxh32-words"

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

    def text_signatures(self, texts: Sequence[str], ngram: int = 5) -> np.ndarray:
        """Signatures of the word n-gram sets of `texts`: equal to `signatures(word_shingles(t, ngram) ...)`.

        With the `xxh32-words` hash the whole batch is vectorised: words are hashed once each, n-gram hashes are
        n shifted multiply-adds over the batch's word-hash array, and the permutations run on blocks of rows
        reduced per document with `np.minimum.reduceat`.
        """
        if self.shingle_hash != "xxh32-words":
            return self.signatures(word_shingles(text, ngram) for text in texts)
        word_lists = [text_words(text) for text in texts]
        lengths = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
        flat = list(chain.from_iterable(word_lists))
        word_hashes = np.fromiter(map(xxhash.xxh32_intdigest, flat), dtype=np.uint32, count=len(flat))
        shingle_hashes, counts = _batch_ngram_hashes(word_hashes, lengths, ngram)
        return self._segment_minima(fmix32(shingle_hashes), counts)

    def _segment_minima(self, mixed: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Per document (a run of `counts[d]` rows of `mixed`): min over rows of a·h + b; EMPTY for no rows.

        Works on blocks of whole documents of about `_PERMUTE_CHUNK_ROWS` shingles laid out permutation-major,
        so `np.minimum.reduceat` reduces contiguous memory and a block stays in cache.
        """
        result = np.full((len(counts), self.num_perm), EMPTY_VALUE, dtype=np.uint32)
        nonempty = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[nonempty]
        ends = starts + counts[nonempty]
        a, b = self._a[:, None], self._b[:, None]  # type: ignore[attr-defined]
        begin = 0
        while begin < len(nonempty):
            end = max(int(np.searchsorted(ends, starts[begin] + _PERMUTE_CHUNK_ROWS, side="right")), begin + 1)
            first, last = starts[begin], ends[end - 1]
            block = a * mixed[None, first:last] + b
            result[nonempty[begin:end]] = np.minimum.reduceat(block, starts[begin:end] - first, axis=1).T
            begin = end
        return result


def _batch_ngram_hashes(word_hashes: np.ndarray, lengths: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """`xxh32_words_shingle_hash` of every n-gram of every document, from the concatenated word hashes.

    Returns the hashes (documents' n-grams one after another) and the n-gram count per document; a document
    shorter than n words has one shingle of all its words, as `word_shingles` gives it.
    """
    multipliers = position_multipliers(ngram)
    total = len(word_hashes)
    windows = max(total - ngram + 1, 0)
    sums = np.zeros(windows, dtype=np.uint32)
    for position in range(ngram):
        sums += word_hashes[position : position + windows] * multipliers[position]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
    pieces: list[np.ndarray] = []
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        if length >= ngram:
            pieces.append(sums[start : start + length - ngram + 1])
        elif length:
            short = word_hashes[start : start + length] * multipliers[:length]
            pieces.append(np.array([short.sum(dtype=np.uint32)], dtype=np.uint32))
    hashes = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    return hashes, counts


def jaccard(first: set[bytes], second: set[bytes]) -> float:
    """Exact Jaccard similarity of two shingle sets (1.0 for two empty sets)."""
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)
