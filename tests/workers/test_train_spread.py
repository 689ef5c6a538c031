"""Ray Train with `placement_strategy: SPREAD` over simulated nodes; a training worker killed mid-run restarts
from the latest checkpoint and logs the same losses as the undisturbed run (`train_spread_drill.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.drills import run_drill

pytestmark = pytest.mark.integration


def test_spread_training_resumes_exactly_after_a_worker_is_killed(tmp_path: Path) -> None:
    report = run_drill("train_spread_drill.py", tmp_path, timeout_s=900)
    assert report["train_nodes"] == report["worker_nodes"], "the two training workers ran on different nodes"
    assert report["fault_marker"], "the worker was killed"
    assert report["resumed"] == {"undisturbed": [], "killed": [8]}, "restarted from step 8's checkpoint"
    undisturbed, killed = report["losses"]["undisturbed"], report["losses"]["killed"]
    assert len(undisturbed) >= 3 and killed == undisturbed, "the loss curve after resume equals the undisturbed one"
