"""The `deploy` Prefect flow: start the OpenAI-compatible Ray Serve app for a trained model (local or cluster).

Locally Serve listens on 127.0.0.1:`port`; on a cluster (`ray.address`) the app is deployed there and stays up
after the flow ends. Returns the base URL and an example curl; `check=True` sends that request and records
the answer as a Prefect artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import connect_ray
from flows.config import RunConfig


def example_curl(base: str, model: str) -> tuple[str, dict[str, Any]]:
    payload = {"model": model, "prompt": "The for statement", "max_tokens": 24, "temperature": 0}
    return (f"curl -s {base}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(payload)}'",
            payload)


@flow(name="deploy", log_prints=True)
def deploy_flow(config: RunConfig, model_path: str, port: int = 8000, check: bool = True) -> dict[str, Any]:
    """Deploy `serving.app:app_builder` for `model_path`; optionally call it once."""
    from ray import serve

    from serving.app import ServeArgs, app_builder

    get_run_logger().info("Ray: %s", connect_ray(config))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(ServeArgs(model=str(Path(model_path).resolve()), name=config.name)), name="forgeline",
              route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    curl, payload = example_curl(base, config.name)
    result: dict[str, Any] = {"url": base, "curl": curl, "model": config.name}
    if check:
        response = httpx.post(f"{base}/v1/completions", json=payload, timeout=120)
        response.raise_for_status()
        result["answer"] = response.json()
        create_markdown_artifact(key="deploy", markdown=f"# served `{config.name}`\n\n```bash\n{curl}\n```\n\n"
                                 f"```json\n{json.dumps(result['answer'], indent=2)}\n```\n")
    return result
