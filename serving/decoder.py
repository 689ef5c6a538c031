"""The inference forward pass: the same Llama math as `workers.model.Transformer`, with less work per token.

Decoding one token at batch 1 on a CPU is bound by reading the weights and by Python overhead, not by
FLOPs. `FusedDecoder` therefore:
- fuses q/k/v into one matrix and gate/up into another (2 GEMVs per layer instead of 5, plus o and down);
  the model's own `q_proj`/`k_proj`/... weights become views into the fused matrices, so no weight is
  stored twice and `engine.model(...)` (the reference path the tests recompute with) stays usable;
- looks RoPE cos/sin up in a table built once instead of recomputing them each step;
- multiplies one row by a matrix (batch-1 decode) as an elementwise product summed along rows on CPU:
  PyTorch's CPU wheels use MKL, whose GEMV reads weights at ~13 GB/s on AMD EPYC (1 thread or 2), while
  the product-and-sum runs at 21 GB/s on 1 thread and 30 GB/s on 2 (`benchmarks/serve.py` measures the
  end-to-end effect); fp32 batches of 4+ rows and prefill use oneDNN's GEMM (`linear`), the rest `F.linear`;
- uses `F.rms_norm` and calls no `nn.Module`, so a step is a short list of tensor ops;
- skips the attention mask when every row of a decode step has the same length (one query per row sees
  all its keys), and uses SDPA's causal kernel for a fresh prefill;
- computes single-query (decode) attention on CPU as two batched matmuls (`attention`): CPU SDPA is 7-14x
  slower for one bf16 query per row.

Logits equal the module forward's within float rounding (tests: 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.model import KVCache, Transformer, apply_rope, rope_tables


@dataclass
class FusedLayer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # (q_dim + 2 * kv_dim, dim)
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * ffn_dim, dim)
    down: torch.Tensor


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """One matrix stacking the weights of `linears`; each linear's weight becomes a view of its rows."""
    fused = torch.cat([linear.weight.detach() for linear in linears]).contiguous()
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start:start + rows]
        start += rows
    return fused


