"""Automatic prefix caching: the KV of prompt prefixes shared between requests (a system prompt, few-shot
examples, RAG instructions) is kept in blocks and reused instead of recomputed, as vLLM's automatic prefix caching.

A prompt is cut into blocks of `block_size` tokens; block i is named by a hash chained over every token up to its
end (blake2b of the parent block's digest and its own tokens), so a block is only ever reused after exactly the
same tokens. A block holds its positions' keys and values for every layer. `lookup(prompt)` walks the chain from
the start and returns how many positions are cached (whole blocks, always leaving at least the last prompt token
to compute, since its logits choose the first output token) and a fresh cache holding them; `store(prompt, cache)`
keeps the prompt's whole blocks after its prefill. Blocks are evicted least recently used first once their bytes
pass `budget_bytes`, a chain's tail before its head. Counters: queries, hit blocks, cached tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from workers.model import KVCache
from workers.model_config import ModelConfig


@dataclass
class PrefixStats:
    queries: int = 0
    hits: int = 0  # lookups that reused at least one block
    cached_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    blocks: int = 0
    bytes: int = 0


class PrefixCache:
    """Hash-chained KV blocks of prompt prefixes under a memory budget (LRU eviction)."""

    def __init__(self, config: ModelConfig, budget_bytes: int, block_size: int = 16) -> None:
        self.config, self.budget_bytes, self.block_size = config, budget_bytes, block_size
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest → (layers, 2, kv_heads, B, D)
        self.stats = PrefixStats()

    def _digests(self, prompt: list[int], count: int, namespace: bytes = b"") -> list[bytes]:
        """The chained digests of the prompt's first `count` whole blocks; `namespace` (a LoRA adapter's name)
        seeds the chain, so blocks computed under one adapter are never reused under another."""
        digests, parent, size = [], namespace, self.block_size
        for block in range(count):
            tokens = torch.tensor(prompt[block * size:(block + 1) * size], dtype=torch.int32).numpy().tobytes()
            parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
            digests.append(parent)
        return digests

    def lookup(self, prompt: list[int], cache: KVCache, namespace: bytes = b"") -> int:
        """Copy the longest cached prefix of `prompt` (whole blocks, at most len(prompt) - 1 positions) into the
        empty `cache` and advance it; returns the number of cached positions."""
        self.stats.queries += 1
        hits, used = [], []
        for digest in self._digests(prompt, (len(prompt) - 1) // self.block_size, namespace):
            block = self.blocks.get(digest)
            if block is None:
                break
            hits.append(block)
            used.append(digest)
        self._touch(used)
        if not hits:
            return 0
        span = len(hits) * self.block_size
        stacked = torch.cat(hits, dim=3)  # (layers, 2, kv_heads, span, D)
        for layer in range(self.config.n_layers):
            cache.keys[layer][0, :, :span] = stacked[layer, 0]
            cache.values[layer][0, :, :span] = stacked[layer, 1]
        cache.advance(span)
        self.stats.hits += 1
        self.stats.cached_tokens += span
        return span

    def store(self, prompt: list[int], cache: KVCache, row: int = 0, namespace: bytes = b"") -> None:
        """Keep the whole blocks of `prompt`, whose keys/values `cache` holds in `row`, that are not kept yet."""
        size = self.block_size
        digests = self._digests(prompt, len(prompt) // size, namespace)
        for block, digest in enumerate(digests):
            if digest in self.blocks:
                continue
            span = slice(block * size, (block + 1) * size)
            kv = torch.stack([torch.stack([cache.keys[layer][row, :, span], cache.values[layer][row, :, span]])
                              for layer in range(self.config.n_layers)]).clone()
            self.blocks[digest] = kv
            self.stats.stored_blocks += 1
            self.stats.bytes += kv.numel() * kv.element_size()
        self._touch(digests)
        self._evict()
        self.stats.blocks = len(self.blocks)

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain of blocks used, its first block most recently: eviction takes a chain's tail first, so a
        shared head (the system prompt) outlives the prompts that branch off it."""
        for digest in reversed(chain):
            self.blocks.move_to_end(digest)

    def _evict(self) -> None:
        while self.blocks and self.stats.bytes > self.budget_bytes:
            _, kv = self.blocks.popitem(last=False)
            self.stats.bytes -= kv.numel() * kv.element_size()
            self.stats.evicted_blocks += 1
