"""Large-star / small-star connected components: the same components as a union-find, each labelled by its
smallest key, on random graphs, long chains (the slow case for label propagation) and stars."""

from __future__ import annotations

import numpy as np
import pytest

from dataprep.dedup.components import (
    both_directions,
    components_in_memory,
    large_star,
    partition_of,
    small_star,
    unique_pairs,
)
from dataprep.dedup.documents import connected_components


def _expected(keys: np.ndarray, edges: np.ndarray) -> dict[int, int]:
    """node key → smallest key of its component, by the union-find the driver path uses."""
    labels = connected_components(len(keys), edges.tolist())
    involved = np.unique(edges[edges[:, 0] != edges[:, 1]])
    smallest: dict[int, int] = {}
    for index in involved.tolist():
        smallest[labels[index]] = min(smallest.get(labels[index], keys[index]), keys[index])
    return {int(keys[i]): int(smallest[labels[i]]) for i in involved.tolist()}


@pytest.mark.parametrize("shape", ["random", "chain", "star", "cycles"])
def test_labels_equal_union_find(shape: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(2, 300))
        keys = rng.choice(np.arange(-(2**62), 2**62, 2**40, dtype=np.int64), size=n, replace=False)
        if shape == "random":
            edges = rng.integers(0, n, size=(int(rng.integers(1, 2 * n)), 2))
        elif shape == "chain":
            order = rng.permutation(n)
            edges = np.stack([order[:-1], order[1:]], axis=1)
        elif shape == "star":
            edges = np.stack([np.full(n - 1, n // 2), np.delete(np.arange(n), n // 2)], axis=1)
        else:
            order = rng.permutation(n)
            edges = np.stack([order, np.roll(order, 1)], axis=1)
        nodes, labels, rounds = components_in_memory(keys[edges])
        assert dict(zip(nodes.tolist(), labels.tolist(), strict=True)) == _expected(keys, edges)
        assert rounds < 60


def test_one_round_each_on_a_small_graph() -> None:
    # path 5 - 3 - 9 - 1: a large-star round links every larger neighbour to its neighbourhood's minimum
    pairs = unique_pairs(both_directions(np.array([[5, 3], [3, 9], [9, 1]])))
    assert sorted(map(tuple, large_star(pairs).tolist())) == [(5, 3), (9, 1), (9, 3)]
    # small-star: each node and its smaller neighbours link to the smallest of them
    assert sorted(map(tuple, small_star(pairs).tolist())) == [(3, 1), (5, 3), (9, 1)]


def test_partitions_cover_every_key_once() -> None:
    keys = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, size=10_000, dtype=np.int64)
    owner = partition_of(keys, 4)
    assert set(owner.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(owner, partition_of(keys, 4)) and (np.bincount(owner) > 2200).all()
