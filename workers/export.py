"""Export a training checkpoint as a Hugging Face Llama model directory.

Writes `model.safetensors` (full fp32 state dict; no pickles), a Llama `config.json` and the tokenizer files,
so `transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it.
Parameter names already match `LlamaForCausalLM`; tied embeddings are written once, as HF expects.
The directory is built under a temp name and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import save_file

from dataprep.shards import atomic_write_json
from dataprep.tokenize.tokenizer import EOT_TOKEN, load_tokenizer, save_tokenizer
from workers.checkpoint import load_full_model, read_state
from workers.model import Transformer
from workers.model_config import ModelConfig


def llama_config(config: ModelConfig, eot_id: int) -> dict[str, Any]:
    """`config.json` for transformers' LlamaForCausalLM with our shape."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32", "use_cache": True,
    }


def export_state_dict(model: Transformer) -> dict[str, Any]:
    """Contiguous tensors, tied head left out (HF re-ties it from `tie_word_embeddings`)."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def weights_digest(model: Transformer) -> str:
    """xxh64 over the exported tensors (names sorted, fp32 bytes): the identity of a base model, the same whether
    it was read from a checkpoint or from `model.safetensors`; adapters record it and the server checks it."""
    digest = xxhash.xxh64()
    for name, tensor in sorted(export_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def export_hf(checkpoint: Path, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Checkpoint + tokenizer → a loadable HF model directory at `out_dir`."""
    config = ModelConfig(**read_state(checkpoint)["model"])
    return write_hf(load_full_model(checkpoint, Transformer(config)), tokenizer_dir, out_dir)


def write_hf(model: Transformer, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A model + tokenizer → a loadable HF model directory at `out_dir` (built aside, renamed into place)."""
    config = model.config
    _, eot_id = load_tokenizer(tokenizer_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(export_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "config.json", llama_config(config, eot_id))
    atomic_write_json(tmp / "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eot_id})
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    save_tokenizer(tokenizer, tmp, EOT_TOKEN, config.max_seq_len)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
