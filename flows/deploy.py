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


def example_curl(base: str, model: str, keyed: bool) -> tuple[str, dict[str, Any]]:
    """A working curl for the served model (with the API key header, read from the environment, when one is set)."""
    payload = {"model": model, "prompt": "The for statement", "max_tokens": 24, "temperature": 0}
    key = ' -H "Authorization: Bearer $FORGELINE_API_KEY"' if keyed else ""
    return (f"curl -s {base}/v1/completions -H 'Content-Type: application/json'{key} -d '{json.dumps(payload)}'",
            payload)


@flow(name="deploy", log_prints=True)
def deploy_flow(config: RunConfig, args: dict[str, Any], port: int = 8000, check: bool = True) -> dict[str, Any]:
    """Deploy `serving.app:app_builder` with `args` (`serving.app.ServeArgs`); optionally call it once."""
    from ray import serve

    from serving.app import API_KEY_ENV, ServeArgs, app_builder

    settings = ServeArgs.model_validate({"name": config.name, **args})
    get_run_logger().info("Ray: %s", connect_ray(config))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(settings), name="forgeline", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    key = settings.api_key or os.environ.get(API_KEY_ENV)
    curl, payload = example_curl(base, config.name, key is not None)
    result: dict[str, Any] = {"url": base, "curl": curl, "model": config.name}
    if check:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(f"{base}/v1/completions", json=payload, headers=headers, timeout=120)
        response.raise_for_status()
        result["answer"] = response.json()
        create_markdown_artifact(key="deploy", markdown=f"# served `{config.name}`\n\n```bash\n{curl}\n```\n\n"
                                 f"```json\n{json.dumps(result['answer'], indent=2)}\n```\n")
    return result
