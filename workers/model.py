"""Decoder-only transformer: RoPE, RMSNorm, SwiGLU, grouped-query attention, PyTorch SDPA.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...)
and RoPE uses the same half-rotation layout, so the HF export (`workers.export`) is a rename-free copy.
`forward` takes an optional `KVCache` for incremental decoding (used by `serving/`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from workers.model_config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Llama does), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim) for the half-rotation layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable to it, e.g. (B or 1, 1, T, D)."""
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


class KVStore(Protocol):
    """The cache protocol of the decoder and of `Transformer.forward`."""

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """Positions of the next `new` tokens: (rows or 1, new)."""
        ...

    def attention_mask(self, new: int, device: torch.device) -> torch.Tensor | None:
        """Which keys each new query may see (None: plain causal over the new block)."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (rows, KV, new, D); return every key/value so far."""
        ...

    def advance(self, new: int) -> None:
        """Mark `new` more positions as filled (after the last layer)."""
        ...

    def uniform_length(self) -> int | None:
        """The length every row has, or None when rows differ."""
        ...


class KVCache:
    """Per-layer key/value tensors of shape (B, kv_heads, T_max, head_dim), all rows filled up to `length`.

    The cache protocol the model uses: `positions(new)`, `attention_mask(new)` (None = plain causal over the
    new block), `update(layer, k, v)` → all keys/values so far, `advance(new)`. `serving.kv_cache` has a
    batch cache with a length per row (continuous batching) that follows the same protocol.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.max_len = max_len

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + new, device=device)[None]

    def attention_mask(self, new: int, device: torch.device) -> torch.Tensor | None:
        if self.length == 0:
            return None
        # new queries see every cached position and the causal part of their own block
        return torch.ones(new, self.length + new, dtype=torch.bool, device=device).tril(diagonal=self.length)

    def advance(self, new: int) -> None:
        self.length += new

    def uniform_length(self) -> int:
        """Every row has the same length (the `workers.decoder.KVStore` protocol)."""
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, beam_index: torch.Tensor) -> None:
        """Keep rows `beam_index` (beam search)."""
        self.keys = [k.index_select(0, beam_index) for k in self.keys]
        self.values = [v.index_select(0, beam_index) for v in self.values]


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows (B, T) of example numbers: each token's position inside its example, and the (B, 1, T, T)
    attention mask that is causal and block-diagonal (no token sees another example)."""
    length = segments.shape[1]
    index = torch.arange(length, device=segments.device).expand_as(segments)
    starts = torch.where(torch.nn.functional.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True), index, 0)
    positions = index - starts.cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return positions, (same & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVStore | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVStore | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Embedding, blocks and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    """The language model. `forward(tokens)` → logits (B, T, V); with `targets` → mean cross-entropy."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False

    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights, residual output projections scaled by 1/sqrt(2·layers), norms at 1."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else self.config.init_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: KVStore | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """`cache`: a `KVCache` (or `serving.kv_cache.BatchKVCache`); the new tokens follow what it holds.
        `segments` (B, T), without a cache: packed examples, numbered in order along each row; a token attends only
        within its own example and RoPE positions restart at each example's first token."""
        new = tokens.shape[1]
        mask = cache.attention_mask(new, tokens.device) if cache is not None else None
        if segments is not None:
            positions, mask = segment_positions_and_mask(segments)
        elif cache is not None:
            positions = cache.positions(new, tokens.device)
        else:
            positions = torch.arange(new, device=tokens.device)[None]
        if int(positions.max()) + 1 > self.config.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        cos, sin = rope_tables(self.config.head_dim, positions, self.config.rope_theta)
        cos, sin = cos[:, None], sin[:, None]  # (B or 1, 1, T, D): broadcast over heads
        x = self.model.embed_tokens(tokens)
        for block in self.model.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(new)
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
