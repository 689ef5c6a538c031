"""The evaluate flow over a real (small) training run: every checkpoint once, bad tasks/checkpoints isolated,
`--watch` picking up checkpoints written while it runs, and the deployment trigger in infra/prefect.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from dataprep.evaluate.tasks import write_bundled_tasks
from dataprep.stage import StageDir
from flows.config import RunConfig, parse_config
from tests.conftest import REPO_ROOT, reference_documents, write_corpus_stage

pytestmark = pytest.mark.integration


def make_config(run_dir: Path, tasks: list[Path]) -> RunConfig:
    return parse_config({
        "name": "eval-test", "run_dir": str(run_dir), "ray": {"num_cpus": 2},
        "ingest": {"inputs": ["unused.jsonl"]},
        "tokenize": {"vocab_size": 512, "seq_len": 32, "holdout": 0.1},
        "pretrain": {"model": {"preset": "tiny", "dim": 64, "n_layers": 2, "ffn_dim": 160, "max_seq_len": 64},
                     "steps": 30, "micro_batch": 8, "lr": 5e-3, "warmup_steps": 4},
        "evaluate": {"tasks": [str(t) for t in tasks], "max_windows": 32, "watch_interval": 0.3},
    })


def write_tasks(directory: Path) -> list[Path]:
    directory.mkdir(parents=True)
    write_bundled_tasks(directory, [text for _, text in reference_documents(60)], count=30)
    (directory / "continuation.yaml").write_text(
        "name: continuation\ntype: choice\ndata: continuation.jsonl\ntemplate: '{context}'\n"
        "choices_field: choices\nk: 2\nmax_examples: 20\n")
    (directory / "completion.yaml").write_text(
        "name: completion\ntype: generate\ndata: completion.jsonl\ntemplate: '{prompt}'\nk: 1\n"
        "max_examples: 10\nmax_new_tokens: 8\n")
    (directory / "broken.yaml").write_text("name: broken\ntype: choice\ndata: continuation.jsonl\nchoices: [a]\n")
    return [directory / "continuation.yaml", directory / "broken.yaml", directory / "completion.yaml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prefect_server: None, ray_local: None) -> dict[str, Any]:
    """Tokenize on Ray, then train 30 steps in one process (torchrun path) with checkpoints at 0, 10, 20, 30."""
    from flows.pretrain import train_job
    from flows.tokenize import tokenize_flow

    root = tmp_path_factory.mktemp("evalrun")
    config = make_config(root / "run", write_tasks(root / "tasks"))
    corpus = write_corpus_stage(root / "filter-test", reference_documents(120))
    tokens = Path(tokenize_flow(config, str(corpus))["path"])
    stage = config.run_dir / "pretrain-test"
    job = train_job(config, tokens, stage)
    settings = job.config.model_copy(update={"checkpoint_initial": True, "checkpoint_every": 10, "keep_last": 10,
                                             "eval_every": 30})
    (root / "spec.json").write_text(job.model_copy(update={"config": settings}).model_dump_json())
    done = subprocess.run([sys.executable, "-m", "workers.pretrain", str(root / "spec.json")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"config": config, "stage": stage}


def rows_by(stage_path: Path) -> dict[tuple[int, str, str], float]:
    table = pq.read_table(stage_path / "results.parquet").to_pylist()
    return {(r["step"], r["task"], r["metric"]): r["value"] for r in table}


def test_every_checkpoint_evaluated_once_and_errors_isolated(run: dict[str, Any]) -> None:
    from flows.evaluate import evaluate_flow

    first = evaluate_flow(run["config"], str(run["stage"]))
    values = rows_by(Path(first["path"]))
    assert {step for step, _, _ in values} == {0, 10, 20, 30}
    assert values[(30, "heldout", "perplexity")] < values[(0, "heldout", "perplexity")]
    assert values[(0, "continuation", "chance")] == 0.5 and (0, "continuation", "accuracy") in values
    assert {(30, "completion", m) for m in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")} <= set(values)
    assert "`broken`" in first["stats"]["table"], "the broken task is reported; the others ran"
    assert (Path(first["path"]) / "metrics.png").stat().st_size > 1000
    assert not StageDir(Path(first["path"])).is_complete(), "the pretrain stage is not complete yet"
    again = evaluate_flow(run["config"], str(run["stage"]))
    assert again["stats"]["evaluated_now"] == 0


def test_watch_picks_up_new_checkpoints_and_isolates_a_bad_one(run: dict[str, Any]) -> None:
    from flows.evaluate import evaluate_flow

    checkpoints = run["stage"] / "checkpoints"
    outcome: dict[str, Any] = {}
    watcher = threading.Thread(target=lambda: outcome.update(
        evaluate_flow(run["config"], str(run["stage"]), watch=True, timeout_s=240)))
    watcher.start()
    time.sleep(3)
    for step, dim in ((40, None), (50, 96)):  # a new checkpoint, and one whose shards do not fit its shape
        target = checkpoints / f"step-{step:08d}"
        shutil.copytree(checkpoints / "step-00000030", checkpoints / f".tmp-{step}")
        state = json.loads((checkpoints / f".tmp-{step}" / "train_state.json").read_text())
        state["step"] = step
        if dim:
            state["model"]["dim"] = dim
        (checkpoints / f".tmp-{step}" / "train_state.json").write_text(json.dumps(state))
        (checkpoints / f".tmp-{step}").rename(target)
    deadline = time.time() + 120
    evaluated = None
    while time.time() < deadline:
        evaluated = {p.stem for p in Path(run["config"].run_dir).glob("evaluate-*/results/*.parquet")}
        if {"step-00000040", "step-00000050"} <= evaluated:
            break
        time.sleep(0.5)
    StageDir(run["stage"]).publish({"stage": "pretrain", "stats": {}})  # training "finishes": the watch ends
    watcher.join(timeout=120)
    assert not watcher.is_alive() and outcome, "watch returned after the stage completed"
    assert {"step-00000040", "step-00000050"} <= (evaluated or set())
    values = rows_by(Path(outcome["path"]))
    assert values[(40, "heldout", "perplexity")] == values[(30, "heldout", "perplexity")]
    assert not any(step == 50 for step, _, _ in values), "the bad checkpoint has no rows"
    side = json.loads((Path(outcome["path"]) / "results" / "step-00000050.json").read_text())
    assert "cannot load: Size mismatch" in side["errors"][0]["error"]
    assert StageDir(Path(outcome["path"])).is_complete()


def test_checkpoint_event_runs_the_triggered_evaluate_deployment(run: dict[str, Any], tmp_path: Path) -> None:
    """The deployment of infra/prefect.yaml served by a runner; the pretrain stage's own emitter announces a new
    checkpoint; the server's automation starts `evaluate-checkpoint` for it, which writes that step's results."""
    import os

    from prefect import flow, get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL

    from flows.pretrain import emit_checkpoint_events
    from workers.checkpoint import JOURNAL_FILE

    config = run["config"]
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    checkpoints = run["stage"] / "checkpoints"
    new = checkpoints / "step-00000090"
    shutil.copytree(checkpoints / "step-00000030", new)
    state = json.loads((new / "train_state.json").read_text())
    (new / "train_state.json").write_text(json.dumps({**state, "step": 90}))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop("RAY_ADDRESS", None)
    runner = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_evaluate_deployment.py")),
                               str(config_file)], env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "runner.log", "w"))  # noqa: SIM115
    try:
        deadline = time.time() + 120
        with get_client(sync_client=True) as client:
            named = DeploymentFilter(name=DeploymentFilterName(any_=["evaluate-on-checkpoint"]))
            while not client.read_deployments(deployment_filter=named) and time.time() < deadline:
                time.sleep(0.5)
            time.sleep(2)  # the automation is created with the deployment
        journal = checkpoints / JOURNAL_FILE
        saved = journal.read_text()
        journal.write_text(saved + json.dumps({"step": 90, "path": str(new), "metrics": {}}) + "\n")
        announced = {line for line in saved.splitlines() if line}
        flow(name="announce")(lambda: emit_checkpoint_events(
            StageDir(run["stage"]), {json.loads(line)["path"] for line in announced}))()
        result = None
        while time.time() < deadline + 120 and result is None:
            found = list(config.run_dir.glob("evaluate-*/results/step-00000090.parquet"))
            result = found[0] if found else None
            time.sleep(0.5)
        assert result is not None, (tmp_path / "runner.log").read_text()[-3000:]
        steps = {row["step"] for row in pq.read_table(result).to_pylist()}
        assert steps == {90}
    finally:
        runner.terminate()
        runner.wait(timeout=60)
        journal.write_text(saved)
        shutil.rmtree(new)


def test_prefect_yaml_declares_the_checkpoint_trigger() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    import flows.evaluate

    spec = yaml.safe_load((REPO_ROOT / "infra" / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "evaluate-on-checkpoint")
    module, _, name = deployment["entrypoint"].partition(":")
    assert module == "flows/evaluate.py" and getattr(flows.evaluate, name).name == "evaluate-checkpoint"
    trigger = DeploymentEventTrigger.model_validate(deployment["triggers"][0])
    assert trigger.expect == {"forgeline.checkpoint.saved"}
    assert trigger.parameters["checkpoint"] == "{{ event.payload.path }}"
