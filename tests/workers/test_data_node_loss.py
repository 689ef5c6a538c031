"""Fault drill: worker nodes of a local Ray cluster die mid-ingest (a task), mid-filter (an actor) and
mid-tokenize (a task); the outputs equal the undisturbed runs' and the recovery is on record."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.drills import run_drill

pytestmark = pytest.mark.integration


def test_ingest_and_filter_survive_a_lost_node(tmp_path: Path) -> None:
    report = run_drill("data_node_loss_drill.py", tmp_path, timeout_s=600)
    assert report["ingest_units"] == 4 and report["ingest_documents"] > 50 and report["filter_shards"] > 2
    assert report["ingest_running_at_removal"] and report["filter_running_at_removal"]
    assert report["ingest_same"] and report["ingest_stats_same"], "ingest output after losing a node is unchanged"
    assert report["ingest_retried"] == [0, 1], "exactly the held unit was rerun, on another node"
    assert report["filter_same"] and report["filter_stats_same"], "filter output after losing a node is unchanged"
    assert report["filter_retried"] == [0, 1], "exactly the held shard was refiltered by the restarted actor"
    assert report["tokenize_running_at_removal"] and report["tokenize_shards"] > 2
    assert report["tokenize_same"], "token streams and packed windows after losing a node are unchanged"
    assert report["tokenize_retried"] == [0, 1]
    assert report["alive_nodes"] == 4  # the head and three workers (each removed node replaced)
