"""The `deploy` Prefect flow: start the OpenAI-compatible Ray Serve app for a trained model (local or cluster).

Locally Serve listens on 127.0.0.1:`port`; on a cluster (`ray.address`) the app is deployed there and stays up
after the flow ends. Returns the base URL and an example curl; `check=True` sends that request and records
the answer as a Prefect artifact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import connect_ray
from flows.config import RunConfig

EXAMPLE_CHAT = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What is the first word of this sentence? The for statement is used to "
                                            "iterate over the elements of a sequence."}]


def example_request(base: str, model: str, keyed: bool, adapter: str | None = None
                    ) -> tuple[str, str, dict[str, Any]]:
    """A working curl for the served model (with the API key header, read from the environment, when one is set):
    a chat with the adapter when one is served, else a completion. Returns (curl, route, payload)."""
    if adapter is not None:
        route = "/v1/chat/completions"
        payload: dict[str, Any] = {"model": adapter, "messages": EXAMPLE_CHAT, "max_tokens": 16, "temperature": 0}
    else:
        route, payload = "/v1/completions", {"model": model, "prompt": "The for statement", "max_tokens": 24,
                                             "temperature": 0}
    key = ' -H "Authorization: Bearer $FORGELINE_API_KEY"' if keyed else ""
    return (f"curl -s {base}{route} -H 'Content-Type: application/json'{key} -d '{json.dumps(payload)}'", route,
            payload)


def throughput_optimized_env(port: int) -> dict[str, str]:
    """Ray Serve's documented high-throughput mode (Ray 2.56+): `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` turns on direct
    ingress (each ingress replica answers HTTP itself on 127.0.0.1, without the proxy's hop: measured 1.8 against
    10.3 ms of CPU per request here), gRPC between replicas and user code on the replica's main thread. Read by
    Serve's processes when they start, so it must be set before Ray starts. Replica ports from `port` + 1."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 100)}


@flow(name="deploy", log_prints=True)
def deploy_flow(config: RunConfig, args: dict[str, Any], port: int = 8000, check: bool = True) -> dict[str, Any]:
    """Deploy `serving.app:app_builder` with `args` (`serving.app.ServeArgs`); optionally call it once. In Ray
    Serve's throughput-optimized mode (`throughput_optimized_env`) the result names the first replica's direct URL."""
    from ray import serve

    from serving.app import API_KEY_ENV, ServeArgs, app_builder

    settings = ServeArgs.model_validate({"name": config.name, **args})
    get_run_logger().info("Ray: %s", connect_ray(config))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(settings), name="forgeline", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    key = settings.api_key or os.environ.get(API_KEY_ENV)
    adapter = next(iter(sorted(settings.adapters)), None)
    curl, route, payload = example_request(base, config.name, key is not None, adapter)
    result: dict[str, Any] = {"url": base, "curl": curl, "model": payload["model"],
                              "adapters": sorted(settings.adapters)}
    first_direct_port = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT")
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" and first_direct_port:
        result["direct_url"] = f"http://127.0.0.1:{first_direct_port}"
    if check:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(f"{base}{route}", json=payload, headers=headers, timeout=120)
        response.raise_for_status()
        result["answer"] = response.json()
        create_markdown_artifact(key="deploy", markdown=f"# served `{payload['model']}`\n\n```bash\n{curl}\n```\n\n"
                                 f"```json\n{json.dumps(result['answer'], indent=2)}\n```\n")
    return result
