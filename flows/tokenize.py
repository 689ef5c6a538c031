"""The `tokenize` stage: BPE on the curated corpus, documents tokenised on Ray, packed into windows.

Output `<run_dir>/tokenize-<hash>/`: `tokenizer/` (tokenizer.json + transformers files), `tokens/` (the
window shards and `index.json`), the manifest and `_SUCCESS`. Per-shard streams live in `streams/` while the
stage runs, so a rerun after a crash re-tokenises only unfinished shards; they are removed on publish.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from dataprep.stage import DATA_DIR, TOKENIZER_DIR, TOKENS_DIR, StageDir, file_digest
from dataprep.tokenize.packing import write_index
from dataprep.tokenize.tokenizer import TOKENIZER_FILE, copy_hf_files, load_tokenizer
from flows.config import RunConfig
from flows.stage import Computed, StageInputs, StageResult, StageSpec, stage_flow
from workers.tokenize import (
    STREAMS_DIR,
    pack_task,
    retried_shards,
    tokenize_shard_task,
    train_tokenizer_task,
)


def tokenizer_file(config: RunConfig) -> Path | None:
    """The configured tokenizer.json (or None: train one)."""
    path = config.tokenize.tokenizer
    if path is None:
        return None
    return path / TOKENIZER_FILE if path.is_dir() else path


class TokenizeStage(StageSpec):
    """Curated documents → a byte-level BPE tokenizer and packed train/held-out token windows."""

    name = "tokenize"
    code_version = "tokenize-2"  # 2: the tokenizer files carry the chat template
    upstream = "filter"
    output_names = (TOKENIZER_DIR, TOKENS_DIR)

    def resolve_inputs(self, config: RunConfig, upstream: StageDir | None) -> StageInputs:
        inputs = super().resolve_inputs(config, upstream)
        sources = sorted((upstream.path / DATA_DIR).glob("*.parquet")) if upstream is not None else []
        return StageInputs(inputs.keys, inputs.manifest, upstream, sources)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        params = config.tokenize.model_dump(mode="json")
        existing = tokenizer_file(config)
        if existing is not None:
            params["tokenizer_fingerprint"] = file_digest(existing)
        return params

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        """Fail before any work: no documents, or a tokenizer file that is missing or lacks end-of-text."""
        documents = sum(pq.ParquetFile(source).metadata.num_rows for source in inputs.payload)
        if documents == 0:
            raise ValueError("tokenize: the upstream stage has no documents (empty corpus); nothing to train on")
        existing = tokenizer_file(config)
        if existing is not None:
            load_tokenizer(existing, config.tokenize.eot_token)

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """Tokenizer (train or copy), per-shard tokenisation on Ray, packing."""
        sources = [str(source) for source in inputs.payload]
        settings = config.tokenize
        tokenizer_dir = stage.path / TOKENIZER_DIR
        if not (tokenizer_dir / TOKENIZER_FILE).is_file():
            existing = tokenizer_file(config)
            if existing is None:
                max_length = config.pretrain.model.max_seq_len or settings.seq_len
                ray.get(train_tokenizer_task.remote(sources, str(tokenizer_dir), settings.vocab_size,
                                                    settings.min_frequency, settings.eot_token, max_length))
            else:
                copy_hf_files(existing, tokenizer_dir, settings.eot_token)
        tokenizer, eot_id = load_tokenizer(tokenizer_dir, settings.eot_token)
        stream_dir = stage.path / STREAMS_DIR
        stream_dir.mkdir(exist_ok=True)
        counts = ray.get([tokenize_shard_task.remote(source, index, str(tokenizer_dir), str(stream_dir),
                                                     settings.holdout, settings.eot_token)
                          for index, source in enumerate(sources)])
        vocab_size = tokenizer.get_vocab_size()
        packed = ray.get(pack_task.remote(str(stream_dir), str(stage.path / TOKENS_DIR), len(sources),
                                          settings.seq_len, vocab_size, settings.windows_per_shard))
        for split, part in packed["splits"].items():
            part["documents"] = sum(c[split]["documents"] for c in counts)
            part["document_tokens"] = sum(c[split]["document_tokens"] for c in counts)
            if part["documents"] + part["document_tokens"] != part["stream_tokens"]:
                raise RuntimeError(f"tokenize: {split} token counts do not add up: {part}")
        index = {"seq_len": settings.seq_len, "vocab_size": vocab_size, "eot_id": eot_id,
                 "eot_token": settings.eot_token, "dtype": "uint16" if vocab_size <= 2**16 else "uint32", **packed}
        write_index(stage.path / TOKENS_DIR, index)
        return Computed({**tokenize_stats(index), "recovery": {"shards_retried": retried_shards(stream_dir)}})

    def finish(self, config: RunConfig, stage: StageDir, inputs: StageInputs, computed: Computed) -> Computed:
        shutil.rmtree(stage.path / STREAMS_DIR, ignore_errors=True)
        return computed

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"tokenizer": {"path": TOKENIZER_DIR}, "tokens": {"path": TOKENS_DIR, "index": "index.json"}}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        return {"tasks": "BPE training, one per shard, packing", "CPU per task": 1}

    def summary(self, result: StageResult) -> list[str]:
        stats = result["stats"]
        return [f"{stats['train_tokens']:,} train + {stats['val_tokens']:,} held-out tokens → "
                f"{stats['train_windows']:,} + {stats['val_windows']:,} windows of {stats['seq_len']}; "
                f"vocab {stats['vocab_size']:,}; unigram held-out loss {stats['unigram_val_loss']}"]


def tokenize_stats(index: dict[str, Any]) -> dict[str, Any]:
    """The manifest's stats: documents in and out (none are dropped), windows and tokens per split."""
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


TOKENIZE = TokenizeStage()
tokenize_flow = stage_flow(TOKENIZE)
