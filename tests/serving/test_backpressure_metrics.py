"""Backpressure and latency metrics on a real Serve app: a burst of 500 requests past the admission limit is
answered 200 or 429 with Retry-After (no 5xx, nothing hangs), and `/metrics` counts exactly what happened."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.test_http import free_port, model_dir  # noqa: F401  (the tiny exported model fixture)

pytestmark = pytest.mark.integration
LIMIT = 8


@pytest.fixture(scope="module")
def bounded(model_dir: Path, ray_local: None) -> Iterator[str]:  # noqa: F811
    from ray import serve

    from serving.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": str(model_dir), "name": "tiny", "engine_cpus": 0.5,
                           "max_pending_requests": LIMIT, "retry_after_s": 2}), name="bounded", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the Prometheus text exposition (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def burst(base: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/completions", json={
            "model": "tiny", "prompt": f"the cat {i}", "max_tokens": 4, "ignore_eos": True, "seed": i})
            for i in range(count))))


def test_a_burst_of_500_is_served_or_told_to_retry(bounded: str) -> None:
    responses = asyncio.run(burst(bounded, 500))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) >= LIMIT and refused, f"{len(served)} served, {len(refused)} refused"
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in served)
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    with httpx.Client(base_url=bounded, timeout=60) as client:
        text = client.get("/metrics").text
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code \
            == 200, "the limit frees as requests finish"
    assert metric(text, "forgeline_rejected_requests_total", 'reason="queue_full"') == len(refused)
    for histogram in ("forgeline_time_to_first_token_seconds", "forgeline_time_per_output_token_seconds",
                      "forgeline_request_queue_time_seconds", "forgeline_e2e_request_latency_seconds",
                      "forgeline_batch_occupancy_sequences"):
        assert metric(text, histogram + "_count") == len(served), histogram
    assert metric(text, "forgeline_generated_tokens_total") == 4 * len(served)
    assert metric(text, "forgeline_batch_occupancy_sequences_bucket", 'le="1.0"') < len(served), \
        "a burst is decoded in batches of more than one"
    assert metric(text, "forgeline_pending_requests") == 0 and metric(text, "forgeline_running_sequences") == 0
    assert "forgeline_kv_cache_usage_ratio" in text and "forgeline_batch_occupancy_ratio" in text
