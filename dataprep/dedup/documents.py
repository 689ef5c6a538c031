"""Pure dedup logic: LSH banding, star candidate edges, Jaccard verification and connected components.

Documents are identified by dense integer ids (their rank by `doc_id`), so every result is independent of
input order and of how buckets are partitioned across workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from scipy.integrate import quad

from dataprep.dedup.lines import LineDedupConfig
from dataprep.dedup.minhash import char_shingles, fmix32, jaccard, normalise_text, shingle_kind, word_shingles
from dataprep.stage import StageConfig

_BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DedupConfig(StageConfig):
    """The dedup stage: exact, URL and MinHash-LSH near-duplicate removal (flow and Ray tasks alike)."""

    exact: bool = Field(True, description="drop documents whose normalised text is identical")
    url: bool = Field(True, description="drop re-captures of the same normalised URL")
    fuzzy: bool = Field(True, description="MinHash-LSH near-duplicates")
    threshold: float = Field(0.7, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets")
    num_perm: int = Field(128, ge=8, le=1024)
    seed: int = Field(1, ge=0)
    shingle: Literal["auto", "word", "char"] = Field(
        "auto", description="auto: per document, character n-grams for text mostly in a script written without "
        "spaces (CJK, Thai, ...), word n-grams otherwise; the count of each is in the stage stats")
    ngram: int = Field(5, ge=1, description="words (or characters) per shingle")
    shingle_hash: Literal["xxh32-words", "xxh32", "sha1"] = "xxh32-words"
    false_positive_weight: float = Field(0.2, ge=0.0, le=1.0, description="LSH tuning; verification removes FPs")
    false_negative_weight: float = Field(0.8, ge=0.0, le=1.0, description="LSH tuning: favour recall")
    bands: int | None = Field(None, ge=1, description="override datasketch's optimal bands")
    rows: int | None = Field(None, ge=1, description="override datasketch's optimal rows per band")
    verify: bool = Field(True, description="keep a fuzzy edge only if exact Jaccard >= threshold")
    components: Literal["auto", "driver", "partitioned"] = Field(
        "auto", description="where verification, connected components and representatives run: on Ray tasks over "
        "`partitions` key partitions (no process holds all documents or edges), or on the driver (faster for "
        "small inputs); auto: the driver up to `driver_max_docs` input documents. The output is the same")
    partitions: int = Field(4, ge=1, description="hash partitions of the LSH buckets and, for the partitioned "
                            "components, of the documents: one Ray task each, holding about 1/P of the keys")
    driver_max_docs: int = Field(100_000, ge=0, description="auto: the largest input done on the driver")
    keep: Literal["earliest_crawl", "longest_text", "lowest_id"] = "earliest_crawl"
    lines: LineDedupConfig = Field(LineDedupConfig(), description="line/paragraph dedup after document dedup")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        bands, rows = self.lsh()
        if bands * rows > self.num_perm:
            raise ValueError(f"dedup.bands × dedup.rows = {bands * rows} exceeds dedup.num_perm = {self.num_perm}")
        return self

    def lsh(self) -> tuple[int, int]:
        """(bands, rows): datasketch's optimum for the weights, or the overrides (one derived from the other)."""
        bands, rows = lsh_params(self.threshold, self.num_perm, self.false_positive_weight,
                                 self.false_negative_weight)
        if self.bands or self.rows:
            bands = self.bands or self.num_perm // (self.rows or rows)
            rows = self.rows or self.num_perm // bands
        return bands, rows

    def methods(self) -> list[str]:
        """The enabled methods, in the order clusters are labelled."""
        return [method for method in METHODS if getattr(self, method)]

    def shingle_kind(self, text: str) -> str:
        """`word` or `char`: the configured kind, or with `auto` the one `minhash.shingle_kind` picks for `text`."""
        return shingle_kind(text) if self.shingle == "auto" else self.shingle

    def shingles(self, text: str) -> list[bytes]:
        """The shingles MinHash and verification use for `text`."""
        if self.shingle_kind(text) == "word":
            return word_shingles(text, self.ngram)
        return char_shingles(text, self.ngram)


METHODS = ("exact", "url", "fuzzy")


def _false_positive(threshold: float, bands: int, rows: int) -> float:
    """Probability mass of pairs below `threshold` that share a band: ∫_0^t 1 - (1 - s^r)^b ds."""
    return float(quad(lambda s: 1 - (1 - s ** rows) ** bands, 0.0, threshold)[0])


