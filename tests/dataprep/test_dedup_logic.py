"""LSH parameters, banding, star edges, verification and connected components."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHashLSH

from dataprep.dedup.documents import (
    band_hashes,
    connected_components,
    lsh_params,
    normalise_url,
    star_edges,
    verify_edges,
)
from dataprep.dedup.minhash import MinHasher, jaccard, word_shingles


def _text(rng: random.Random, words: int = 300) -> list[str]:
    return [f"w{rng.randrange(50_000)}" for _ in range(words)]


def _edit(words: list[str], rng: random.Random, share: float) -> list[str]:
    edited = list(words)
    for position in rng.sample(range(len(edited)), int(len(edited) * share)):
        edited[position] = f"x{rng.randrange(50_000)}"
    return edited


@pytest.mark.parametrize(("threshold", "num_perm"), [(0.8, 128), (0.7, 256), (0.5, 64)])
def test_lsh_params_match_datasketch(threshold: float, num_perm: int) -> None:
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert lsh_params(threshold, num_perm) == (index.b, index.r)


def test_lsh_params_weights_need_not_sum_to_one() -> None:
    # only the ratio matters: (0.1, 0.3) is (0.25, 0.75); datasketch itself only takes weights summing to 1
    index = MinHashLSH(threshold=0.7, num_perm=128, weights=(0.25, 0.75))
    assert lsh_params(0.7, 128, 0.1, 0.3) == (index.b, index.r) == lsh_params(0.7, 128, 0.25, 0.75)
    assert lsh_params(0.8, 128, 0.2, 0.8) != lsh_params(0.8, 128, 0.8, 0.2)  # the weights do matter
    with pytest.raises(ValueError):
        lsh_params(0.7, 128, 0.0, 0.0)


def test_lsh_params_reject_bad_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        lsh_params(1.0, 128)


def test_bands_find_planted_near_duplicates_only() -> None:
    rng = random.Random(1)
    originals = [_text(rng) for _ in range(40)]
    near = [_edit(words, rng, 0.004) for words in originals[:10]]  # one word: 5-gram Jaccard ≈ 0.97
    texts = [" ".join(w) for w in originals + near]
    hasher = MinHasher(num_perm=128)
    keys = band_hashes(hasher.signatures(word_shingles(t) for t in texts), *lsh_params(0.8, 128))
    pairs = set()
    for band in range(keys.shape[1]):
        pairs |= {tuple(e) for e in star_edges(keys[:, band], np.arange(len(texts))).tolist()}
    assert {(i, 40 + i) for i in range(10)} <= pairs
    assert all(b - a == 40 for a, b in pairs), "no unrelated documents share a band"


def test_star_edges_link_bucket_to_its_smallest_id() -> None:
    keys = np.array([7, 3, 7, 7, 3, 9], dtype=np.uint64)
    ids = np.array([5, 4, 2, 8, 1, 0])
    assert star_edges(keys, ids).tolist() == [[1, 4], [2, 5], [2, 8]]
    assert star_edges(np.array([], dtype=np.uint64), np.array([], dtype=np.int64)).shape == (0, 2)


def test_star_edges_ignore_input_order() -> None:
    rng = np.random.default_rng(0)
    keys, ids = rng.integers(0, 20, 500).astype(np.uint64), np.arange(500)
    order = rng.permutation(500)
    assert np.array_equal(star_edges(keys, ids), star_edges(keys[order], ids[order]))


def test_chain_of_near_misses_is_not_merged_when_verified() -> None:
    rng = random.Random(2)
    a = _text(rng, 200)
    b = a[:140] + _text(rng, 60)  # shares 70 % of its words with a
    c = b[:60] + _text(rng, 140)  # shares 30 % with b, almost nothing with a
    shingles = [set(word_shingles(" ".join(words), n=1)) for words in (a, b, c)]
    candidates = np.array([[0, 1], [1, 2]])
    assert connected_components(3, candidates.tolist()).tolist() == [0, 0, 0], "unverified edges chain"
    kept = verify_edges(candidates, shingles, threshold=0.5)
    assert [(x, y) for x, y, _ in kept] == [(0, 1)]
    assert kept[0][2] == pytest.approx(jaccard(shingles[0], shingles[1]))
    assert connected_components(3, [(x, y) for x, y, _ in kept]).tolist() == [0, 0, 2]


def test_components_label_is_the_smallest_member() -> None:
    labels = connected_components(7, [(5, 6), (3, 5), (1, 2), (6, 3)])
    assert labels.tolist() == [0, 1, 1, 3, 4, 3, 3]


def test_normalise_url() -> None:
    assert normalise_url("HTTPS://AllenAI.org:443/#team") == "https://allenai.org/"
    assert normalise_url("http://a.example:8080/x?q=1#f") == "http://a.example:8080/x?q=1"
    assert normalise_url(None) is None
