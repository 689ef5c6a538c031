"""Test helper: a PEFT LoRA adapter for a given base model, with non-zero updates (B drawn at random, so the
adapter changes the logits), saved the way the finetune stage saves one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from workers.export import weights_digest
from workers.finetune_config import LoraSettings
from workers.lora import ADAPTER_INFO
from workers.model import Transformer


def make_adapter(base: Transformer, out_dir: Path, seed: int = 0, std: float = 0.2,
                 targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"), rank: int = 4) -> tuple[Path, torch.nn.Module]:
    """Save an adapter for `base` in `out_dir`; returns the directory and the peft model (for reference logits)."""
    from peft import get_peft_model

    from workers.finetune import lora_config

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(LoraSettings(rank=rank, alpha=2 * rank, dropout=0.0,
                                                                         target_modules=targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(str(out_dir))
    (out_dir / ADAPTER_INFO).write_text(json.dumps({"base_weights_digest": weights_digest(base)}))
    return out_dir, model.eval()
