"""Automatic prefix caching: outputs are identical with and without the cache (greedy tokens, logprobs to
float tolerance), exactly the shared whole blocks are reused, and eviction under a memory budget keeps a
chain's head; admitted requests reuse a prefix while others are decoding (continuous batching)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.engine import Engine
from serving.prefix_cache import PrefixCache
from serving.sampling import SamplingParams
from tests.serving.test_http import model_dir  # noqa: F401  (the tiny exported model fixture)

SHARED = [(7 * i + 3) % 290 + 5 for i in range(200)]  # a 200-token "system prompt": 12 whole blocks of 16
SUFFIXES = [[11, 12, 13], [40, 41], [99, 98, 97, 96, 95], [5]]


def run(engine: Engine, prompts: list[list[int]], concurrent: bool) -> list[tuple[list[int], list[float], int]]:
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    if concurrent:
        requests = [engine.submit(p, params) for p in prompts]
        engine.run_until_idle()
    else:
        requests = [engine.generate(p, params) for p in prompts]
    return [(r.output_ids, [entry.logprob for entry in r.logprobs], r.cached_tokens) for r in requests]


@pytest.mark.parametrize("concurrent", [False, True], ids=["one-by-one", "batched"])
def test_outputs_are_identical_with_and_without_the_cache(model_dir: Path, concurrent: bool) -> None:  # noqa: F811
    prompts = [SHARED + suffix for suffix in SUFFIXES]
    plain = run(Engine.load(model_dir), prompts, concurrent)
    cached_engine = Engine.load(model_dir, prefix_cache_mb=64)
    warm = run(cached_engine, prompts[:1], False)  # stores the shared blocks
    cached = run(cached_engine, prompts, concurrent)
    assert warm[0][2] == 0 and [c[2] for c in cached] == [192] * len(prompts), "12 whole blocks reused"
    for (tokens, logprobs, _), (plain_tokens, plain_logprobs, _) in zip(cached, plain, strict=True):
        assert tokens == plain_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(plain_logprobs), atol=1e-4)
    assert cached_engine.stats["cached_tokens"] == 192 * len(prompts)


def test_a_prefix_is_reused_while_other_requests_decode(model_dir: Path) -> None:  # noqa: F811
    engine = Engine.load(model_dir, prefix_cache_mb=64)
    reference = Engine.load(model_dir)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.generate(SHARED + [1, 2], SamplingParams(max_tokens=1))
    long_running = engine.submit([5, 6, 7], params)
    engine.step()
    engine.step()  # the long request is decoding when the cached one joins the batch
    joined = engine.submit(SHARED + [9], params)
    engine.run_until_idle()
    assert joined.cached_tokens == 192
    assert joined.output_ids == reference.generate(SHARED + [9], params).output_ids
    assert long_running.output_ids == reference.generate([5, 6, 7], params).output_ids


def test_only_whole_blocks_before_the_last_token_are_reused(model_dir: Path) -> None:  # noqa: F811
    engine = Engine.load(model_dir, prefix_cache_mb=64)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.generate(SHARED[:64], params)  # 4 blocks stored
    assert engine.generate(SHARED[:64], params).cached_tokens == 48, "the last token is always computed"
    assert engine.generate(SHARED[:70], params).cached_tokens == 64
    assert engine.generate(SHARED[:10] + [1] + SHARED[11:64], params).cached_tokens == 0, "a changed token in " \
        "the first block breaks the whole chain"
    assert engine.generate(SHARED[:40], params).cached_tokens == 32


def test_eviction_keeps_the_budget_and_the_chain_head(model_dir: Path) -> None:  # noqa: F811
    engine = Engine.load(model_dir)
    block = PrefixCache(engine.config, 10**9)
    block.store(SHARED[:16], _prefilled(engine, SHARED[:16]))
    block_bytes = block.stats.bytes
    cache = PrefixCache(engine.config, 3 * block_bytes)
    cache.store(SHARED, _prefilled(engine, SHARED))
    assert cache.stats.stored_blocks == 12 and cache.stats.evicted_blocks == 9 and cache.stats.blocks == 3
    assert cache.stats.bytes <= 3 * block_bytes
    target = engine.decoder.new_cache(1, len(SHARED))
    assert cache.lookup(SHARED, target) == 48, "the first three blocks (the chain's head) survived"
    expected = _prefilled(engine, SHARED)
    assert torch.equal(target.keys[0][0, :, :48], expected.keys[0][0, :, :48])


def _prefilled(engine: Engine, prompt: list[int]):  # type: ignore[no-untyped-def]
    cache = engine.decoder.new_cache(1, len(prompt))
    engine.decoder(torch.tensor([prompt]), cache)
    return cache
