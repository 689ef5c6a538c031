"""Benchmark: what the serving features cost and save, on the `small` preset shape (random weights, 8,192 vocab).

1. Prefix caching: time to first token of requests that share a 200-token prefix (a system prompt) and differ in
   a short suffix, with the engine's prefix cache on and off: each request alone (`max_tokens=1`, submit to first
   token), sequentially, after one warm-up request that fills the cache; `--repeat` interleaved rounds of
   `--requests` requests per side. Medians with min-max of the per-round median TTFT.
2. Structured output: tokens/s of the same greedy requests with a `json_schema` response_format and without,
   interleaved rounds; and the masking cost per token (the engine's own counter: mask + guide advance seconds /
   masked tokens), against a decode step's time.

    .venv/bin/python benchmarks/serve_features.py [--threads 1] [--repeat 5] [--requests 8]

Last line: {"benchmark": "serve_features", "metrics": {...}}, also appended to benchmarks/results/serve_features.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _record import interleaved, record, spread  # noqa: E402
from serve import build  # noqa: E402

from serving.engine import Engine  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from serving.structured import regex_for  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer"}, "tags": {"type": "array", "items": {
                                               "type": "string", "maxLength": 12}, "maxItems": 4}},
          "required": ["title", "year", "tags"]}


def ttft_round(engine: Engine, shared: list[int], requests: int, round_index: int) -> float:
    """Median time to first token of `requests` sequential requests sharing `shared` (distinct suffixes)."""
    times = []
    for index in range(requests):
        suffix = engine.encode(f" Question {round_index}-{index}: what next?")
        request = engine.generate(shared + suffix, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        assert request.first_token_at is not None
        times.append(request.first_token_at - request.queued_at)
    return statistics.median(times)


def prefix_caching(hf_dir: Path, repeat: int, requests: int) -> dict[str, object]:
    engines = {"cache_on": Engine.load(hf_dir, prefix_cache_mb=256), "cache_off": Engine.load(hf_dir)}
    text = " ".join(["You are a careful assistant. Answer from the sources, cite them, and say when unsure."] * 12)
    shared = engines["cache_on"].encode(text)[:200]
    rounds = {"n": 0}

    def side(name: str) -> float:
        rounds["n"] += 1
        return 1.0 / ttft_round(engines[name], shared, requests, rounds["n"])  # a rate, for `interleaved`

    rates = interleaved({name: lambda n=name: side(n) for name in engines}, repeat)
    ttft_ms = {name: [1000.0 / rate for rate in values] for name, values in rates.items()}
    on, off = statistics.median(ttft_ms["cache_on"]), statistics.median(ttft_ms["cache_off"])
    stats = engines["cache_on"].prefix_cache.stats  # type: ignore[union-attr]
    print(f"TTFT with a 200-token shared prefix: cache on {on:.1f} ms, off {off:.1f} ms ({off / on:.1f}x), "
          f"medians of {repeat}; cached tokens {stats.cached_tokens}, hits {stats.hits}/{stats.queries}")
    return {"ttft_ms_cache_on": spread(ttft_ms["cache_on"], 2), "ttft_ms_cache_off": spread(ttft_ms["cache_off"], 2),
            "ttft_speedup": round(off / on, 2), "shared_prefix_tokens": len(shared),
            "cache_hits": stats.hits, "cache_queries": stats.queries}


def structured_output(hf_dir: Path, repeat: int, requests: int) -> dict[str, object]:
    engine = Engine.load(hf_dir)
    regex = regex_for({"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}})
    prompt = engine.encode("Describe a book as JSON:")
    started = time.perf_counter()
    engine.structured().constrain(regex or "", 10_000)
    compile_s = time.perf_counter() - started

    def run(constrained: bool) -> float:
        tokens, started = 0, time.perf_counter()
        for seed in range(requests):
            params = SamplingParams(max_tokens=64, temperature=1.0, seed=seed, regex=regex if constrained else None,
                                    ignore_eos=not constrained)
            tokens += len(engine.generate(prompt, params).output_ids)
        return tokens / (time.perf_counter() - started)

    before = dict(engine.stats)
    rates = interleaved({"constrained": lambda: run(True), "free": lambda: run(False)}, repeat)
    masked = engine.stats["masked_tokens"] - before["masked_tokens"]
    mask_us = (engine.stats["mask_s"] - before["mask_s"]) / max(1, masked) * 1e6
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    print(f"structured output: {constrained:,.0f} tok/s constrained, {free:,.0f} free (medians of {repeat}); "
          f"mask + advance {mask_us:.0f} µs per token ({mask_us * free / 1e6:.1%} of a free token's time); "
          f"schema compiled in {compile_s * 1000:.0f} ms")
    return {"constrained_tokens_per_s": spread(rates["constrained"]), "free_tokens_per_s": spread(rates["free"]),
            "mask_us_per_token": round(mask_us, 1), "mask_share_of_free_token": round(mask_us * free / 1e6, 3),
            "schema_compile_ms": round(compile_s * 1000, 1), "vocab": engine.config.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        hf_dir, _ = build(Path(work), "small")
        metrics: dict[str, object] = {"threads": args.threads, "preset": "small"}
        metrics["prefix_caching"] = prefix_caching(hf_dir, args.repeat, args.requests)
        metrics["structured_output"] = structured_output(hf_dir, args.repeat, args.requests)
    record("serve_features", metrics)


if __name__ == "__main__":
    main()
