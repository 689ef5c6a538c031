"""Failure drill run in its own process by test_dedup_node_loss: a worker node dies mid-dedup.

A `ray.cluster_utils.Cluster` with a head (no CPUs: it schedules, it does not compute) and two worker nodes of
one CPU runs the dedup twice on the same shards: once undisturbed, once with one signature task held in flight
(`FORGELINE_DRILL_HOLD`) and the worker node running it removed. Ray retries that task on the other node.
Prints one JSON line comparing the two outputs and the recovery counters.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.workers.cluster_drill import loopback_cluster  # noqa: E402  (sets Ray's environment first)

# isort: split

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from tests.workers.test_dedup_workers import PARAMS, _corpus, _write_shards  # noqa: E402
from workers.dedup import ATTEMPTS_DIR, HOLD_ENV, read_audit, run_dedup  # noqa: E402

RECOVERY: dict[str, dict] = {}


def outcome(root: Path, sources: list[Path]) -> tuple[list, list]:
    stats, audit = run_dedup(sources, root / "work", root / "out", root / "tmp", PARAMS)
    rows = read_audit(audit)
    RECOVERY[root.name] = stats["recovery"]
    kept = sorted(d for p in sorted((root / "out").glob("*.parquet")) for d in pq.read_table(p)["doc_id"].to_pylist())
    return sorted((r["doc_id"], r["representative_id"], r["method"]) for r in rows), kept


def main(folder: str) -> None:
    root = Path(folder)
    docs, _ = _corpus(random.Random(5), originals=240)
    sources = _write_shards(root / "in", docs, 6)
    held = root / "disturbed" / "work" / "sig" / sources[len(sources) // 2].name
    os.environ[HOLD_ENV] = str(held)  # the nodes started below (and so their workers) inherit it
    cluster, workers = loopback_cluster(workers=2, cpus=1, dashboard=False)
    ray.init(address=cluster.address)
    reference = outcome(root / "clean", sources)

    result: dict[str, object] = {}
    disturbed_root = root / "disturbed"
    marker = held.parent / ATTEMPTS_DIR / f"{held.name}.held"
    thread = threading.Thread(target=lambda: result.update(value=outcome(disturbed_root, sources)))
    thread.start()
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    held_on = marker.read_text()
    running = thread.is_alive()
    kept_shards = len(list((disturbed_root / "out").glob("*.parquet")))
    (victim,) = [node for node in workers if node.node_id == held_on]
    cluster.remove_node(victim)
    thread.join(timeout=300)
    print(json.dumps({
        "same": result.get("value") == reference,
        "running_at_removal": running,
        "kept_shards_at_removal": kept_shards,
        "sig_shards": len(sources),
        "duplicates": len(reference[0]),
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "recovery_clean": RECOVERY.get("clean"),
        "recovery_disturbed": RECOVERY.get("disturbed"),
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
