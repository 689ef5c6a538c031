"""Vector indexes over L2-normalised chunk embeddings (faiss, inner product = cosine), sharded and saved atomically.

Kinds: "flat" (exact), "hnsw" (graph; supports adds natively) and "ivf" (inverted lists; its coarse quantizer
is trained once at build time on all vectors and shared by every shard, so later adds are assigned to those
trained centroids; rebuild after large growth). "auto" picks flat below `exact_below` vectors, else HNSW.
Every shard is wrapped in `IndexIDMap2`, so the ids returned are our int64 row ids (non-negative; -1 marks
a missing result), and ids can be listed.

Sharding rule: a vector goes to shard `mix64(id) % shards` (the splitmix64 finaliser), both at build time
and on `add`, so an index grown by adds holds every id in the same shard, in the same order, as one built at
once from the same vectors in the same order; for flat shards the two therefore answer identically. `search`
queries every shard and merges the per-shard top-k by score, ties broken by the smaller id (exact ties at a
shard's k-th place are cut by faiss before the merge).

HNSW defaults M=32, efConstruction=200, efSearch=64, measured on 20k 384-d vectors against exact search:
recall@10 0.997 for real MiniLM embeddings (Python documentation paragraphs and sentences, 500 held-out
queries) and 1.000 for clustered random unit vectors (efSearch 16: 0.970 / 0.967; 32: 0.990 / 0.998).
Isotropic random unit vectors are no guide: their neighbours are barely nearer than anything else (recall@10
0.48 at efSearch 64, 0.90 at 256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dataprep.rag.chunking import ChunkConfig
from dataprep.shards import atomic_directory, atomic_write_with

Kind = Literal["flat", "hnsw", "ivf"]
META_FILE = "meta.json"
INDEX_FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3
MIN_TRAIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid


class IndexMismatchError(ValueError):
    """An index was built with a different embedding model (or dimension) than the one querying it."""


class IndexConfig(BaseModel):
    """How to build and search the vector index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    exact_below: int = Field(50_000, ge=0, description="auto: flat below this many vectors, else HNSW")
    hnsw_m: int = Field(32, ge=4, le=256)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(64, ge=1)
    ivf_nlist: int | None = Field(None, ge=1, description="None: about 4 * sqrt(n), at most n / 39")
    ivf_nprobe: int = Field(16, ge=1)
    shards: int = Field(1, ge=1)


class IndexMeta(BaseModel):
    """What an index directory holds and which model made its vectors (`meta.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = INDEX_FORMAT_VERSION
    embedding_model: str
    model_fingerprint: str
    dim: int = Field(ge=1)
    normalized: bool = True
    metric: Literal["inner_product"] = "inner_product"
    chunk_config: ChunkConfig
    index_kind: Kind
    index_config: IndexConfig
    index_params: dict[str, int]
    shard_count: int = Field(ge=1)
    vector_count: int = Field(ge=0)


def check_compatible(meta: IndexMeta, model_name: str, fingerprint: str, dim: int | None = None) -> None:
    """Raise `IndexMismatchError` unless the querying model has the index's fingerprint (and dimension).

    Models are compared by fingerprint (content), not by name: the same weights at another path match.
    """
    if meta.model_fingerprint != fingerprint:
        raise IndexMismatchError(
            f"the index was built with embedding model {meta.embedding_model!r} (fingerprint "
            f"{meta.model_fingerprint}) but queries are encoded with {model_name!r} (fingerprint {fingerprint}); "
            "rebuild the index or query it with the model it was built with"
        )
    if dim is not None and dim != meta.dim:
        raise IndexMismatchError(
            f"the index holds {meta.dim}-d vectors from {meta.embedding_model!r} but {model_name!r} gives {dim}-d"
        )


def choose_kind(n: int, config: IndexConfig) -> Kind:
    """The configured kind, or for "auto": flat below `exact_below` vectors, else HNSW."""
    if config.kind != "auto":
        return config.kind
    return "flat" if n < config.exact_below else "hnsw"


def ivf_lists(n: int, config: IndexConfig) -> int:
    """The IVF list count: `ivf_nlist`, or round(4 * sqrt(n)) capped so each list has 39 training points."""
    if config.ivf_nlist is not None:
        if config.ivf_nlist > n:
            raise ValueError(f"ivf_nlist {config.ivf_nlist} exceeds the {n} training vectors")
        return config.ivf_nlist
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_TRAIN_POINTS_PER_LIST))


def resolved_params(kind: Kind, n: int, config: IndexConfig) -> dict[str, int]:
    """The parameters an index of `kind` over `n` vectors is built with."""
    if kind == "hnsw":
        return {"m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction, "ef_search": config.hnsw_ef_search}
    if kind == "ivf":
        nlist = ivf_lists(n, config)
        return {"nlist": nlist, "nprobe": min(config.ivf_nprobe, nlist)}
    return {}


def check_vectors(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous float32 (n, d) unit vectors and their unique non-negative int64 ids, or ValueError."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or ids.ndim != 1 or len(vectors) != len(ids):
        raise ValueError(f"expected (n, d) vectors and n ids, got {vectors.shape} and {ids.shape}")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be non-negative (-1 marks a missing search result)")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        raise ValueError("vectors must be L2-normalised (the index scores by inner product)")
    return vectors, ids


def _inner(index: faiss.Index) -> Any:
    return faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)


def apply_search_params(index: faiss.Index, config: IndexConfig) -> None:
    """Set HNSW efSearch or IVF nprobe from `config` (they are not fixed at build time)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(config.ivf_nprobe, inner.nlist)


