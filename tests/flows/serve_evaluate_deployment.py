"""Serves the `evaluate-on-checkpoint` deployment exactly as infra/prefect.yaml declares it (entrypoint flow and
event trigger), with this test's config file: run by test_evaluate_flow in its own process, like a worker."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from prefect import serve  # noqa: E402
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger  # noqa: E402

from flows.evaluate import evaluate_checkpoint_flow  # noqa: E402


def main(config_path: str) -> None:
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra" / "prefect.yaml").read_text())
    declared = next(d for d in spec["deployments"] if d["name"] == "evaluate-on-checkpoint")
    trigger = DeploymentEventTrigger.model_validate(declared["triggers"][0])
    trigger.parameters = {**(trigger.parameters or {}), "config_path": config_path}
    deployment = evaluate_checkpoint_flow.to_deployment(name=declared["name"], triggers=[trigger],
                                                        parameters={"config_path": config_path})
    serve(deployment, print_starting_message=False)


if __name__ == "__main__":
    main(sys.argv[1])
