"""tokenize + pretrain on real Ray Train (2 workers, FSDP2 over gloo) and a real Prefect server.

One undisturbed run is shared by the module; a second run loses a worker to SIGKILL mid-training and must
log the same losses at every step; the torchrun launch of the same spec must log them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dataprep.evaluate.curves import read_metrics
from flows.config import ConfigError, parse_config
from tests.conftest import REPO_ROOT, reference_documents, write_corpus_stage
from tests.flows.conftest import make_config
from workers.checkpoint import complete_checkpoints, read_journal

pytestmark = pytest.mark.integration
COMPARED = ("loss", "grad_norm", "lr", "val_loss")


@pytest.fixture(scope="module")
def reference_run(pretrained_run: dict[str, Any]) -> dict[str, Any]:
    """The session's undisturbed tokenize + pretrain run (tests/flows/conftest.py)."""
    return pretrained_run


def test_tokenize_counts_add_up(reference_run: dict[str, Any]) -> None:
    stats = reference_run["tokens"]["stats"]
    index = json.loads((Path(reference_run["tokens"]["path"]) / "tokens" / "index.json").read_text())
    assert stats["records_in"] == len(reference_documents(120)) > 50 and stats["vocab_size"] == 512
    for split in ("train", "val"):
        part = index["splits"][split]
        assert part["documents"] + part["document_tokens"] == part["stream_tokens"]
        assert part["stream_tokens"] == part["windows"] * 33 + part["tail_tokens"]
    assert index["splits"]["val"]["documents"] > 0 and stats["val_windows"] > 0


def test_pretrain_learns_checkpoints_and_exports(reference_run: dict[str, Any]) -> None:
    stage = Path(reference_run["trained"]["path"])
    stats = reference_run["trained"]["stats"]
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert sum(r["loss"] for r in rows[-4:]) / 4 < rows[0]["loss"] - 0.5, "loss decreases"
    assert stats["final_val_loss"] < stats["unigram_val_loss"]
    checkpoints = sorted(p.name for p in (stage / "checkpoints").iterdir())
    assert checkpoints == ["saved.jsonl", "step-00000016", "step-00000024"]  # keep_last 2, and the save journal
    assert [e["step"] for e in read_journal(stage / "checkpoints")] == [0, 8, 16, 24]
    shards = list((stage / "checkpoints" / "step-00000024").glob("*.distcp"))
    assert len(shards) == 2, "one DCP shard file per rank"
    assert (stage / "loss.png").stat().st_size > 1000
    assert {p.name for p in (stage / "hf").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_checkpoint_events_reach_prefect(reference_run: dict[str, Any]) -> None:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    stage_name = Path(reference_run["trained"]["path"]).name
    this_stage = EventFilter(event=EventNameFilter(name=["forgeline.checkpoint.saved"]),  # other tests emit more
                             resource=EventResourceFilter(id_prefix=[f"forgeline.checkpoint.{stage_name}."]))
    deadline, steps = time.time() + 30, set()
    while time.time() < deadline and steps != {0, 8, 16, 24}:
        with get_client(sync_client=True) as client:
            page = client.read_events(this_stage, limit=50)
        steps = {e.payload["step"] for e in page.events
                 if e.payload["path"].startswith(reference_run["trained"]["path"] + "/")}
        time.sleep(0.5)
    assert steps == {0, 8, 16, 24}  # step 0: the initialised model (checkpoint_initial)


def test_loss_curve_is_an_image_artifact_of_the_flow_run(reference_run: dict[str, Any]) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.common import png_data_url

    loss_png = Path(reference_run["trained"]["path"]) / "loss.png"
    with get_client(sync_client=True) as client:
        images = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-loss"])))
        reports = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-stats"])))
    ours = [a for a in images if a.data == png_data_url(loss_png)]
    assert ours and ours[0].type == "image" and ours[0].flow_run_id is not None
    assert any(f"`{loss_png}` (image artifact `pretrain-loss`)" in (a.data or "") for a in reports)


def test_rerun_of_a_complete_stage_is_skipped(reference_run: dict[str, Any]) -> None:
    from flows.pretrain import pretrain_flow

    again = pretrain_flow(reference_run["config"], reference_run["tokens"]["path"])
    assert again["skipped"] and again["path"] == reference_run["trained"]["path"]


def test_worker_killed_mid_training_resumes_bit_identically(reference_run: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pretrain import pretrain_flow

    config = make_config(tmp_path / "run")
    monkeypatch.setenv("FORGELINE_INJECT_FAULT", "pretrain:13:kill")  # rank 1 SIGKILLs itself after step 13
    result = pretrain_flow(config, reference_run["tokens"]["path"])
    stage = Path(result["path"])
    assert (stage / ".fault-step-13").is_file(), "the worker was killed"
    # recovery ran, from the last checkpoint before the kill (every 8 steps: step 8), not from scratch
    assert result["stats"]["resumed_from_steps"] == [8]
    assert reference_run["trained"]["stats"]["resumed_from_steps"] == []
    expected = read_metrics(Path(reference_run["trained"]["path"]) / "metrics.jsonl")
    resumed = read_metrics(stage / "metrics.jsonl")
    assert [[r.get(k) for k in COMPARED] for r in resumed] == [[r.get(k) for k in COMPARED] for r in expected]


def test_torchrun_gives_the_same_losses_as_ray_train(reference_run: dict[str, Any], tmp_path: Path) -> None:
    state = json.loads(complete_checkpoints(Path(reference_run["trained"]["path"]) / "checkpoints")[-1]
                       .joinpath("train_state.json").read_text())
    spec = {**state["spec"], "out_dir": str(tmp_path / "torchrun"), "fault_step": None}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", "29517", "-m", "workers.pretrain",
                           str(tmp_path / "spec.json")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = read_metrics(Path(reference_run["trained"]["path"]) / "metrics.jsonl")
    got = read_metrics(tmp_path / "torchrun" / "metrics.jsonl")
    assert [[r.get(k) for k in COMPARED] for r in got] == [[r.get(k) for k in COMPARED] for r in expected]


def test_bad_inputs_fail_before_training(reference_run: dict[str, Any], corpus: Path, tmp_path: Path) -> None:
    from flows.pretrain import pretrain_flow
    from flows.tokenize import tokenize_flow

    with pytest.raises(ConfigError, match=r"tokenize.seq_len 32 is larger than the model's context"):
        make_config(tmp_path / "a", model={"preset": "tiny", "max_seq_len": 16})  # caught by `forgeline validate`
    too_long = make_config(tmp_path / "a", seq_len=8, model={"preset": "tiny", "max_seq_len": 16})
    with pytest.raises(ValueError, match=r"tokenize.seq_len 32 is larger than the model's context"):
        pretrain_flow(too_long, reference_run["tokens"]["path"])  # windows of an existing tokenize stage
    missing = parse_config({**make_config(tmp_path / "b").model_dump(mode="json"),
                            "tokenize": {"seq_len": 32, "tokenizer": str(tmp_path / "missing" / "tokenizer.json")}})
    with pytest.raises(ValueError, match="tokenizer not found"):
        tokenize_flow(missing, str(corpus))
    empty = write_corpus_stage(tmp_path / "filter-empty", [])
    with pytest.raises(ValueError, match="empty corpus"):
        tokenize_flow(make_config(tmp_path / "c"), str(empty))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists(), "nothing was written"
