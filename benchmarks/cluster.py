"""Benchmark: ingest, dedup and filter on a simulated Ray cluster of 1, 2 and 3 worker nodes of one CPU each.

Each size is a fresh `ray.cluster_utils.Cluster` on loopback: a head that schedules but does not compute
(0 CPUs) and N worker nodes with `num_cpus=1`. The real flows attach to it by address (as `forgeline run
--address` does) and run ingest → dedup → filter on the same project-built sample. Per stage and size: docs/s
(stage input documents / stage seconds, warm: one untimed pass first, then `--repeat` passes, median with
min-max), docs/s per node, and the efficiency against one node (rate / (N × one node's rate)).

On a machine with fewer cores than nodes the nodes share cores, so the efficiency there measures the
scheduling overhead only up to the core count (this 2-core machine: 1 and 2 nodes; 3 nodes oversubscribe).

    .venv/bin/python benchmarks/cluster.py [--pages 600] [--repeat 2]

Last line: {"benchmark": "cluster", "metrics": {...}}, also appended to benchmarks/results/cluster.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback test cluster of this process only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every node on 127.0.0.1
for variable in ("RAY_ADDRESS", "PREFECT_API_URL"):
    os.environ.pop(variable, None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
from _record import record, spread  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from dataprep.sample.build import build_sample  # noqa: E402

STAGES = ("ingest", "dedup", "filter")


def run_stages(root: Path, sample: Path, address: str, tag: str) -> dict[str, tuple[int, float]]:
    """ingest → dedup → filter on the cluster at `address` into a fresh run dir: (input docs, seconds) per stage."""
    from flows.config import parse_config
    from flows.pipeline import pipeline_flow

    run_dir = root / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = parse_config({
        "name": "cluster-bench", "run_dir": str(run_dir), "ray": {"address": address},
        "ingest": {"inputs": [str(sample / "crawl-*.warc.gz")], "shard_max_records": 100},
        "dedup": {"components": "partitioned"},
        "filter": {"num_actors": 3, "steps": [{"rule": "gopher_repetition"}, {"rule": "gopher_quality"},
                                              {"rule": "c4"}, {"rule": "fineweb"}]},
    })
    results = pipeline_flow(config, "filter")
    manifests = {stage: json.loads((Path(results[stage]["path"]) / "manifest.json").read_text()) for stage in STAGES}
    return {stage: (m["stats"]["records_in"], m["timings"]["seconds"]) for stage, m in manifests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=600, help="prose pages of the built sample")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fl-cluster-bench-"))
    os.environ["FORGELINE_HOME"] = str(root / "home")
    os.environ["PREFECT_HOME"] = str(root / "home" / "prefect")
    sample = root / "sample"
    summary = build_sample(sample, prose_pages=args.pages, warc_files=8)
    rates: dict[str, dict[int, list[float]]] = {stage: {} for stage in STAGES}
    local = {"node_ip_address": "127.0.0.1"}
    for nodes in args.nodes:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **local})
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, **local)
        cluster.wait_for_nodes()
        run_stages(root, sample, cluster.address, f"{nodes}-warm")  # warm-up: workers, imports, models
        for number in range(args.repeat):
            for stage, (docs, seconds) in run_stages(root, sample, cluster.address, f"{nodes}-{number}").items():
                rates[stage].setdefault(nodes, []).append(docs / seconds)
        print({stage: {n: spread(v) for n, v in by_nodes.items()} for stage, by_nodes in rates.items()}, flush=True)
        ray.shutdown()
        cluster.shutdown()
    table: dict[str, object] = {}
    for stage, by_nodes in rates.items():
        one = statistics.median(by_nodes[min(by_nodes)]) / min(by_nodes)
        table[stage] = {str(n): {"docs_per_s": spread(v), "docs_per_s_per_node": round(statistics.median(v) / n, 1),
                                 "efficiency": round(statistics.median(v) / (n * one), 2)}
                        for n, v in sorted(by_nodes.items())}
    shutil.rmtree(root, ignore_errors=True)
    record("cluster", {"pages": summary["pages"], "repeat": args.repeat, "cores": os.cpu_count(), "stages": table})


if __name__ == "__main__":
    main()
