"""The pipeline: every stage's spec in order, the `forgeline run` flow, and its dry-run plan.

`pipeline_flow` runs the stages as subflows, each skipped when its output is already complete.
`plan_pipeline` computes every stage's content address without running anything and says, per stage,
whether it would be skipped or run and why (which config field, input or code version changed since the
stage's latest complete output), with its inputs, outputs and the Ray resources it asks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dataprep.stage import StageDir
from flows.config import STAGES, RunConfig, load_config
from flows.dedup import DEDUP, dedup_flow
from flows.evaluate import EvaluateStage, evaluate_flow
from flows.filter import FILTER, filter_flow
from flows.finetune import FINETUNE, finetune_flow
from flows.ingest import INGEST, ingest_flow
from flows.pretrain import PRETRAIN, pretrain_flow
from flows.rag import RAG, rag_flow
from flows.stage import NotYetKnown, StageResult, StageSpec, address, latest_complete
from flows.tokenize import TOKENIZE, tokenize_flow

SPECS: dict[str, StageSpec] = {"ingest": INGEST, "dedup": DEDUP, "filter": FILTER, "tokenize": TOKENIZE,
                               "pretrain": PRETRAIN, "evaluate": EvaluateStage(), "finetune": FINETUNE, "rag": RAG}
FLOWS: dict[str, Any] = {"ingest": ingest_flow, "dedup": dedup_flow, "filter": filter_flow, "tokenize": tokenize_flow,
                         "pretrain": pretrain_flow, "evaluate": evaluate_flow, "finetune": finetune_flow,
                         "rag": rag_flow}
assert tuple(SPECS) == STAGES == tuple(FLOWS)


def stages_until(until: str | None, config: RunConfig | None = None) -> tuple[str, ...]:
    """The stages to run, in order: `until` and the stages it depends on (every enabled stage when None).

    With `until` None, `rag` runs only when `rag.enabled` and `finetune` only when `finetune.data` is set; naming
    one runs it regardless."""
    if until is None:
        return tuple(name for name in STAGES if config is None or _enabled(name, config))
    if until not in STAGES:
        raise ValueError(f"--until {until!r}: choose one of {', '.join(STAGES)}")
    needed: set[str] = set()
    name: str | None = until
    while name is not None:
        needed.add(name)
        name = SPECS[name].upstream
    return tuple(name for name in STAGES if name in needed)


def _enabled(stage: str, config: RunConfig) -> bool:
    if stage == "rag":
        return config.rag.enabled
    if stage == "finetune":
        return config.finetune.enabled
    return True


@flow(name="forgeline-run", log_prints=True)
def pipeline_flow(config: RunConfig, until: str | None = None) -> dict[str, StageResult]:
    """Run the pipeline's stages as subflows; returns each stage's output path and stats."""
    selected = stages_until(until, config)
    get_run_logger().info("stages: %s", ", ".join(selected))
    results: dict[str, StageResult] = {}
    for name in selected:
        upstream = SPECS[name].upstream
        results[name] = FLOWS[name](config, results[upstream]["path"] if upstream else None)
    return results


@flow(name="forgeline-run-file", log_prints=True)
def pipeline_from_file_flow(config_path: str, until: str | None = None) -> dict[str, StageResult]:
    """`pipeline_flow` for a config file path (the entry point of the scheduled deployment)."""
    return pipeline_flow(load_config(config_path), until)


@dataclass
class PlannedStage:
    """One stage of a dry run: where its output would go, what would happen, and why."""

    stage: str
    action: str  # "skip", "run", "resume" or "wait"
    reason: str
    path: str | None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _input_changes(old: list[str], new: list[str]) -> list[str]:
    """Input files (keyed `uri|format|fingerprint`) added, removed or changed; or the upstream stage replaced."""
    if not any("|" in key for key in old + new):
        return [f"upstream changed: {', '.join(old)} → {', '.join(new)}"]
    old_by_uri = {key.split("|", 1)[0]: key for key in old}
    new_by_uri = {key.split("|", 1)[0]: key for key in new}
    changes = [f"input added: {uri}" for uri in sorted(new_by_uri.keys() - old_by_uri.keys())]
    changes += [f"input removed: {uri}" for uri in sorted(old_by_uri.keys() - new_by_uri.keys())]
    changes += [f"input changed: {uri}" for uri in sorted(old_by_uri.keys() & new_by_uri.keys())
                if old_by_uri[uri] != new_by_uri[uri]]
    return changes


def change_reason(name: str, material: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """Why a stage must run: the config fields, inputs or code version that differ from its latest output."""
    if previous is None:
        return "no earlier output of this stage"
    old = previous.get("hash_material") or {"config": previous.get("config"), "inputs": None,
                                            "code": previous.get("code_version")}
    old_config, new_config = _flatten(old["config"], name), _flatten(material["config"], name)
    changes = [f"{key}: {json.dumps(old_config.get(key))} → {json.dumps(new_config.get(key))}"
               for key in sorted(old_config.keys() | new_config.keys()) if old_config.get(key) != new_config.get(key)]
    if old["inputs"] is not None and old["inputs"] != material["inputs"]:
        changes += _input_changes(old["inputs"], material["inputs"])
    if old["code"] != material["code"]:
        changes.append(f"code version {old['code']} → {material['code']}")
    return "; ".join(changes) or "changed since the latest output"


def plan_stage(spec: StageSpec, config: RunConfig, upstream: PlannedStage | None) -> PlannedStage:
    """The dry run of one stage, given the plan of its upstream stage."""
    planned = PlannedStage(spec.name, "run", "", None, outputs=list(spec.output_names),
                           resources=spec.resources(config))
    if spec.upstream is not None:
        assert upstream is not None
        if upstream.path is None:
            planned.action, planned.reason = "wait", f"its address depends on {spec.upstream}, not yet known"
            planned.inputs = [f"{spec.upstream} (not yet known)"]
            return planned
    try:
        inputs = spec.resolve_inputs(config, StageDir(Path(upstream.path)) if upstream and upstream.path else None)
        target = address(spec, config, inputs)
    except NotYetKnown as reason:
        planned.action, planned.reason = "wait", f"its address depends on an output not made yet: {reason}"
        planned.inputs = [f"{spec.upstream}: {upstream.path}"] if upstream else []
        return planned
    planned.path = str(target.stage.path)
    planned.inputs = [entry.get("uri") or entry.get("path", "") for entry in inputs.manifest]
    if target.stage.is_complete():
        planned.action, planned.reason = "skip", "complete"
    elif target.stage.path.is_dir():
        planned.action, planned.reason = "resume", "an unfinished attempt exists; finished work is kept"
    else:
        planned.reason = change_reason(spec.name, target.material, latest_complete(config.run_dir, spec.name))
    return planned


def plan_pipeline(config: RunConfig, until: str | None = None) -> list[PlannedStage]:
    """Every selected stage's plan, in order; computes nothing and writes nothing."""
    plans: dict[str, PlannedStage] = {}
    for name in stages_until(until, config):
        spec = SPECS[name]
        plans[name] = plan_stage(spec, config, plans[spec.upstream] if spec.upstream else None)
    return list(plans.values())


def format_plan(plans: list[PlannedStage]) -> str:
    """The dry run as text: one block per stage."""
    lines = []
    for plan in plans:
        lines.append(f"{plan.stage}: {plan.action.upper()} — {plan.reason}")
        lines.append(f"  output:    {plan.path or '(address known once its input exists)'}")
        lines.append(f"  inputs:    {', '.join(plan.inputs) or '-'}")
        lines.append(f"  writes:    {', '.join(plan.outputs)}")
        lines.append(f"  resources: {', '.join(f'{k}: {v}' for k, v in plan.resources.items()) or '-'}")
    return "\n".join(lines)
