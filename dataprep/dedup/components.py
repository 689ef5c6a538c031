"""Connected components over partitioned edge lists: the large-star / small-star algorithm.

Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce and Beyond" (SoCC 2014).
The graph is a list of undirected edges; each round maps every node's neighbourhood to new edges, so a round needs
only the edges of one node partition at a time (no process holds the whole graph):

- large-star(u): m = min(N(u) ∪ {u}); for every neighbour v > u, the edge (v, m);
- small-star(u): m = min({v ∈ N(u): v < u} ∪ {u}); for every such v (and u itself), the edge (v, m), v ≠ m.

Both keep the components and rewire each towards its smallest node; alternating them until a large-star round
changes nothing leaves every component a star centred on its smallest node, so that node is every member's
label: the same labels as a union-find whose root is the smallest member. Rounds: O(log² n) (a few in practice).
Here arrays hold directed pairs (u, v), both directions of each undirected edge, as int64 document keys.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Step = Literal["large", "small"]


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (0..partitions-1) of each document key: keys are already uniform 64-bit hashes."""
    return (np.asarray(keys, dtype=np.int64).view(np.uint64) % np.uint64(partitions)).astype(np.int64)


def both_directions(edges: np.ndarray) -> np.ndarray:
    """(a, b) edges → the directed pairs (a, b) and (b, a), self-loops dropped."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    edges = edges[edges[:, 0] != edges[:, 1]]
    return np.concatenate([edges, edges[:, ::-1]])


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Distinct directed pairs sorted by (u, v)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def _neighbourhoods(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, min over the group of u of column `v`, broadcast to each pair) for pairs sorted by (u, v)."""
    u, v = pairs[:, 0], pairs[:, 1]
    starts = np.r_[True, u[1:] != u[:-1]]
    group_min = np.minimum.reduceat(v, np.flatnonzero(starts))
    return u, v, group_min[np.cumsum(starts) - 1]


def large_star(pairs: np.ndarray) -> np.ndarray:
    """Undirected edges (v, m) of one large-star round over `pairs` (all pairs of some nodes u, sorted)."""
    if not len(pairs):
        return pairs.reshape(0, 2)
    u, v, smallest = _neighbourhoods(pairs)
    centre = np.minimum(smallest, u)
    larger = v > u
    return np.stack([v[larger], centre[larger]], axis=1)


def small_star(pairs: np.ndarray) -> np.ndarray:
    """Undirected edges of one small-star round over `pairs` (all pairs of some nodes u, sorted)."""
    if not len(pairs):
        return pairs.reshape(0, 2)
    smaller_pairs = pairs[pairs[:, 1] < pairs[:, 0]]
    if not len(smaller_pairs):
        return pairs[:0]
    u, v, smallest = _neighbourhoods(smaller_pairs)  # smallest < u always: u has a smaller neighbour
    heads = np.r_[True, u[1:] != u[:-1]]
    edges = np.concatenate([np.stack([v, smallest], axis=1), np.stack([u[heads], smallest[heads]], axis=1)])
    return edges[edges[:, 0] != edges[:, 1]]


def star_round(pairs: np.ndarray, step: Step) -> np.ndarray:
    """One round over one partition's sorted distinct pairs: the new undirected edges."""
    return large_star(pairs) if step == "large" else small_star(pairs)


def star_labels(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, labels) once converged: each node's label is min(N(u) ∪ {u}), its component's smallest node."""
    if not len(pairs):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    u, _, smallest = _neighbourhoods(pairs)
    heads = np.r_[True, u[1:] != u[:-1]]
    return u[heads], np.minimum(smallest[heads], u[heads])


def components_in_memory(edges: np.ndarray, max_rounds: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
    """The same rounds in one process (for tests and small inputs): (nodes, labels, rounds)."""
    pairs = unique_pairs(both_directions(edges))
    previous_large: np.ndarray | None = None
    for rounds in range(1, max_rounds + 1):
        step: Step = "large" if rounds % 2 else "small"
        if step == "large":
            if previous_large is not None and np.array_equal(previous_large, pairs):
                nodes, labels = star_labels(pairs)
                return nodes, labels, rounds - 1
            previous_large = pairs
        pairs = unique_pairs(both_directions(star_round(pairs, step)))
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
