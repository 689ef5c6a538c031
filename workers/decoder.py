"""The one inference forward pass (serving's engine and evaluation alike): the Llama math of
`workers.model.Transformer`, with less work per token. Training keeps the module; parity tests hold the two
together (logits within 1e-5 in fp32).

Decoding one token at batch 1 on a CPU is bound by reading the weights and by Python overhead, not by
FLOPs. `Decoder` therefore:
- fuses q/k/v into one matrix and gate/up into another (2 GEMVs per layer instead of 5, plus o and down);
  the model's own `q_proj`/`k_proj`/... weights become views into the fused matrices, so no weight is
  stored twice and the module forward (the reference the tests recompute with) stays usable;
- looks RoPE cos/sin up in a table built once instead of recomputing them each step;
- runs every call through one layer loop over a flat run of tokens (`_layers`), so the matmuls read the weights
  once per step; only attention differs between a batch of sequences (`__call__`) and a continuous-batching
  step that mixes running rows with newly admitted prompts (`mixed_step`);
- runs fp32 products with large weights (the lm-head, big MLPs) through oneDNN and the rest through `F.linear`
  (`linear`; `F.linear` also where the oneDNN op is missing);
- uses `F.rms_norm` and calls no `nn.Module`, so a step is a short list of tensor ops;
- skips the attention mask when every row of a decode step has the same length, uses SDPA's causal kernel for
  a fresh prefill, and computes single-query attention on CPU as two batched matmuls (`attention`).

The cache a call reads and extends is any `KVStore`: `workers.model.KVCache` (rows of equal length) or
`serving.kv_cache.BatchKVCache` (a length per row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.lora import LoraWeights, TokenGroups, token_groups
from workers.lora import apply as apply_lora
from workers.model import Block, KVCache, KVStore, Transformer, rope_tables

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, q (N, H, D), k (N, KV, D), v (N, KV, D)) → attention output (N, H·D) for a flat run of N tokens."""


@dataclass
class FusedLayer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # (q_dim + 2 * kv_dim, dim)
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * ffn_dim, dim)
    down: torch.Tensor
    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # "qkv"/"o"/"gate_up"/"down" → `prepack`ed


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """One matrix stacking the weights of `linears`; each linear's weight becomes a view of its rows."""
    fused = torch.cat([linear.weight.detach() for linear in linears]).contiguous()
    start = 0
    for linear_module in linears:
        rows = linear_module.weight.shape[0]
        linear_module.weight.data = fused[start:start + rows]
        start += rows
    return fused


