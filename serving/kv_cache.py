"""A KV cache for continuous batching: preallocated rows, one per running sequence, each with its own length.

Keys and values live in tensors of shape (max_rows, kv_heads, capacity, head_dim) per layer, allocated once
(as vLLM reserves its KV memory up front); the running sequences occupy rows 0..rows-1. Rows join at step
boundaries (`add_rows`, copying a prefilled cache into the next free rows) and leave (`keep_rows`: the last
rows move into the holes the leavers left, so a departure copies only as many rows as left). A decode step
appends one token per row at that row's own position; attention sees keys up to each row's length (a boolean mask,
or none when all rows have the same length), RoPE uses each row's position. Follows the cache protocol of
`workers.model.KVCache` (positions / attention_mask / update / advance).

Memory: 2 · layers · max_rows · capacity · kv_heads · head_dim · dtype size (the `small` preset, 16 rows of
1,024 positions in fp32: 100 MB).
"""

from __future__ import annotations

import torch

from workers.model import KVCache
from workers.model_config import ModelConfig


class BatchKVCache:
    """Per-layer keys/values for up to `max_rows` sequences, with `lengths[row]` positions filled."""

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype,
                 max_rows: int = 16) -> None:
        self.config, self.capacity, self.device, self.dtype, self.max_rows = config, capacity, device, dtype, max_rows
        shape = (max_rows, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._uniform: int | None = None  # the common length of all rows, None when they differ
        self._longest = 0  # the longest row's length
        self._slots: torch.Tensor | None = None  # this step's write positions (see `_write_slots`)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def uniform_length(self) -> int | None:
        """The length every row has, or None when rows differ (then attention needs the mask)."""
        return self._uniform if self.rows else None

    def _refresh_uniform(self) -> None:
        low, high = (int(self.lengths.min()), int(self.lengths.max())) if self.rows else (0, 0)
        self._uniform, self._longest, self._slots = (low if low == high else None), high, None

    def _write_slots(self) -> torch.Tensor:
        """Where one new token per row goes in a layer's keys viewed as (max_rows * kv_heads * capacity,
        head_dim): row r, head h at position lengths[r]. Computed once per step, shared by every layer."""
        if self._slots is None:
            rows = torch.arange(self.rows, device=self.device)[:, None]
            heads = torch.arange(self.config.n_kv_heads, device=self.device)[None]
            self._slots = ((rows * self.config.n_kv_heads + heads) * self.capacity + self.lengths[:, None]).reshape(-1)
        return self._slots

    def add_rows(self, prefilled: KVCache | BatchKVCache, lengths: list[int]) -> list[int]:
        """Append the sequences of a prefilled cache (row i holds `lengths[i]` positions); returns their rows."""
        start, count = self.rows, len(lengths)
        if start + count > self.max_rows:
            raise ValueError(f"{start + count} sequences exceed the cache's {self.max_rows} rows")
        if max(lengths) > self.capacity:
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the cache capacity {self.capacity}")
        span = max(lengths)
        for layer in range(self.config.n_layers):
            self.keys[layer][start:start + count, :, :span] = prefilled.keys[layer][:count, :, :span]
            self.values[layer][start:start + count, :, :span] = prefilled.values[layer][:count, :, :span]
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, dtype=torch.long, device=self.device)])
        self._refresh_uniform()
        return list(range(start, start + count))

    def keep_rows(self, rows: list[int]) -> list[int]:
        """Keep the rows listed; the others leave. Survivors past the new row count move into the holes the
        leavers left (one indexed copy per layer and store, whatever the number of rows). Returns, for each new
        row 0..len(rows)-1, the old row it holds."""
        count, kept = len(rows), set(rows)
        holes = [row for row in range(count) if row not in kept]
        movers = [row for row in rows if row >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if movers:
            span = self._longest
            target = torch.tensor(holes, dtype=torch.long, device=self.device)
            source = torch.tensor(movers, dtype=torch.long, device=self.device)
            for store in (self.keys, self.values):
                for layer in range(self.config.n_layers):
                    store[layer][target, :, :span] = store[layer][source, :, :span]
        self.lengths = self.lengths[torch.tensor(order, dtype=torch.long, device=self.device)]
        self._refresh_uniform()
        return order

    # the cache protocol of workers.model
    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(new, device=device)[None]

    def attention_mask(self, new: int, device: torch.device) -> torch.Tensor:
        span = self._longest + new
        key_pos = torch.arange(span, device=device)[None, None, None, :]
        query_pos = (self.lengths[:, None] + torch.arange(new, device=device)[None])[:, None, :, None]
        return key_pos <= query_pos  # (rows, 1, new, span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new, rows, top = k.shape[2], self.rows, self._longest
        if top + new > self.capacity:
            raise ValueError(f"KV cache full: capacity {self.capacity}")
        keys, values = self.keys[layer][:rows], self.values[layer][:rows]
        if self._uniform is not None:  # every row writes the same positions: a slice
            keys[:, :, top:top + new] = k
            values[:, :, top:top + new] = v
        elif new == 1:  # a decode step: one indexed copy per store
            head_dim, slots = self.config.head_dim, self._write_slots()
            self.keys[layer].view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
            self.values[layer].view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))
        else:
            index = torch.arange(rows, device=self.device)
            for offset in range(new):
                keys[index, :, self.lengths + offset] = k[:, :, offset]
                values[index, :, self.lengths + offset] = v[:, :, offset]
        return keys[:, :, :top + new], values[:, :, :top + new]

    def advance(self, new: int) -> None:
        self.lengths = self.lengths + new
        self._longest, self._slots = self._longest + new, None
        if self._uniform is not None:
            self._uniform += new
