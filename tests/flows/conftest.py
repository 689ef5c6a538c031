"""Fixtures of the flow tests: one tokenize + pretrain run (tiny model, 2 Ray Train workers) shared by the session,
used by the pretrain tests and as the base model of the finetune tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.config import RunConfig, parse_config
from tests.conftest import reference_documents, write_corpus_stage


def make_config(run_dir: Path, seq_len: int = 32, **pretrain: Any) -> RunConfig:
    return parse_config({
        "name": "pretrain-test", "run_dir": str(run_dir), "ray": {"num_cpus": 2},
        "ingest": {"inputs": ["unused.jsonl"]},
        "tokenize": {"vocab_size": 512, "seq_len": seq_len, "holdout": 0.1, "windows_per_shard": 50},
        "pretrain": {"model": {"preset": "tiny", "dim": 64, "n_layers": 2, "ffn_dim": 160, "max_seq_len": 128},
                     "steps": 24, "micro_batch": 4, "lr": 5e-3, "warmup_steps": 4, "num_workers": 2,
                     "checkpoint_every": 8, "eval_every": 8, "eval_windows": 16, "keep_last": 2,
                     "max_failures": 1, **pretrain},
    })


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus_stage(tmp_path_factory.mktemp("corpus") / "filter-test", reference_documents(120))


@pytest.fixture(scope="session")
def pretrained_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: None,
                  ray_local: None) -> dict[str, Any]:
    from flows.pretrain import pretrain_flow
    from flows.tokenize import tokenize_flow

    config = make_config(tmp_path_factory.mktemp("run"))
    tokens = tokenize_flow(config, str(corpus))
    trained = pretrain_flow(config, tokens["path"])
    return {"config": config, "tokens": tokens, "trained": trained}


