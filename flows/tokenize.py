"""The `tokenize` Prefect flow: BPE on the curated corpus, documents tokenised on Ray, packed into windows.

Output `<run_dir>/tokenize-<hash>/`: `tokenizer/` (tokenizer.json + transformers files), `tokens/` (the
window shards and `index.json`), the manifest and `_SUCCESS`. Per-shard streams live in `streams/` while the
stage runs, so a rerun after a crash re-tokenises only unfinished shards; they are removed on publish.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import xxhash
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dataprep.ingest import DATA_DIR
from dataprep.packing import write_index
from dataprep.stage import StageDir, package_version, stage_hash
from dataprep.tokenizer import TOKENIZER_FILE, copy_hf_files, load_tokenizer
from flows.common import (
    complete_upstream,
    completed_stage_result,
    connect_ray,
    publish_artifact,
    stage_manifest,
    stage_task_options,
)
from flows.config import RunConfig
from workers.tokenize import (
    STREAMS_DIR,
    TOKENIZER_DIR,
    TOKENS_DIR,
    pack_task,
    tokenize_shard_task,
    train_tokenizer_task,
)

STAGE = "tokenize"
CODE_VERSION = "tokenize-1"


def tokenizer_file(config: RunConfig) -> Path | None:
    path = config.tokenize.tokenizer
    if path is None:
        return None
    return path / TOKENIZER_FILE if path.is_dir() else path


def tokenize_params(config: RunConfig) -> dict[str, Any]:
    params = config.tokenize.model_dump(mode="json")
    existing = tokenizer_file(config)
    if existing is not None:
        params["tokenizer_fingerprint"] = xxhash.xxh64_hexdigest(existing.read_bytes())
    return params


def check_inputs(config: RunConfig, sources: list[Path]) -> None:
    """Fail before any work: no documents, or a tokenizer file that is missing or lacks end-of-text."""
    documents = sum(pq.ParquetFile(source).metadata.num_rows for source in sources)
    if documents == 0:
        raise ValueError("tokenize: the upstream stage has no documents (empty corpus); nothing to train on")
    existing = tokenizer_file(config)
    if existing is not None:
        load_tokenizer(existing, config.tokenize.eot_token)


@task(name="tokenize-and-pack", cache_policy=NO_CACHE)
def tokenize_task(config: RunConfig, sources: list[str], stage_path: str) -> dict[str, Any]:
    """Tokenizer (train or copy), per-shard tokenisation on Ray, packing; returns the index."""
    get_run_logger().info("Ray: %s", connect_ray(config))
    settings, stage = config.tokenize, Path(stage_path)
    tokenizer_dir = stage / TOKENIZER_DIR
    if not (tokenizer_dir / TOKENIZER_FILE).is_file():
        existing = tokenizer_file(config)
        if existing is None:
            ray.get(train_tokenizer_task.remote(sources, str(tokenizer_dir), settings.vocab_size,
                                                settings.min_frequency, settings.eot_token,
                                                config.pretrain.model.max_seq_len or settings.seq_len))
        else:
            copy_hf_files(existing, tokenizer_dir, settings.eot_token)
    tokenizer, eot_id = load_tokenizer(tokenizer_dir, settings.eot_token)
    stream_dir = stage / STREAMS_DIR
    stream_dir.mkdir(exist_ok=True)
    counts = ray.get([tokenize_shard_task.remote(source, index, str(tokenizer_dir), str(stream_dir),
                                                 settings.holdout, settings.eot_token)
                      for index, source in enumerate(sources)])
    vocab_size = tokenizer.get_vocab_size()
    packed = ray.get(pack_task.remote(str(stream_dir), str(stage / TOKENS_DIR), len(sources), settings.seq_len,
                                      vocab_size, settings.windows_per_shard))
    for split, part in packed["splits"].items():
        part["documents"] = sum(c[split]["documents"] for c in counts)
        part["document_tokens"] = sum(c[split]["document_tokens"] for c in counts)
        if part["documents"] + part["document_tokens"] != part["stream_tokens"]:
            raise RuntimeError(f"tokenize: {split} token counts do not add up: {part}")
    index = {"seq_len": settings.seq_len, "vocab_size": vocab_size, "eot_id": eot_id,
             "eot_token": settings.eot_token, "dtype": "uint16" if vocab_size <= 2**16 else "uint32", **packed}
    write_index(stage / TOKENS_DIR, index)
    return index


def tokenize_stats(index: dict[str, Any]) -> dict[str, Any]:
    train, val = index["splits"]["train"], index["splits"]["val"]
    documents = train["documents"] + val["documents"]
    return {
        "records_in": documents, "records_out": documents, "dropped": {},
        "vocab_size": index["vocab_size"], "seq_len": index["seq_len"],
        "train_windows": train["windows"], "val_windows": val["windows"],
        "train_tokens": train["stream_tokens"], "val_tokens": val["stream_tokens"],
        "tail_tokens": train["tail_tokens"] + val["tail_tokens"],
        "unigram_val_loss": round(index["unigram_val_loss"], 4),
    }


@flow(name="tokenize", log_prints=True)
def tokenize_flow(config: RunConfig, upstream_path: str) -> dict[str, Any]:
    """Tokenise a complete upstream stage (normally filter) into `<run_dir>/tokenize-<hash>/`."""
    started = time.time()
    upstream = complete_upstream(upstream_path, STAGE)
    sources = sorted((upstream.path / DATA_DIR).glob("*.parquet"))
    check_inputs(config, sources)
    code = f"{package_version()}/{CODE_VERSION}"
    stage = StageDir.for_stage(config.run_dir, STAGE, stage_hash(STAGE, tokenize_params(config), [upstream.name], code))
    if (done := completed_stage_result(stage)) is not None:
        return done
    stage.prepare()
    index = tokenize_task.with_options(**stage_task_options(config))(config, [str(s) for s in sources],
                                                                       str(stage.path))
    shutil.rmtree(stage.path / STREAMS_DIR, ignore_errors=True)
    stats = tokenize_stats(index)
    outputs = {"tokenizer": {"path": TOKENIZER_DIR}, "tokens": {"path": TOKENS_DIR, "index": "index.json"}}
    manifest = stage_manifest(stage, STAGE, code, tokenize_params(config), upstream, outputs, stats, started)
    stage.publish(manifest)
    publish_artifact(manifest)
    get_run_logger().info("tokenize: %s: %d train + %d held-out windows of %d tokens", stage.path,
                          stats["train_windows"], stats["val_windows"], stats["seq_len"])
    return {"path": str(stage.path), "skipped": False, "stats": stats}