def _false_negative(threshold: float, bands: int, rows: int) -> float:
    """Probability mass of pairs at or above `threshold` that share no band: ∫_t^1 (1 - s^r)^b ds."""
    return float(quad(lambda s: (1 - s ** rows) ** bands, threshold, 1.0)[0])


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight · P(false positive) + fn_weight · P(false negative), integrated over
    Jaccard similarity (the method datasketch's MinHashLSH uses; equal to it when the weights sum to 1)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if fp_weight < 0 or fn_weight < 0 or fp_weight + fn_weight <= 0:
        raise ValueError(f"weights must be non-negative and not both 0, got {fp_weight} and {fn_weight}")
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            error = (fp_weight * _false_positive(threshold, bands, rows)
                     + fn_weight * _false_negative(threshold, bands, rows))
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A (documents × bands) uint64 key per band: a mixed polynomial hash of its `rows` signature values.

    Two documents share a band key iff (barring a 2^-64 collision) their signatures agree on that band.
    """
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"{bands} bands × {rows} rows exceed {signatures.shape[1]} permutations")
    keys = np.zeros((signatures.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
        value = np.full(signatures.shape[0], np.uint64(band + 1), dtype=np.uint64)
        for column in range(rows):
            value = (value * _BAND_MULTIPLIER) ^ (block[:, column] + np.uint64(column))
        high = fmix32((value >> np.uint64(32)).astype(np.uint32)).astype(np.uint64)
        low = fmix32((value & np.uint64(0xFFFFFFFF)).astype(np.uint32)).astype(np.uint64)
        keys[:, band] = (high << np.uint64(32)) | low
    return keys


def star_edges(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Candidate edges (k × 2, smallest id first) linking each bucket's smallest id to every other member.

    `keys[i]` is the bucket of document `ids[i]`; a bucket of m documents yields m - 1 edges, not m².
    """
    if keys.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((ids, keys))
    sorted_keys, sorted_ids = keys[order], ids[order].astype(np.int64)
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(sorted_keys)), 0))
    heads = sorted_ids[group_start]
    members = ~starts & (sorted_ids != heads)
    return np.unique(np.stack([heads[members], sorted_ids[members]], axis=1), axis=0)


class UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member (deterministic)."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size, dtype=np.int64)

    def find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    def union(self, first: int, second: int) -> None:
        root_a, root_b = self.find(first), self.find(second)
        if root_a != root_b:
            low, high = min(root_a, root_b), max(root_a, root_b)
            self.parent[high] = low

    def labels(self) -> np.ndarray:
        """Component label (its smallest member) of every node."""
        return np.array([self.find(node) for node in range(len(self.parent))], dtype=np.int64)


def connected_components(size: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """Labels of the connected components of an undirected graph on 0..size-1."""
    forest = UnionFind(size)
    for first, second in edges:
        forest.union(int(first), int(second))
    return forest.labels()


def verify_edges(
    edges: np.ndarray, shingles: Sequence[set[bytes]] | Mapping[int, set[bytes]], threshold: float
) -> list[tuple[int, int, float]]:
    """Keep a candidate edge only when the exact Jaccard similarity of its two shingle sets ≥ threshold.

    This is what stops a chain of near-misses (A~B~C with A and C far apart) from merging through
    MinHash estimation noise: only edges that are truly similar enter the components.
    """
    kept = []
    for first, second in edges:
        similarity = jaccard(shingles[int(first)], shingles[int(second)])
        if similarity >= threshold:
            kept.append((int(first), int(second), similarity))
    return kept


def normalise_url(url: str | None) -> str | None:
    """Lower-case scheme and host, default port and fragment dropped, empty path as '/'."""
    if not url:
        return None
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port and parts.port != _DEFAULT_PORTS.get(scheme) else ""
    return urlunsplit((scheme, host + port, parts.path or "/", parts.query, ""))


KEEP_RULES = ("earliest_crawl", "longest_text", "lowest_id")


def representative_order(rule: str, doc_id: str, length: int, crawl_date: object) -> tuple:
    """Sort key: the smallest sorts first and is kept; ties fall back to the lowest doc id."""
    if rule == "earliest_crawl":
        return (crawl_date is None, str(crawl_date or ""), doc_id)
    if rule == "longest_text":
        return (-length, doc_id)
    if rule == "lowest_id":
        return (doc_id,)
    raise ValueError(f"unknown keep rule {rule!r}; choose one of {KEEP_RULES}")


@dataclass(frozen=True)
class DocInfo:
    """What clustering needs of one document that has an edge."""

    doc_id: str
    text: str
    crawl_date: datetime | None
    url: str | None


# the audit table (`duplicates.parquet`): one row per removed document
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("representative_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float64()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("cluster_size", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True)
class RemovedDoc:
    """One audit row of `duplicates.parquet`: a removed document and the representative it duplicates."""

    doc_id: str
    cluster_id: str
    representative_id: str
    similarity: float
    method: str
    cluster_size: int


def cluster_rows(clusters: Iterable[Sequence[int]], info: Mapping[int, DocInfo], config: DedupConfig
                 ) -> tuple[list[RemovedDoc], list[int]]:
    """Per cluster (document keys), keep the representative by `config.keep`; audit rows and removed keys."""
    rows: list[RemovedDoc] = []
    removed: list[int] = []
    shingle_sets: dict[int, set[bytes]] = {}

    def shingle_set(key: int) -> set[bytes]:
        if key not in shingle_sets:
            shingle_sets[key] = set(config.shingles(info[key].text))
        return shingle_sets[key]

    def rank(key: int) -> tuple[Any, ...]:
        doc = info[key]
        return representative_order(config.keep, doc.doc_id, len(doc.text), doc.crawl_date)

    for keys in clusters:
        if len(keys) < 2:
            continue
        ranked = sorted(keys, key=rank)
        keep, cluster_id = info[ranked[0]], min(info[k].doc_id for k in keys)
        for key in ranked[1:]:
            doc = info[key]
            same_text = normalise_text(doc.text) == normalise_text(keep.text)
            url = normalise_url(doc.url)
            method = "exact" if same_text else "url" if url is not None and url == normalise_url(keep.url) else "fuzzy"
            similarity = 1.0 if same_text else jaccard(shingle_set(key), shingle_set(ranked[0]))
            rows.append(RemovedDoc(doc.doc_id, cluster_id, keep.doc_id, similarity, method, len(keys)))
            removed.append(key)
    rows.sort(key=lambda row: row.doc_id)
    return rows, removed
