"""The finetuning loop in one process (a one-rank gloo group, FSDP2 as on Ray Train): full finetuning trains
every parameter and exports as a merged HF model (LoRA and its exact resume: tests/flows/test_finetune_flow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.finetune.examples import IGNORE, PackedRows
from dataprep.tokenize.tokenizer import save_tokenizer, train_bpe
from workers.checkpoint import complete_checkpoints, save_checkpoint
from workers.export import write_hf
from workers.finetune import merged_transformer, save_rows, train
from workers.finetune_config import FinetuneConfig, FinetuneJob
from workers.model import Transformer
from workers.model_config import ModelConfig

CONFIG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


def rows(count: int, seed: int) -> PackedRows:
    generator = np.random.default_rng(seed)
    tokens = generator.integers(0, CONFIG.vocab_size, size=(count, 32))
    targets = np.where(np.arange(32) % 4 == 0, np.roll(tokens, -1, axis=1), IGNORE)  # a quarter are answers
    targets[:, -1] = IGNORE
    segments = np.repeat(np.arange(2), 16)[None].repeat(count, axis=0)
    return PackedRows(tokens, targets, segments)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft")
    model = Transformer(CONFIG)
    model.init_weights(0)
    checkpoint = save_checkpoint(root / "pretrain", 10, model, torch.optim.AdamW(model.parameters()),
                                 {"model": CONFIG.to_dict()}, keep_last=1)
    (root / "data").mkdir()
    save_rows(root / "data" / "train.npz", rows(24, 0))
    save_rows(root / "data" / "val.npz", rows(4, 1))
    return checkpoint, root


def job(base: tuple[Path, Path], out: Path, **settings: object) -> FinetuneJob:
    checkpoint, root = base
    config = FinetuneConfig(data="unused.jsonl", micro_batch=4, lr=5e-3, warmup_steps=1, checkpoint_every=2,
                            keep_last=3, cpus_per_worker=1, **settings)
    return FinetuneJob(config=config, model=CONFIG.to_dict(), base_checkpoint=str(checkpoint),
                       data_dir=str(root / "data"), out_dir=str(out))


def test_full_finetuning_trains_everything_and_merges(base: tuple[Path, Path], tmp_path: Path) -> None:
    spec = job(base, tmp_path / "full", method="full", steps=4)
    last = train(spec)
    total = sum(p.numel() for p in Transformer(CONFIG).parameters())
    assert last["trainable_parameters"] == last["parameters"] == total
    final = complete_checkpoints(tmp_path / "full" / "checkpoints")[-1]
    tuned = merged_transformer(spec, final)
    untouched = Transformer(CONFIG)
    untouched.init_weights(0)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(untouched.named_parameters())[n])]
    assert len(changed) == len(list(untouched.parameters())), "every tensor was trained"
    save_tokenizer(train_bpe(["the cat sat on the mat"] * 20, 300), tmp_path / "tok")
    exported = write_hf(tuned, tmp_path / "tok", tmp_path / "merged")
    assert json.loads((exported / "config.json").read_text())["num_hidden_layers"] == 2
