r"""Benchmark: MinHash signatures per core, ours vs datasketch, end to end from text (shingling included).

128 permutations, word 5-grams, `--docs` (2000) synthetic 500-word documents (20,000-word vocabulary), one
process. Every path gets the same documents, one untimed warm-up pass, then `--repeat` interleaved rounds
(each path timed once per round); the headline is the median docs/s with min-max. What each path does from
text to signature:

- datasketch `update` loop: `word_shingles(text)` (our tokenizer: NFC, lower case, `\w+` words, 5-grams joined
  by spaces, UTF-8 bytes), then `MinHash(num_perm=128).update(shingle)` per shingle: SHA-1 of each shingle
  (first 4 bytes), datasketch's numpy permutation per shingle.
- datasketch `update_batch`: the same shingles, one `update_batch(shingles)` per document (SHA-1, one numpy
  permutation over the document's shingles).
- datasketch `bulk`: the same shingles, `MinHash.bulk(all shingle lists)`.
- ours `sha1`: the same shingles, SHA-1 per shingle, then our vectorised permutation: signatures
  bit-identical to datasketch's (tested).
- ours `xxh32`: the same shingles, xxHash32 per shingle (a different hash: different signatures, same
  estimator).
- ours `xxh32-words` (the default): no shingle strings at all: each word hashed once with xxHash32, each
  5-gram's hash = Σ_k xxh32(word_k)·M_k mod 2^32 computed with numpy over the batch, then the permutation.
  The same shingle sets as the others, hashed differently: its signatures are not datasketch's (datasketch
  reproduces them when given this function as `hashfunc`, tested), its Jaccard estimates are as accurate.
- rensa `RMinHash` (when `pip install rensa` is present; never a project dependency): the same shingles
  decoded to str, its own hash.

The ratios compare ours (`xxh32-words`) with each baseline's median.

    .venv/bin/python benchmarks/minhash.py [--docs 2000] [--repeat 3]

Last line: {"benchmark": "minhash", "metrics": {...}}, also appended to benchmarks/results/minhash.jsonl.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import interleaved, per_second, record, spread  # noqa: E402
from datasketch import MinHash  # noqa: E402

from dataprep.dedup.minhash import MinHasher, word_shingles  # noqa: E402

NUM_PERM = 128


def corpus(docs: int, words: int = 500) -> list[str]:
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(20_000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(docs)]


def rounds(paths: dict[str, Callable[[list[str]], Any]], texts: list[str], repeat: int) -> dict[str, list[float]]:
    """docs/s of every path in each of `repeat` interleaved rounds, after one untimed warm-up pass of each."""
    def show(number: int, rates: dict[str, list[float]]) -> None:
        print(f"round {number}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()), flush=True)

    runs = {name: per_second(len(texts), lambda f=function: f(texts)) for name, function in paths.items()}
    return interleaved(runs, repeat, show)


def datasketch_update(texts: list[str]) -> None:
    for text in texts:
        minhash = MinHash(num_perm=NUM_PERM)
        for shingle in word_shingles(text):
            minhash.update(shingle)


def datasketch_update_batch(texts: list[str]) -> None:
    for text in texts:
        MinHash(num_perm=NUM_PERM).update_batch(word_shingles(text))


def datasketch_bulk(texts: list[str]) -> None:
    MinHash.bulk([word_shingles(text) for text in texts], num_perm=NUM_PERM)


def ours(shingle_hash: str):
    hasher = MinHasher(num_perm=NUM_PERM, shingle_hash=shingle_hash)
    return lambda texts: hasher.text_signatures(texts, 5)


def rensa(texts: list[str]) -> None:
    from rensa import RMinHash

    for text in texts:
        minhash = RMinHash(num_perm=NUM_PERM, seed=1)
        minhash.update([s.decode() for s in word_shingles(text)])
        minhash.digest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    texts = corpus(args.docs)
    paths: dict[str, Callable[[list[str]], Any]] = {
        "datasketch_update": datasketch_update, "datasketch_update_batch": datasketch_update_batch,
        "datasketch_bulk": datasketch_bulk, "ours_sha1": ours("sha1"), "ours_xxh32": ours("xxh32"),
        "ours_xxh32_words": ours("xxh32-words")}
    try:
        import rensa as _  # noqa: F401

        paths["rensa"] = rensa
    except ImportError:
        print("rensa not installed: skipped", flush=True)
    rates = rounds(paths, texts, args.repeat)
    metrics: dict[str, Any] = {"docs": len(texts), "repeat": args.repeat,
                               "docs_per_s": {name: spread(values) for name, values in rates.items()}}
    ours_median = statistics.median(rates["ours_xxh32_words"])
    for name in ("datasketch_update", "datasketch_update_batch", "datasketch_bulk", "rensa"):
        if name in rates:
            metrics[f"ours_vs_{name}"] = round(ours_median / statistics.median(rates[name]), 2)
    record("minhash", metrics)


if __name__ == "__main__":
    main()
