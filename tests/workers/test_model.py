"""The model: parameter counts, KV-cached decoding, HF Llama parity of the export, checkpoint shape checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dataprep.tokenize.tokenizer import save_tokenizer, train_bpe
from workers.checkpoint import (
    CheckpointMismatch,
    check_compatible,
    complete_checkpoints,
    load_full_model,
    read_journal,
    save_checkpoint,
)
from workers.export import export_hf
from workers.model import KVCache, Transformer
from workers.model_config import PRESETS, ModelConfig, flops_per_token, parameter_count

SMALL = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)


@pytest.mark.parametrize("config", [SMALL, replace(SMALL, tie_embeddings=True), PRESETS["tiny"]])
def test_parameter_count_matches_the_module(config: ModelConfig) -> None:
    model = Transformer(config)
    assert parameter_count(config)["total"] == sum(p.numel() for p in model.parameters())


def test_preset_sizes_are_what_their_names_say() -> None:
    sizes = {name: parameter_count(cfg)["total"] / 1e6 for name, cfg in PRESETS.items()}
    assert 110 < sizes["125m"] < 140 and 300 < sizes["350m"] < 420 and 0.9e3 < sizes["1b"] < 1.4e3
    assert flops_per_token(PRESETS["125m"], 1024) > 6 * parameter_count(PRESETS["125m"])["non_embedding"]


def test_kv_cached_decoding_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    model.init_weights(1)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(SMALL, 2, 16, torch.device("cpu"), torch.float32)
        prefix = model(tokens[:, :7], cache=cache)
        steps = [model(tokens[:, i:i + 1], cache=cache) for i in range(7, 12)]
    incremental = torch.cat([prefix, *steps], dim=1)
    assert torch.allclose(full, incremental, atol=1e-5)


def _checkpoint(tmp_path: Path, config: ModelConfig) -> tuple[Path, Transformer]:
    model = Transformer(config)
    model.init_weights(3)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "ckpt", 5, model, optimizer, {"model": config.to_dict()}, keep_last=2)
    return path, model


@pytest.mark.parametrize("tied", [False, True])
def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path: Path, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = replace(SMALL, tie_embeddings=tied)
    checkpoint, model = _checkpoint(tmp_path, config)
    save_tokenizer(train_bpe(["the cat sat on the mat"] * 20, 300), tmp_path / "tok")
    out = export_hf(checkpoint, tmp_path / "tok", tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"


def test_checkpoint_round_trip_and_shape_mismatch(tmp_path: Path) -> None:
    checkpoint, model = _checkpoint(tmp_path, SMALL)
    loaded = load_full_model(checkpoint, Transformer(SMALL))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    check_compatible(checkpoint, SMALL.to_dict())
    with pytest.raises(CheckpointMismatch, match="dim: checkpoint 64 vs config 96"):
        check_compatible(checkpoint, replace(SMALL, dim=96).to_dict())


def test_journal_keeps_checkpoints_that_keep_last_pruned(tmp_path: Path) -> None:
    model = Transformer(SMALL)
    optimizer = torch.optim.AdamW(model.parameters())
    root = tmp_path / "ckpt"
    for step in (0, 8, 16, 24):
        save_checkpoint(root, step, model, optimizer, {"model": SMALL.to_dict(), "metrics": {"loss": step}}, 2)
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000016", "step-00000024"]
    assert [(e["step"], e["metrics"]["loss"]) for e in read_journal(root)] == [(0, 0), (8, 8), (16, 16), (24, 24)]
    with open(root / "saved.jsonl", "a") as journal:
        journal.write('{"step": 32, "pa')  # a crash mid-line
    assert len(read_journal(root)) == 4


def test_packed_examples_do_not_see_each_other() -> None:
    """A row of three packed examples (and padding) gives each example the logits it has alone."""
    model = Transformer(SMALL)
    model.init_weights(4)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randint(0, SMALL.vocab_size, (n,), generator=generator) for n in (7, 12, 5)]
    tokens = torch.cat([*parts, torch.zeros(4, dtype=torch.long)])[None]
    segments = torch.tensor([0] * 7 + [1] * 12 + [2] * 5 + [-1] * 4)[None]
    with torch.no_grad():
        packed = model(tokens, segments=segments)[0]
        start = 0
        for part in parts:
            alone = model(part[None])[0]
            torch.testing.assert_close(packed[start:start + len(part)], alone, atol=1e-5, rtol=1e-5)
            start += len(part)
        unmasked = model(tokens)[0]
    assert (unmasked[7:19] - packed[7:19]).abs().max() > 1e-3, "without segments the second example sees the first"