def _onednn_linear() -> Any:
    """PyTorch's oneDNN linear op (what `torch.compile` lowers CPU linears to), or None where it is missing."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()
ONEDNN_MIN_ROWS = 4  # below this MKL's fp32 GEMM is as fast or faster on this CPU


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T`. On CPU in fp32: a single row as multiply-and-sum (bandwidth-bound GEMV, see the module
    doc); 4 rows or more through oneDNN, whose fp32 GEMM runs 1.4-2.3x faster than MKL's here (16 rows:
    185 vs 327 µs for a 2,048 x 384 weight; a 200-token prefill: 1.46 vs 3.33 ms)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        if x.numel() == weight.shape[1]:
            return torch.linalg.vecdot(weight, x.reshape(1, -1)).view(*x.shape[:-1], weight.shape[0])
        if ONEDNN_LINEAR is not None and x.numel() >= ONEDNN_MIN_ROWS * weight.shape[1]:
            flat = ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), weight, None, "none", [], "")
            return flat.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              ) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k/v (B, KV, S, D) with grouped heads (head h reads kv head h // (H/KV)).

    One query per row on CPU (a decode step) is two batched matmuls with the softmax in fp32: PyTorch's CPU
    SDPA takes a slow path for a single bf16 query (7-14x slower than these matmuls on this CPU for 16 rows
    of 70-300 keys; equal in fp32). Everything else is `F.scaled_dot_product_attention`."""
    rows, heads, queries, head_dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    if q.device.type != "cpu" or queries != 1 or causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=kv_heads != heads)
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    if k.dtype == torch.float32:
        scores = torch.matmul(grouped, k.transpose(-1, -2))  # (B, KV, H/KV, S)
    else:  # bf16 GEMM on CPU is 2-5x faster with the cached keys (a strided slice) as the left operand
        scores = torch.matmul(k, grouped.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.float() * head_dim ** -0.5
    if mask is not None:  # (B, 1, 1, S): the keys each row may see
        scores = scores.masked_fill(~mask.view(rows, 1, 1, span), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).view(rows, heads, 1, head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight (as `workers.model.RMSNorm` and HF Llama)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class FusedDecoder:
    """`decoder(tokens, cache)` → logits (B, T, V), following the cache protocol of `workers.model.KVCache`."""

    def __init__(self, model: Transformer) -> None:
        config = model.config
        self.config, self.eps = config, config.norm_eps
        self.q_dim, self.kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        backbone = model.model
        with torch.no_grad():
            self.layers = [FusedLayer(
                attn_norm=block.input_layernorm.weight.detach(),
                qkv=_fuse([block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]),
                o=block.self_attn.o_proj.weight.detach(),
                mlp_norm=block.post_attention_layernorm.weight.detach(),
                gate_up=_fuse([block.mlp.gate_proj, block.mlp.up_proj]),
                down=block.mlp.down_proj.weight.detach()) for block in backbone.layers]
        self.embed, self.final_norm = backbone.embed_tokens.weight.detach(), backbone.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        device = self.embed.device
        cos, sin = rope_tables(config.head_dim, torch.arange(config.max_seq_len, device=device), config.rope_theta)
        self.cos, self.sin = cos.to(self.embed.dtype), sin.to(self.embed.dtype)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        batch, new = tokens.shape
        positions = cache.positions(new, tokens.device)
        if int(positions.max()) + 1 > self.config.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B or 1, 1, T, D)
        mask, causal = self._mask(cache, new, tokens.device)
        x = F.embedding(tokens, self.embed)
        for index, layer in enumerate(self.layers):
            x = x + self._attention(index, layer, rms_norm(x, layer.attn_norm, self.eps),
                                    cos, sin, cache, mask, causal)
            gate, up = linear(rms_norm(x, layer.mlp_norm, self.eps),
                              layer.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.down)
        cache.advance(new)
        return linear(rms_norm(x, self.final_norm, self.eps), self.lm_head)

    def _attention(self, index: int, layer: FusedLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: Any, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, new, _ = x.shape
        head_dim = self.config.head_dim
        q, k, v = linear(x, layer.qkv).split((self.q_dim, self.kv_dim, self.kv_dim), dim=-1)
        q = apply_rope(q.view(batch, new, -1, head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(batch, new, -1, head_dim).transpose(1, 2), cos, sin)
        k, v = cache.update(index, k, v.view(batch, new, -1, head_dim).transpose(1, 2))
        out = attention(q, k, v, mask, causal)
        return linear(out.transpose(1, 2).reshape(batch, new, -1), layer.o)

    @torch.no_grad()
    def mixed_step(self, last_tokens: list[int], cache: Any, prompts: list[list[int]], all_logits: list[bool],
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[KVCache]]:
        """One forward pass over the next token of every running row *and* the prompts of newly admitted
        requests (continuous batching with prefill folded into the decode step, as vLLM schedules it).

        The tokens are flattened into one sequence for the matmuls, so the weights are read once per step
        however many requests join; attention runs per segment: the running rows against `cache` (a
        `serving.kv_cache.BatchKVCache`), each prompt causally against its own fresh `KVCache`.
        Returns (logits of the running rows (R, V) or None, per prompt its logits (all positions when
        `all_logits[i]`, else the last one), per prompt its filled cache).
        """
        device, head_dim = self.embed.device, self.config.head_dim
        rows, lengths = len(last_tokens), [len(p) for p in prompts]
        if any(length > self.config.max_seq_len for length in lengths):
            raise ValueError(f"prompt exceeds max_seq_len {self.config.max_seq_len}")
        tokens = torch.tensor(last_tokens + [t for p in prompts for t in p], device=device)
        position_parts = [cache.lengths] if rows else []
        position_parts += [torch.arange(length, device=device) for length in lengths]
        positions = torch.cat(position_parts)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (T, 1, D)
        fresh = [KVCache(self.config, 1, length, device, self.embed.dtype) for length in lengths]
        mask, causal = self._mask(cache, 1, device) if rows else (None, False)
        x = F.embedding(tokens, self.embed)  # (T, dim)
        for index, layer in enumerate(self.layers):
            q, k, v = linear(rms_norm(x, layer.attn_norm, self.eps), layer.qkv).split(
                (self.q_dim, self.kv_dim, self.kv_dim), dim=-1)
            q = apply_rope(q.view(len(tokens), -1, head_dim), cos, sin)
            k = apply_rope(k.view(len(tokens), -1, head_dim), cos, sin)
            v = v.view(len(tokens), -1, head_dim)
            outputs = []
            if rows:  # (R, H, 1, D) against each row's cached keys
                keys, values = cache.update(index, k[:rows, :, None], v[:rows, :, None])
                outputs.append(attention(q[:rows, :, None], keys, values, mask, causal)[:, :, 0])
            start = rows
            for length, own in zip(lengths, fresh, strict=True):
                part = slice(start, start + length)
                keys, values = own.update(index, k[part].transpose(0, 1)[None], v[part].transpose(0, 1)[None])
                out = attention(q[part].transpose(0, 1)[None], keys, values, None, True)
                outputs.append(out[0].transpose(0, 1))
                start += length
            x = x + linear(torch.cat(outputs).reshape(len(tokens), -1), layer.o)
            gate, up = linear(rms_norm(x, layer.mlp_norm, self.eps), layer.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.down)
        if rows:
            cache.advance(1)
        for length, own in zip(lengths, fresh, strict=True):
            own.advance(length)
        return self._mixed_logits(x, rows, lengths, all_logits) + (fresh,)

    def _mixed_logits(self, x: torch.Tensor, rows: int, lengths: list[int], all_logits: list[bool],
                      ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The lm-head over only the positions asked for: each running row, each prompt's last (or every)."""
        wanted, spans, start = list(range(rows)), [], rows
        for length, every in zip(lengths, all_logits, strict=True):
            first = len(wanted)
            wanted += list(range(start, start + length)) if every else [start + length - 1]
            spans.append(slice(first, len(wanted)))
            start += length
        logits = linear(rms_norm(x[wanted], self.final_norm, self.eps), self.lm_head)
        logits = logits.float()  # sampling and argmax in fp32 (a bf16 argmax is ~5x slower on CPU)
        return (logits[:rows] if rows else None), [logits[span] for span in spans]

    @staticmethod
    def _mask(cache: Any, new: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attention mask, is_causal): none needed for one query per row over equal lengths."""
        uniform = getattr(cache, "uniform_length", None)
        length = cache.length if hasattr(cache, "length") else uniform() if uniform else None
        if length == 0:
            return None, True  # a fresh prefill: plain causal attention over the new block
        if new == 1 and length is not None:
            return None, False  # each row's single query sees every key of that row
        return cache.attention_mask(new, device), False
