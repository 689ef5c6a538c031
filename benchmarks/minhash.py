"""Benchmark: MinHash signatures per core, ours vs datasketch, end to end from text (shingling included).

128 permutations, word 5-grams, ~500-word documents, one process. Baselines measured in the same run:
datasketch `MinHash.update` per shingle, `MinHash.update_batch`, `MinHash.bulk` (all with the SHA-1 default),
and rensa's RMinHash when it is installed (`pip install rensa`; never a project dependency). Ours is
`MinHasher.text_signatures` with each shingle hash; the ratios use the default, `xxh32-words`.

    .venv/bin/python benchmarks/minhash.py [--docs 2000]

Last line: {"benchmark": "minhash", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasketch import MinHash  # noqa: E402

from dataprep.dedup.minhash import MinHasher, word_shingles  # noqa: E402

NUM_PERM = 128


def corpus(docs: int, words: int = 500) -> list[str]:
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(20_000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(docs)]


def rate(label: str, function, texts: list[str], repeat: int = 3) -> float:
    """Best of `repeat` timed passes (the machine's other load only ever slows a pass down)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function(texts)
        best = min(best, time.perf_counter() - started)
    docs_per_s = len(texts) / best
    print(f"{label:28s} {docs_per_s:10.0f} docs/s", flush=True)
    return docs_per_s


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
    args = parser.parse_args()
    texts = corpus(args.docs)
    metrics: dict[str, float] = {
        "datasketch_update": rate("datasketch update loop", datasketch_update, texts[: max(200, args.docs // 10)]),
        "datasketch_update_batch": rate("datasketch update_batch", datasketch_update_batch, texts),
        "datasketch_bulk": rate("datasketch bulk", datasketch_bulk, texts),
        "ours_sha1": rate("ours (sha1, exact datasketch)", ours("sha1"), texts),
        "ours_xxh32": rate("ours (xxh32 per shingle)", ours("xxh32"), texts),
        "ours_xxh32_words": rate("ours (xxh32-words, default)", ours("xxh32-words"), texts),
    }
    try:
        metrics["rensa"] = rate("rensa RMinHash", rensa, texts)
    except ImportError:
        print("rensa not installed: skipped", flush=True)
    for name in ("datasketch_update", "datasketch_bulk", "rensa"):
        if name in metrics:
            metrics[f"ours_vs_{name}"] = round(metrics["ours_xxh32_words"] / metrics[name], 2)
    metrics = {key: round(value, 2) for key, value in metrics.items()}
    print(json.dumps({"benchmark": "minhash", "metrics": metrics}))


if __name__ == "__main__":
    main()
