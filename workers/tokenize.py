"""Ray side of tokenization: train the BPE, tokenise document shards in parallel, pack windows.

- `train_tokenizer_task` reads the curated shards' text and trains the byte-level BPE on a worker node.
- `tokenize_shard_task` (one per input shard, retried by Ray) encodes a shard and writes its train and
  held-out streams (`streams/<split>-<shard>.npy`, each document followed by end-of-text) plus a small
  count file; a finished shard is skipped on a rerun.
- `pack_task` reads the streams in shard order and cuts the fixed windows (`dataprep.tokenize.packing`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from dataprep.shards import atomic_write_json
from dataprep.tokenize.packing import (
    SPLITS,
    SplitPacker,
    held_out,
    join_documents,
    save_npy_atomic,
    token_dtype,
    unigram_loss,
)
from dataprep.tokenize.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from workers.drill import attempt, retried

STREAMS_DIR = "streams"


def iter_texts(sources: list[str], batch_rows: int = 1024):
    """Texts of Parquet shards, in order, read a batch at a time."""
    for source in sources:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=["text"]):
            yield from batch.column("text").to_pylist()


@ray.remote(num_cpus=1, max_retries=2)
def train_tokenizer_task(sources: list[str], out_dir: str, vocab_size: int, min_frequency: int, eot_token: str,
                         max_length: int) -> str:
    """Train the BPE on the shards' text and save it (with the transformers files) under `out_dir`."""
    tokenizer = train_bpe(iter_texts(sources), vocab_size, min_frequency, eot_token)
    return str(save_tokenizer(tokenizer, Path(out_dir), eot_token, max_length))


def retried_shards(stream_dir: Path) -> int:
    """Shards Ray encoded more than once (after a lost worker or node)."""
    return retried(stream_dir)


def shard_marker(stream_dir: Path, shard_index: int) -> Path:
    return stream_dir / f"counts-{shard_index:05d}.json"


def _stream_paths(stream_dir: Path, shard_index: int) -> dict[str, Path]:
    return {split: stream_dir / f"{split}-{shard_index:05d}.npy" for split in SPLITS}


@ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")
def tokenize_shard_task(source: str, shard_index: int, tokenizer_dir: str, stream_dir: str, holdout: float,
                        eot_token: str) -> dict[str, Any]:
    """Encode one shard into a train and a held-out stream; returns per-split document and token counts."""
    directory = Path(stream_dir)
    marker = shard_marker(directory, shard_index)
    if marker.is_file():
        return json.loads(marker.read_text())
    attempt(marker)  # a rerun after a lost worker or node is counted (`retried_shards`)
    tokenizer, eot_id = load_tokenizer(Path(tokenizer_dir), eot_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    table = pq.read_table(source, columns=["doc_id", "text"])
    ids, texts = table.column("doc_id").to_pylist(), table.column("text").to_pylist()
    encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    counts: dict[str, Any] = {}
    for split, path in _stream_paths(directory, shard_index).items():
        wanted = split == "val"
        chosen = [tokens for doc_id, tokens in zip(ids, encoded, strict=True) if held_out(doc_id, holdout) == wanted]
        save_npy_atomic(path, join_documents(chosen, eot_id, dtype))
        counts[split] = {"documents": len(chosen), "document_tokens": sum(len(t) for t in chosen)}
    atomic_write_json(marker, counts)
    return counts


@ray.remote(num_cpus=1, max_retries=2)
def pack_task(stream_dir: str, out_dir: str, shard_count: int, seq_len: int, vocab_size: int,
              windows_per_shard: int) -> dict[str, Any]:
    """Cut each split's streams (in shard order) into windows; returns the index's per-split part."""
    streams, directory = Path(stream_dir), Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    splits: dict[str, Any] = {}
    train_counts = np.zeros(vocab_size, dtype=np.int64)
    val_tokens: list[np.ndarray] = []
    for split in SPLITS:
        packer = SplitPacker(directory, split, seq_len, dtype, windows_per_shard)
        for index in range(shard_count):
            stream = np.load(_stream_paths(streams, index)[split], allow_pickle=False)
            packer.add(stream)
            if split == "train":
                train_counts += np.bincount(stream, minlength=vocab_size)
            else:
                val_tokens.append(stream)
        splits[split] = packer.finish()
    val_stream = np.concatenate(val_tokens) if val_tokens else np.zeros(0, dtype=dtype)
    return {"splits": splits, "unigram_val_loss": unigram_loss(train_counts, val_stream)}
