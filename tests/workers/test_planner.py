"""`forgeline plan` arithmetic on cases worked out by hand."""

from __future__ import annotations

import pytest

from workers.model_config import PRESETS, ModelConfig, parameter_count
from workers.planner import PlanInputs, activation_bytes, plan

GIB = 2**30


def test_model_states_are_16_bytes_per_parameter_and_fsdp_divides_them() -> None:
    config = PRESETS["1b"]
    n = parameter_count(config)["total"]
    result = plan(PlanInputs(config, gpus=8, dtype="fp32"))
    replicated, sharded = result["memory_per_gpu"]["replicated"], result["memory_per_gpu"]["fsdp"]
    assert replicated["weights"] + replicated["gradients"] + replicated["adam"] == 16 * n
    assert sharded["weights"] + sharded["gradients"] + sharded["adam"] == pytest.approx(16 * n / 8, abs=8)
    assert sharded["activations"] == replicated["activations"]


def test_chinchilla_flops_and_time() -> None:
    config = PRESETS["125m"]
    n = parameter_count(config)["total"]
    result = plan(PlanInputs(config, gpus=4, dtype="bf16", gpu="H100", mfu=0.5))
    assert result["chinchilla_tokens"] == 20 * n
    assert result["flops_6nd"] == 6 * n * 20 * n
    expected_hours = result["flops_with_attention"] / (4 * 989.5e12 * 0.5) / 3600
    assert result["hours"] == pytest.approx(expected_hours)


def test_activation_formula_small_case() -> None:
    # dim 4, kv_dim 2 (2 kv heads × head_dim 1 ... here head_dim 2, 1 kv head), ffn 8, vocab 10, 2 layers
    config = ModelConfig(vocab_size=10, dim=4, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8, max_seq_len=8)
    per_token_layer = 8 * 4 + 3 * 2 + 4 * 8  # = 70 values
    got = activation_bytes(config, tokens=3, dtype="bf16", checkpointing=False)
    assert got["blocks"] == 3 * per_token_layer * 2 * 2
    assert got["logits"] == 3 * 10 * (2 + 4 + 4)
    checkpointed = activation_bytes(config, tokens=3, dtype="bf16", checkpointing=True)
    assert checkpointed["blocks"] == 3 * 4 * 2 * 2 + 3 * per_token_layer * 2


def test_unknown_gpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="gpu 'TPU'"):
        plan(PlanInputs(PRESETS["tiny"], gpu="TPU"))


def test_planner_does_not_import_torch_or_the_training_loop() -> None:
    """`forgeline plan` answers instantly on a laptop without torch: the planner reads shapes and FLOP tables only."""
    import subprocess
    import sys

    probe = "import sys, workers.planner; print(sorted(m for m in ('torch', 'workers.pretrain') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_lora_prediction_counts_what_peft_trains() -> None:
    from workers.finetune import trainable_model
    from workers.finetune_config import FinetuneConfig
    from workers.model import Transformer
    from workers.model_config import ModelConfig
    from workers.planner import finetune_state_bytes

    config = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32)
    targets = ("q_proj", "v_proj", "down_proj")
    model = trainable_model(FinetuneConfig(lora={"rank": 4, "target_modules": targets}), Transformer(config), 0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    predicted = finetune_state_bytes(config, "lora", 4, targets)
    assert predicted["trainable_parameters"] == trained == 2 * 4 * ((64 + 64) + (64 + 32) + (160 + 64))
    assert predicted["optimizer_and_gradients"] == 12 * trained
    full = finetune_state_bytes(config, "full")
    assert full["optimizer_and_gradients"] == 12 * sum(p.numel() for p in Transformer(config).parameters())
