"""Fault drill: a worker node of a 3-node local Ray cluster dies mid-dedup; the output is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_worker_node_removed_mid_stage(tmp_path: Path) -> None:
    drill = Path(__file__).with_name("node_loss_drill.py")
    done = subprocess.run([sys.executable, str(drill), str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The node dies while the stage runs: signatures can all be done by then (they take ~0.1 s), but no kept
    # shard is written until bucketing, verification and components are over.
    assert report["running_at_removal"], "the node died while the stage was running"
    assert report["kept_shards_at_removal"] < report["sig_shards"]
    assert report["alive_nodes"] == 2 and report["duplicates"] == 120
    assert report["same"], "output after losing a node equals the undisturbed run"
    # the stats count recovery (0 when nothing was lost). Whether this drill's removal lands inside a signature
    # task's user code is timing-dependent (shards of 6 documents: most of a task is Ray's own start-up), so the
    # disturbed counters are reported, not asserted: a deterministic in-flight kill is still owed (issue 14)
    assert report["recovery_clean"] == {"signature_tasks_retried": 0, "bucket_phase_redone": 0}
    assert set(report["recovery_disturbed"]) == {"signature_tasks_retried", "bucket_phase_redone"}
