"""The data stages spread over the worker nodes of a simulated multi-node Ray cluster (`spread_drill.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.drills import run_drill

pytestmark = pytest.mark.integration


def test_data_stages_run_on_both_worker_nodes(tmp_path: Path) -> None:
    report = run_drill("spread_drill.py", tmp_path, timeout_s=600)
    workers = report["worker_nodes"]
    assert len(workers) == 2
    for stage, nodes in report["nodes"].items():
        # the head has no CPUs: every task and actor ran on a worker node, and on both of them
        assert nodes == workers, f"{stage} ran on {nodes}, not on both worker nodes {workers}"
    assert report["records"]["ingest"] > report["records"]["dedup"] > report["records"]["filter"] > 0
    assert report["tokens"] == report["prose_documents"] and report["chunks"] > 0
