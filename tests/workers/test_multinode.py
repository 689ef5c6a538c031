"""The data stages spread over the worker nodes of a simulated multi-node Ray cluster (`spread_drill.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_data_stages_run_on_both_worker_nodes(tmp_path: Path) -> None:
    drill = Path(__file__).with_name("spread_drill.py")
    done = subprocess.run([sys.executable, str(drill), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    workers = report["worker_nodes"]
    assert len(workers) == 2
    for stage, nodes in report["nodes"].items():
        # the head has no CPUs: every task and actor ran on a worker node, and on both of them
        assert nodes == workers, f"{stage} ran on {nodes}, not on both worker nodes {workers}"
    assert report["records"]["ingest"] > report["records"]["dedup"] > report["records"]["filter"] > 0
    assert report["tokens"] == report["records"]["filter"] and report["chunks"] > 0
