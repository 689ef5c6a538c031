"""Ray Serve with two engine replicas on different simulated nodes; one replica's process killed under load
(`serve_replica_drill.py`): no request lost, the generations it held rerun on the other replica, the replica
replaced, outputs unchanged. A victim caught between requests (nothing to rerun) is followed by another kill, up
to three: the test still requires that one of them held generations that were rerun."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.drills import run_drill

pytestmark = pytest.mark.integration


def test_killing_an_engine_replica_loses_no_request(tmp_path: Path) -> None:
    report = run_drill("serve_replica_drill.py", tmp_path, timeout_s=600)
    before, after = report["before"], report["after"]
    assert sorted(r["node"] for r in before) == report["worker_nodes"], "one engine replica on each worker node"
    replaced = not set(report["victims"]) & {r["id"] for r in after}
    assert len(after) == 2 and replaced, "the killed replicas were replaced"
    assert set(report["statuses"]) == {200}, f"every request answered in full: {sorted(set(report['statuses']))}"
    assert report["retried"] >= 1, "the generations on the killed replica were rerun (the recovery ran)"
    assert len(report["statuses"]) >= report["recovered_at"] + 8 > report["served_before_kill"]
    assert report["same_output"], "greedy output after recovery equals the output before"
