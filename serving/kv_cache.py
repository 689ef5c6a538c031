"""A KV cache for continuous batching: one preallocated slot per running sequence, each with its own length.

Rows join (`add_row`, after a batch-1 prefill into a `workers.model.KVCache`) and leave (`keep_rows`) at step
boundaries. A decode step appends one token per row at that row's own position; attention sees keys up to
each row's length (a boolean mask), RoPE uses each row's position. Follows the cache protocol of
`workers.model.KVCache` (positions / attention_mask / update / advance).
"""

from __future__ import annotations

import torch

from workers.model import KVCache, ModelConfig


class BatchKVCache:
    """Keys/values (rows, kv_heads, capacity, head_dim) per layer, with `lengths[row]` positions filled."""

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.capacity, self.device, self.dtype = config, capacity, device, dtype
        shape = (0, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def add_row(self, prefilled: KVCache) -> int:
        """Append a sequence prefilled in a batch-1 cache; returns its row."""
        length = prefilled.length
        if length > self.capacity:
            raise ValueError(f"prompt of {length} tokens exceeds the cache capacity {self.capacity}")
        for layer in range(self.config.n_layers):
            for store, source in ((self.keys, prefilled.keys), (self.values, prefilled.values)):
                row = torch.zeros((1, *store[layer].shape[1:]), device=self.device, dtype=self.dtype)
                row[:, :, :length] = source[layer][:, :, :length]
                store[layer] = torch.cat([store[layer], row])
        self.lengths = torch.cat([self.lengths, torch.tensor([length], device=self.device)])
        return self.rows - 1

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished sequences leave), keeping their order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)

    # the cache protocol of workers.model
    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(new, device=device)[None]

    def attention_mask(self, new: int, device: torch.device) -> torch.Tensor:
        span = int(self.lengths.max()) + new
        key_pos = torch.arange(span, device=device)[None, None, None, :]
        query_pos = (self.lengths[:, None] + torch.arange(new, device=device)[None])[:, None, :, None]
        return key_pos <= query_pos  # (rows, 1, new, span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[2]
        if int(self.lengths.max()) + new > self.capacity:
            raise ValueError(f"KV cache full: capacity {self.capacity}")
        rows = torch.arange(self.rows, device=self.device)
        for offset in range(new):
            self.keys[layer][rows, :, self.lengths + offset] = k[:, :, offset]
            self.values[layer][rows, :, self.lengths + offset] = v[:, :, offset]
        span = int(self.lengths.max()) + new
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]

    def advance(self, new: int) -> None:
        self.lengths = self.lengths + new
