"""Token streams and fixed windows: documents joined by end-of-text, cut into `seq_len + 1` windows.

Layout of a packed directory:
- `<split>-<k>.npy`: a `(windows, seq_len + 1)` array (uint16 when the vocabulary fits, else uint32),
  memory-mapped by the trainer (`np.load(..., mmap_mode="r")`; never pickles).
- `index.json`: per split its shards and counts. Invariant per split:
  `documents + document_tokens == stream_tokens == windows * (seq_len + 1) + tail_tokens`
  (each document contributes its tokens plus one end-of-text). The tail, fewer than `seq_len + 1` tokens
  at the end of the stream, is the only thing not packed.

A document goes to the held-out split when `xxh64(doc_id) / 2**64 < holdout`: stable under reordering and
reruns. Order is the input order (shards sorted, rows in order), so packing is deterministic.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dataprep.shards import atomic_write_json

SPLITS = ("train", "val")
INDEX_FILE = "index.json"


def held_out(doc_id: str, holdout: float) -> bool:
    """True when the document belongs to the held-out split."""
    return xxhash.xxh64_intdigest(doc_id.encode()) < holdout * 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def join_documents(token_lists: Iterable[list[int]], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """One stream: each document's tokens followed by the end-of-text token."""
    pieces = [np.asarray([*ids, eot_id], dtype=dtype) for ids in token_lists]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temp name in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class SplitPacker:
    """Cuts an ordered sequence of streams into windows and writes shards of `windows_per_shard`."""

    directory: Path
    split: str
    seq_len: int
    dtype: np.dtype
    windows_per_shard: int = 4096
    carry: np.ndarray = field(init=False)
    pending: list[np.ndarray] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    stream_tokens: int = 0

    def __post_init__(self) -> None:
        self.carry = np.zeros(0, dtype=self.dtype)

    @property
    def window(self) -> int:
        return self.seq_len + 1

    def add(self, stream: np.ndarray) -> None:
        self.stream_tokens += len(stream)
        data = np.concatenate([self.carry, stream.astype(self.dtype, copy=False)])
        usable = len(data) // self.window * self.window
        if usable:
            self.pending.append(data[:usable].reshape(-1, self.window))
        self.carry = data[usable:]
        while sum(len(p) for p in self.pending) >= self.windows_per_shard:
            self._flush(self.windows_per_shard)

    def _flush(self, count: int) -> None:
        block = np.concatenate(self.pending)
        name = f"{self.split}-{len(self.shards):05d}.npy"
        save_npy_atomic(self.directory / name, np.ascontiguousarray(block[:count]))
        self.shards.append({"file": name, "windows": int(count)})
        rest = block[count:]
        self.pending = [rest] if len(rest) else []

    def finish(self) -> dict[str, Any]:
        remaining = sum(len(p) for p in self.pending)
        if remaining:
            self._flush(remaining)
        windows = sum(s["windows"] for s in self.shards)
        return {"shards": self.shards, "windows": windows, "stream_tokens": self.stream_tokens,
                "tail_tokens": len(self.carry), "packed_tokens": windows * self.window}


def unigram_loss(train_counts: np.ndarray, val_stream: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the held-out tokens under the add-one-smoothed train unigram model."""
    if len(val_stream) == 0:
        return math.nan
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[val_stream.astype(np.int64)]).mean())


def write_index(directory: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(directory / INDEX_FILE, payload)


def read_index(directory: Path) -> dict[str, Any]:
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no packed token index at {path}")
    return json.loads(path.read_text())


class TokenWindows:
    """Random access to the packed windows of one split (memory-mapped shards)."""

    def __init__(self, directory: Path, split: str) -> None:
        index = read_index(directory)
        if split not in index["splits"]:
            raise ValueError(f"{directory}: no split {split!r}")
        self.seq_len = int(index["seq_len"])
        self.shards = [np.load(Path(directory) / s["file"], mmap_mode="r", allow_pickle=False)
                       for s in index["splits"][split]["shards"]]
        self.offsets = np.cumsum([0, *[len(s) for s in self.shards]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, position: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return self.shards[shard][position - self.offsets[shard]]

    def batch(self, positions: Iterable[int]) -> np.ndarray:
        """A `(len(positions), seq_len + 1)` int64 array."""
        return np.stack([np.asarray(self[int(p)], dtype=np.int64) for p in positions])

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self.shards:
            yield from shard
