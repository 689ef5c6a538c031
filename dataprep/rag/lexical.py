"""Lexical retrieval: BM25 over chunk texts (bm25s), and the fusion of several scored rankings: reciprocal
rank fusion (ranks only) or relative score fusion (min-max normalised scores, weighted sum).

Texts are lower-cased and split into words of two or more word characters (bm25s' default pattern; a run of
CJK characters without spaces is therefore one word), English stop words removed, no stemming. Results are
our int64 row ids, highest score first, ties broken by the smaller id; documents sharing no term with the
query (score 0) are never returned. An index directory is written under a temporary name and renamed into
place, so it is seen complete or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np

from dataprep.shards import atomic_directory

LEXICAL_FORMAT_VERSION = 1
_META_FILE = "lexical.json"
_IDS_FILE = "ids.npy"
_BM25_DIR = "bm25"


def tokenize(texts: Sequence[str], stopwords: str | None = "en") -> list[list[str]]:
    """The BM25 terms of each text."""
    terms: list[list[str]] = bm25s.tokenize(
        list(texts), stopwords=stopwords or [], return_ids=False, show_progress=False
    )
    return terms


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best positive (score, id) pairs: score descending, then id ascending."""
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > k > 0:
        threshold = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
        candidates = candidates[scores[candidates] >= threshold]
    order = np.lexsort((ids[candidates], -scores[candidates]))[: max(k, 0)]
    chosen = candidates[order]
    return scores[chosen].astype(np.float32), ids[chosen].astype(np.int64)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], k: int = 60, top: int | None = None
) -> list[tuple[int, float]]:
    """Fuse rankings (best first): score(id) = sum over rankings of 1 / (k + rank), rank from 1.

    Only an id's first occurrence in a ranking counts. Sorted by score descending, then id ascending;
    the `top` best (all when None).
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    fused: dict[int, float] = {}
    for ranking in rankings:
        seen: set[int] = set()
        for rank, item in enumerate(ranking, start=1):
            item = int(item)
            if item in seen:
                continue
            seen.add(item)
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    ordered = sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))
    return ordered if top is None else ordered[:top]


def relative_score_fusion(
    scored: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float], top: int | None = None
) -> list[tuple[int, float]]:
    """Fuse scored rankings: each ranking's scores are min-max normalised to [0, 1] (all 1.0 when they are
    equal), then score(id) = sum of weight * normalised score over the rankings that hold it (0 elsewhere).

    This is the convex combination studied by Bruch et al. (2023, "An Analysis of Fusion Functions for Hybrid
    Retrieval") and Weaviate's `relativeScoreFusion`: unlike RRF it keeps how far ahead a first result is. Only
    an id's first occurrence in a ranking counts. Sorted by score descending, then id ascending; the `top` best.
    """
    if len(scored) != len(weights):
        raise ValueError(f"{len(scored)} rankings but {len(weights)} weights")
    if any(weight < 0 for weight in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    fused: dict[int, float] = {}
    for ranking, weight in zip(scored, weights, strict=True):
        first: dict[int, float] = {}
        for item, score in ranking:
            first.setdefault(int(item), float(score))
        if not first:
            continue
        low, high = min(first.values()), max(first.values())
        for item, score in first.items():
            normalised = (score - low) / (high - low) if high > low else 1.0
            fused[item] = fused.get(item, 0.0) + weight * normalised
    ordered = sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))
    return ordered if top is None else ordered[:top]


class BM25Index:
    """BM25 (Lucene variant, k1=1.5, b=0.75) over texts identified by int64 row ids."""

    def __init__(self, retriever: bm25s.BM25, ids: np.ndarray, stopwords: str | None = "en") -> None:
        self.retriever = retriever
        self.ids = np.asarray(ids, dtype=np.int64)
        self.stopwords = stopwords

    @classmethod
    def build(
        cls, texts: Sequence[str], ids: np.ndarray | None = None, stopwords: str | None = "en",
        k1: float = 1.5, b: float = 0.75,
    ) -> BM25Index:
        """Index `texts`; their ids default to 0..n-1."""
        if not len(texts):
            raise ValueError("BM25 needs at least one text")
        ids = np.arange(len(texts), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != len(texts) or len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique, one per text")
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokenize(texts, stopwords), show_progress=False)
        return cls(retriever, ids, stopwords)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of at most k matching texts, best first."""
        vocabulary = self.retriever.vocab_dict
        terms = [term for term in tokenize([query], self.stopwords)[0] if term and term in vocabulary]
        if not terms or k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return top_k(np.asarray(self.retriever.get_scores(terms)), self.ids, k)

    def save(self, directory: Path) -> None:
        """Write the index into a temporary directory, then rename it to `directory`."""
        with atomic_directory(Path(directory)) as tmp:
            self.retriever.save(str(tmp / _BM25_DIR), show_progress=False)
            np.save(tmp / _IDS_FILE, self.ids)
            meta = {"format_version": LEXICAL_FORMAT_VERSION, "stopwords": self.stopwords, "count": len(self.ids)}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        """An index written by `save`."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text())
        ids = np.load(directory / _IDS_FILE)
        if len(ids) != meta["count"]:
            raise ValueError(f"{directory}: {len(ids)} ids but lexical.json says {meta['count']}")
        retriever = bm25s.BM25.load(str(directory / _BM25_DIR), show_progress=False)
        return cls(retriever, ids, meta["stopwords"])
