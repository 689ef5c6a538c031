"""The server's Prometheus metrics (`GET /metrics`), named and bucketed after vLLM's so dashboards carry over.

Per request (observed by the ingress from the engine's latency marks, so every engine replica's requests are
counted): time to first token, time per output token, queue time, end-to-end latency, the mean batch size of the
steps it decoded in, prompt/generated tokens and the prefix cache's hits. Counters of requests rejected with 429
(queue full) and aborted (client gone, timeout). Sampled at scrape time from one engine replica: running and
waiting sequences, batch occupancy and KV cache usage (fractions), and the ingress's own pending requests.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


class ServerMetrics:
    """One registry per ingress replica (not the process-global one: two apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("forgeline_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.latency = Histogram("forgeline_request_seconds", "HTTP request latency (all routes)", ["endpoint"],
                                 registry=registry)
        self.tokens = Counter("forgeline_generated_tokens_total", "generated tokens", registry=registry)
        self.prompt_tokens = Counter("forgeline_prompt_tokens_total", "prompt tokens", registry=registry)
        self.cached_tokens = Counter("forgeline_prefix_cache_hit_tokens_total", "prompt tokens served from the "
                                     "prefix cache", registry=registry)
        self.ttft = Histogram("forgeline_time_to_first_token_seconds", "submit to first token, in the engine",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("forgeline_time_per_output_token_seconds", "decode time per token after the first",
                              buckets=TOKEN_BUCKETS, registry=registry)
        self.queue = Histogram("forgeline_request_queue_time_seconds", "waiting for a batch row",
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("forgeline_e2e_request_latency_seconds", "a generation request, end to end at the "
                             "ingress", buckets=LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram("forgeline_batch_occupancy_sequences", "mean sequences per step over a request's "
                               "decode steps", buckets=BATCH_BUCKETS, registry=registry)
        self.rejected = Counter("forgeline_rejected_requests_total", "requests answered 429", ["reason"],
                                registry=registry)
        self.aborted = Counter("forgeline_aborted_requests_total", "requests given up before the end", ["reason"],
                               registry=registry)
        self.retried = Counter("forgeline_engine_retries_total", "generations rerun because their engine replica "
                               "died", registry=registry)
        self.running = Gauge("forgeline_running_sequences", "sequences in the batch (one engine replica)",
                             registry=registry)
        self.waiting = Gauge("forgeline_waiting_sequences", "sequences queued in the engine", registry=registry)
        self.occupancy = Gauge("forgeline_batch_occupancy_ratio", "running / max_batch", registry=registry)
        self.kv_usage = Gauge("forgeline_kv_cache_usage_ratio", "KV positions held / reserved", registry=registry)
        self.prefix_hit_rate = Gauge("forgeline_prefix_cache_hit_rate", "cached / prompt tokens since the engine "
                                     "replica started", registry=registry)
        self.pending = Gauge("forgeline_pending_requests", "generation requests this ingress holds",
                             registry=registry)

    def observe(self, result: dict[str, Any], seconds: float) -> None:
        """One finished generation (a `serving.engine_process.result_dict`) that took `seconds` at the ingress."""
        timing = result.get("timing") or {}
        for histogram, key in ((self.ttft, "ttft_s"), (self.tpot, "tpot_s"), (self.queue, "queue_s"),
                               (self.batch, "mean_batch")):
            if timing.get(key) is not None:
                histogram.observe(timing[key])
        self.e2e.observe(seconds)
        self.tokens.inc(result["completion_tokens"])
        self.prompt_tokens.inc(result["prompt_tokens"])
        self.cached_tokens.inc(result.get("cached_tokens", 0))

    def sample(self, load: dict[str, Any], pending: int) -> None:
        """Gauges from an engine replica's `stats()` and the ingress's pending count."""
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.occupancy.set(load["batch_occupancy"])
        self.kv_usage.set(load["kv_usage"])
        prompt = load.get("prompt_tokens", 0)
        self.prefix_hit_rate.set(load.get("cached_tokens", 0) / prompt if prompt else 0.0)
        self.pending.set(pending)

    def render(self) -> bytes:
        return generate_latest(self.registry)