def _fused_layer(block: Block) -> FusedLayer:
    """One block's weights as the decoder reads them (q/k/v and gate/up fused)."""
    attn, mlp = block.self_attn, block.mlp
    return FusedLayer(attn_norm=block.input_layernorm.weight.detach(),
                      qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), o=attn.o_proj.weight.detach(),
                      mlp_norm=block.post_attention_layernorm.weight.detach(),
                      gate_up=_fuse([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj.weight.detach())


def _onednn_linear() -> Any:
    """PyTorch's oneDNN linear op (what `torch.compile` lowers CPU linears to), or None where it is missing."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()
ONEDNN_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if ONEDNN_LINEAR is not None else None
PACKED_MIN_ROWS = 2  # products of this many rows or more use a weight's prepacked twin (see `prepack`)
PACK_BATCH_HINT = 16  # the rows oneDNN lays a prepacked weight out for
PACK_MIN_WEIGHT = 2**17  # smaller weights stay unpacked (see `prepack`)
ONEDNN_MIN_WEIGHT = 2**20  # weights of fewer elements are faster through F.linear (MKL) on this CPU


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered into oneDNN's blocked layout for products of about `PACK_BATCH_HINT` rows (a second copy
    of it), or None off CPU, outside fp32, without the op or under `PACK_MIN_WEIGHT` elements. Measured on this
    2-core CPU (torch 2.13), the 24 products of one `small` step and its lm-head (weights of 147 K-3.1 M
    elements): at 2-3 rows 4.2-4.7 ms against 7.4-9.0 ms through `F.linear` (MKL) on one thread and 2.8-3.2
    against 7.9-9.9 ms on two; at 4-32 rows 5-25 % faster on one thread and 15-55 % on two (16 rows: 4.2 against
    6.1 ms). At one row MKL's product is faster on one thread (3.6-3.7 against 4.5 ms) but does not split over
    two, where the packed one does (2.6 against 3.6 ms): `linear` uses the packed weight from `PACKED_MIN_ROWS`
    rows, and at one row when running on more than one thread. The `tiny` shape's layer weights (16 K-98 K)
    were slower packed (a 16-row step 3.2 against 2.8 ms), its 524 K lm-head not."""
    if (ONEDNN_REORDER is None or weight.device.type != "cpu" or weight.dtype != torch.float32
            or weight.numel() < PACK_MIN_WEIGHT):
        return None
    return ONEDNN_REORDER(weight.contiguous(), PACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, onednn: Any = ONEDNN_LINEAR, packed: torch.Tensor | None = None,
           ) -> torch.Tensor:
    """`x @ weight.T`. With `packed` (`prepack(weight)`), products of `PACKED_MIN_ROWS` rows or more use it, and
    every product while torch runs on more than one thread (see `prepack`). On
    CPU in fp32, weights of 2^20 elements or more go through oneDNN when `onednn` (the private op) is available:
    on this 2-core CPU (torch 2.13) it multiplied an 8,192 x 512 lm-head 1.3-1.9x faster than `F.linear` at 1-64
    rows, while `F.linear` was faster for small weights (128 x 512: 10 µs against 30 µs); `benchmarks/serve.py`
    measures the end-to-end effect. Everything else is `F.linear`."""
    if packed is not None and (x.numel() >= PACKED_MIN_ROWS * x.shape[-1] or torch.get_num_threads() > 1):
        flat = ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
        return flat.view(*x.shape[:-1], weight.shape[0])
    if (onednn is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.numel() >= ONEDNN_MIN_WEIGHT):
        flat = onednn(x.reshape(-1, x.shape[-1]), weight, None, "none", [], "")
        return flat.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              ) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k/v (B, KV, S, D) with grouped heads (head h reads kv head h // (H/KV));
    `mask`: which keys each query sees (bool), or an additive bias (0 / -inf, `additive_mask`).

    `F.scaled_dot_product_attention`, except for one query per row on CPU (a decode step) in bf16: there two
    batched matmuls with the softmax in fp32 were faster on this CPU (torch 2.13: CPU SDPA takes a slow path for a
    single bf16 query). In fp32, SDPA with an additive mask took 126 µs per layer against 168 µs for the two
    matmuls at 16 rows of the `small` shape on one thread, 72 against 151 µs on two, 265 against 305 µs at 64
    rows on two (60 cached positions)."""
    rows, heads, queries, head_dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    if q.device.type != "cpu" or queries != 1 or causal or k.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=kv_heads != heads)
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    if k.dtype == torch.float32:
        scores = torch.matmul(grouped, k.transpose(-1, -2))  # (B, KV, H/KV, S)
    else:  # bf16 GEMM on CPU is faster with the cached keys (a strided slice) as the left operand
        scores = torch.matmul(k, grouped.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.float() * head_dim ** -0.5
    if mask is not None:  # (B, 1, 1, S): the keys each row may see
        scores = scores.masked_fill(~mask.view(rows, 1, 1, span), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).view(rows, heads, 1, head_dim)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask as the additive bias SDPA takes (0 where a key is seen, -inf elsewhere), built once per step:
    given a bool mask, SDPA would convert it in every layer. bf16 decode keeps the bool mask (`attention`)."""
    if mask is None or mask.dtype != torch.bool or dtype != torch.float32:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight (as `workers.model.RMSNorm` and HF Llama)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _heads_first(x: torch.Tensor, rows: int, new: int) -> torch.Tensor:
    """(rows·new, heads, D) → (rows, heads, new, D)."""
    return x.view(rows, new, x.shape[1], x.shape[2]).transpose(1, 2)


class Decoder:
    """`decoder(tokens, cache)` → logits (B, T, V); `decoder.mixed_step(...)` for continuous batching."""

    def __init__(self, model: Transformer, prepacked: bool = False) -> None:
        """`prepacked`: also keep every linear weight in oneDNN's blocked layout (`prepack`; a second copy of those
        weights, used for products of `PACKED_MIN_ROWS` rows or more): the serving engine's choice on CPU."""
        config = model.config
        self.config, self.eps = config, config.norm_eps
        self.q_dim, self.kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.n_heads = config.n_heads
        backbone = model.model
        with torch.no_grad():
            self.layers = [_fused_layer(cast(Block, block)) for block in backbone.layers]
        self.embed, self.final_norm = backbone.embed_tokens.weight.detach(), backbone.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.lm_head_packed = None
        if prepacked:
            for layer in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    if (twin := prepack(getattr(layer, name))) is not None:
                        layer.packed[name] = twin
            self.lm_head_packed = prepack(self.lm_head)
        self.device, self.dtype = self.embed.device, self.embed.dtype
        cos, sin = rope_tables(config.head_dim, torch.arange(config.max_seq_len, device=self.device),
                               config.rope_theta)
        half = config.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated: RoPE in 4 ops, not 8
        self.cos, self.sin = cos.to(self.dtype), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(self.dtype)

    def new_cache(self, rows: int, length: int) -> KVCache:
        """An empty cache of `rows` sequences of up to `length` positions, in the decoder's dtype and device."""
        return KVCache(self.config, rows, length, self.device, self.dtype)

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend, groups: TokenGroups | None = None,
                ) -> torch.Tensor:
        """The blocks over a flat run of tokens (N,) at `positions` (N,); returns the hidden states (N, dim).
        `groups`: LoRA adapters and the tokens each applies to (`workers.lora`)."""
        if int(positions.max()) + 1 > self.config.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        count, head_dim = len(tokens), self.config.head_dim
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (N, 1, D)
        x = F.embedding(tokens, self.embed)
        def project(inputs: torch.Tensor, weight: torch.Tensor, index: int, target: str) -> torch.Tensor:
            out = linear(inputs, weight, packed=self.layers[index].packed.get(target))
            return apply_lora(out, inputs, index, target, groups) if groups else out

        for index, layer in enumerate(self.layers):
            qkv = project(rms_norm(x, layer.attn_norm, self.eps), layer.qkv, index, "qkv")
            qk = qkv[:, :self.q_dim + self.kv_dim].view(count, -1, head_dim)  # RoPE on q and k heads at once
            qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            v = qkv[:, self.q_dim + self.kv_dim:]
            x = x + project(attend(index, q, k, v.view(count, -1, head_dim)), layer.o, index, "o")
            gate, up = project(rms_norm(x, layer.mlp_norm, self.eps), layer.gate_up, index, "gate_up").chunk(2, dim=-1)
            x = x + project(F.silu(gate) * up, layer.down, index, "down")
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm-head over hidden states (…, dim)."""
        return linear(rms_norm(hidden, self.final_norm, self.eps), self.lm_head, packed=self.lm_head_packed)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVStore, adapter: LoraWeights | None = None) -> torch.Tensor:
        """Logits of every position of `tokens` (B, T), which follow what `cache` holds for each row (with
        `adapter`'s LoRA updates on every row when given)."""
        batch, new = tokens.shape
        positions = cache.positions(new, tokens.device).expand(batch, new).reshape(-1)
        mask, causal = self._mask(cache, new, tokens.device)

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.update(index, _heads_first(k, batch, new), _heads_first(v, batch, new))
            out = attention(_heads_first(q, batch, new), keys, values, mask, causal)
            return out.transpose(1, 2).reshape(batch * new, -1)

        hidden = self._layers(tokens.reshape(-1), positions, attend, [(adapter, None)] if adapter else None)
        cache.advance(new)
        return self.logits(hidden).view(batch, new, -1)

    @torch.no_grad()
    def mixed_step(self, last_tokens: list[int], cache: KVStore, prompts: list[list[int]], all_logits: list[bool],
                   prefilled: list[KVCache] | None = None, adapters: list[LoraWeights | None] | None = None,
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[KVCache]]:
        """One forward pass over the next token of every running row *and* the prompts of newly admitted
        requests (continuous batching with prefill folded into the decode step, as vLLM schedules it).

        The tokens are flattened into one run for the matmuls, so the weights are read once per step however
        many requests join; attention runs per segment: the running rows against `cache` (one query each), each
        prompt causally against its own fresh `KVCache`. Returns (logits of the running rows (R, V) or None,
        per prompt its logits (all positions when `all_logits[i]`, else the last one), per prompt its cache).

        `prefilled[i]` (prefix caching): a one-row cache that already holds the positions before `prompts[i]`
        (then `prompts[i]` is only the rest of the prompt), and the cache that prompt's keys are appended to.
        `adapters`: the LoRA adapter (or None: the base model) of each running row, then of each prompt.
        """
        rows, lengths = len(last_tokens), [len(p) for p in prompts]
        fresh = prefilled or [self.new_cache(1, length) for length in lengths]
        if any(own.length + length > self.config.max_seq_len for own, length in zip(fresh, lengths, strict=True)):
            raise ValueError(f"prompt exceeds max_seq_len {self.config.max_seq_len}")
        tokens = torch.tensor(last_tokens + [t for p in prompts for t in p], device=self.device)
        position_parts = [cache.positions(1, self.device).reshape(-1)] if rows else []
        position_parts += [torch.arange(own.length, own.length + length, device=self.device)
                           for own, length in zip(fresh, lengths, strict=True)]
        prefix_masks = [own.attention_mask(length, self.device) for own, length in zip(fresh, lengths, strict=True)]
        mask, causal = self._mask(cache, 1, self.device) if rows else (None, False)

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outputs = []
            if rows:  # (R, H, 1, D) against each row's cached keys
                keys, values = cache.update(index, k[:rows, :, None], v[:rows, :, None])
                outputs.append(attention(q[:rows, :, None], keys, values, mask, causal)[:, :, 0])
            start = rows
            for length, own, prefix_mask in zip(lengths, fresh, prefix_masks, strict=True):
                part = slice(start, start + length)
                keys, values = own.update(index, k[part].transpose(0, 1)[None], v[part].transpose(0, 1)[None])
                outputs.append(attention(q[part].transpose(0, 1)[None], keys, values, prefix_mask,
                                         prefix_mask is None)[0].transpose(0, 1))
                start += length
            return torch.cat(outputs).reshape(len(tokens), -1)

        groups = None
        if adapters is not None and any(a is not None for a in adapters):
            per_token = adapters[:rows] + [a for a, length in zip(adapters[rows:], lengths, strict=True)
                                           for _ in range(length)]
            groups = token_groups(per_token, self.device)
        hidden = self._layers(tokens, torch.cat(position_parts), attend, groups)
        if rows:
            cache.advance(1)
        for length, own in zip(lengths, fresh, strict=True):
            own.advance(length)
        return self._mixed_logits(hidden, rows, lengths, all_logits) + (fresh,)

    def _mixed_logits(self, x: torch.Tensor, rows: int, lengths: list[int], all_logits: list[bool],
                      ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The lm-head over only the positions asked for: each running row, each prompt's last (or every)."""
        wanted, spans, start = list(range(rows)), [], rows
        for length, every in zip(lengths, all_logits, strict=True):
            first = len(wanted)
            wanted += list(range(start, start + length)) if every else [start + length - 1]
            spans.append(slice(first, len(wanted)))
            start += length
        logits = self.logits(x[wanted]).float()  # sampling and argmax in fp32 (a bf16 argmax is ~5x slower on CPU)
        return (logits[:rows] if rows else None), [logits[span] for span in spans]

    def _mask(self, cache: KVStore, new: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attention mask, is_causal): none needed for one query per row over equal lengths; fp32 masks are
        additive (`additive_mask`)."""
        length = cache.uniform_length()
        if length == 0:
            return None, True  # a fresh prefill: plain causal attention over the new block
        if new == 1 and length is not None:
            return None, False  # each row's single query sees every key of that row
        return additive_mask(cache.attention_mask(new, device), self.dtype), False