def empty_index(dim: int, kind: Kind, params: dict[str, int]) -> faiss.Index:
    """An empty `IndexIDMap2` of `kind` with inner-product metric (IVF still untrained)."""
    factory = {"flat": "Flat", "hnsw": f"HNSW{params.get('m', 32)},Flat", "ivf": f"IVF{params.get('nlist', 1)},Flat"}
    index = faiss.index_factory(dim, f"IDMap2,{factory[kind]}", faiss.METRIC_INNER_PRODUCT)
    inner = _inner(index)
    if kind == "hnsw":
        inner.hnsw.efConstruction = params["ef_construction"]
        inner.hnsw.efSearch = params["ef_search"]
    elif kind == "ivf":
        inner.nprobe = params["nprobe"]
    return index


def _check_trainable(n: int, nlist: int) -> None:
    if n < max(1, nlist):
        raise ValueError(f"an IVF index with {nlist} lists needs at least {nlist} training vectors, got {n}")


def build_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, kind: Kind | None = None) -> faiss.Index:
    """One index over `vectors` (unit rows) with our `ids`; the kind is `choose_kind` unless given."""
    vectors, ids = check_vectors(vectors, ids)
    kind = kind or choose_kind(len(vectors), config)
    params = resolved_params(kind, len(vectors), config)
    index = empty_index(vectors.shape[1], kind, params)
    if kind == "ivf":
        _check_trainable(len(vectors), params["nlist"])
        index.train(vectors)
    index.add_with_ids(vectors, ids)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an `IndexIDMap2`, in insertion order."""
    return faiss.vector_to_array(cast(Any, index).id_map).astype(np.int64)


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id: splitmix64(id) % shards (stable across runs and machines)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id) pairs: higher score first, then smaller id; padded with (-inf, -1)."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=-1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    missing = k - top_ids.shape[1]
    if missing > 0:
        top_scores = np.pad(top_scores, ((0, 0), (0, missing)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, missing)), constant_values=-1)
    top_ids = np.where(np.isneginf(top_scores), -1, top_ids)
    return top_scores, top_ids.astype(np.int64)


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    """`faiss.write_index` to a temporary file, then rename it over `path`."""
    atomic_write_with(Path(path), lambda tmp: faiss.write_index(index, str(tmp)))


@dataclass
class IndexShard:
    """One faiss index (an `IndexIDMap2`) with atomic save and load."""

    index: faiss.Index

    def save(self, path: Path) -> None:
        write_index_atomic(self.index, path)

    @classmethod
    def load(cls, path: Path) -> IndexShard:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no index shard at {path}")
        return cls(faiss.read_index(str(path)))


def shard_file(number: int) -> str:
    """The file name of shard `number` inside an index directory."""
    return f"shard-{number:05d}.faiss"


@dataclass
class ShardedIndex:
    """Shards of one kind; vectors are routed by `shard_of(id)`, searches fan out and merge."""

    shards: list[faiss.Index]
    kind: Kind
    params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig) -> ShardedIndex:
        """`config.shards` shards over `vectors`; IVF trains one quantizer on all vectors for every shard."""
        vectors, ids = check_vectors(vectors, ids)
        kind = choose_kind(len(vectors), config)
        params = resolved_params(kind, len(vectors), config)
        template = empty_index(vectors.shape[1], kind, params)
        if kind == "ivf":
            _check_trainable(len(vectors), params["nlist"])
            template.train(vectors)
        index = cls([faiss.clone_index(template) for _ in range(config.shards)], kind, params)
        index.add(vectors, ids)
        return index

    @property
    def dim(self) -> int:
        return int(self.shards[0].d)

    @property
    def ntotal(self) -> int:
        return sum(int(shard.ntotal) for shard in self.shards)

    def ids(self) -> np.ndarray:
        """Every id held, shard by shard."""
        return np.concatenate([index_ids(shard) for shard in self.shards])

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under new ids, each to shard `shard_of(id)`; an id already present is a ValueError."""
        vectors, ids = check_vectors(vectors, ids)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {self.dim}")
        present = np.isin(ids, self.ids())
        if present.any():
            raise ValueError(f"{int(present.sum())} ids are already indexed, e.g. {int(ids[present][0])}")
        routes = shard_of(ids, len(self.shards))
        for number, shard in enumerate(self.shards):
            mask = routes == number
            if mask.any():
                shard.add_with_ids(vectors[mask], ids[mask])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k): the k best over all shards, padded with (-inf, -1)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        found = [shard.search(queries, min(k, int(shard.ntotal))) for shard in self.shards if shard.ntotal]
        if not found:
            return merge_top_k(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        scores = np.concatenate([part[0] for part in found], axis=1)
        ids = np.concatenate([part[1] for part in found], axis=1)
        return merge_top_k(scores, ids, k)

    def set_search_params(self, config: IndexConfig) -> None:
        """Apply `config`'s efSearch / nprobe to every shard."""
        for shard in self.shards:
            apply_search_params(shard, config)

    def meta(self, model_name: str, fingerprint: str, chunk_config: ChunkConfig, config: IndexConfig) -> IndexMeta:
        """The `IndexMeta` describing this index."""
        return IndexMeta(
            embedding_model=model_name, model_fingerprint=fingerprint, dim=self.dim, chunk_config=chunk_config,
            index_kind=self.kind, index_config=config, index_params=self.params,
            shard_count=len(self.shards), vector_count=self.ntotal,
        )

    def save(self, directory: Path, meta: IndexMeta) -> None:
        """Write `meta.json` and every shard into a temporary directory, then swap it into `directory`."""
        if meta.shard_count != len(self.shards) or meta.vector_count != self.ntotal:
            raise ValueError("meta does not describe this index (shard or vector count differs)")
        with atomic_directory(Path(directory)) as tmp:
            for number, shard in enumerate(self.shards):
                IndexShard(shard).save(tmp / shard_file(number))
            (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))

    @classmethod
    def load(cls, directory: Path, search_config: IndexConfig | None = None) -> tuple[ShardedIndex, IndexMeta]:
        """The index and its meta; search parameters from `search_config`, else those it was built with."""
        directory = Path(directory)
        meta = IndexMeta.model_validate_json((directory / META_FILE).read_text())
        shards = [IndexShard.load(directory / shard_file(number)).index for number in range(meta.shard_count)]
        index = cls(shards, meta.index_kind, dict(meta.index_params))
        if index.ntotal != meta.vector_count:
            raise ValueError(f"{directory}: shards hold {index.ntotal} vectors, meta.json says {meta.vector_count}")
        index.set_search_params(search_config or meta.index_config)
        return index, meta
