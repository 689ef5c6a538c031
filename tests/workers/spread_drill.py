"""Drill run in its own process by test_multinode: the data stages on a simulated 3-node Ray cluster.

A `ray.cluster_utils.Cluster` with a head that schedules but does not compute (0 CPUs) and two worker nodes of
one CPU each; the real flows (ingest → dedup → filter → rag, then tokenize) attach to it through `ray.address`,
as `forgeline run --address` does on a real cluster. Prints one JSON line: for each stage's tasks or actors (by
Ray's State API), the distinct nodes they ran on, plus the stage counts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.workers.cluster_drill import loopback_cluster  # noqa: E402  (sets Ray's environment first)

# isort: split

import ray  # noqa: E402
from ray.util.state import list_actors, list_tasks  # noqa: E402

from dataprep.sample.build import build_sample  # noqa: E402

TASKS = {"ingest": "ingest_file_task", "dedup": "signature_task", "tokenize": "tokenize_shard_task"}
ACTORS = {"filter": "FilterActor", "rag": "MapWorker"}


def nodes_of_tasks(name: str, wait_s: float = 60.0) -> list[str]:
    """Nodes that ran `name`'s finished tasks. Task events reach the State API asynchronously (workers flush them
    about once a second), so the last stage's may not be there yet: poll until some are, or `wait_s` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        tasks = list_tasks(filters=[("func_or_class_name", "=", name)], limit=10_000, raise_on_missing_output=False)
        nodes = sorted({t.node_id for t in tasks if t.node_id and t.state == "FINISHED"})
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def nodes_of_actors(prefix: str) -> list[str]:
    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    return sorted({a.node_id for a in actors if a.class_name.startswith(prefix) and a.node_id})


def prose_stage(directory: Path, reference: Path, copies: int = 16, shards: int = 2) -> Path:
    """A complete filter-like stage of `shards` shards holding `copies` copies of the reference articles."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.stage import StageDir

    texts = [json.loads(line)["text"] for line in reference.read_text().splitlines()] * copies
    (directory / "data").mkdir(parents=True)
    for shard in range(shards):
        part = texts[shard::shards]
        ids = [f"prose-{shard}-{i}" for i in range(len(part))]
        pq.write_table(pa.table({"doc_id": ids, "text": part}), directory / "data" / f"part-{shard:05d}-00000.parquet")
    StageDir(directory).publish({"stage": "filter", "name": directory.name, "stats": {}})
    return directory


def main(folder: str) -> None:
    root = Path(folder)
    build_sample(root / "sample", prose_pages=60, warc_files=4)
    cluster, nodes = loopback_cluster(workers=2, cpus=1)
    workers = {node.node_id for node in nodes}
    os.environ["FORGELINE_HOME"] = str(root / "home")
    os.environ["PREFECT_HOME"] = str(root / "home" / "prefect")

    from flows.config import parse_config
    from flows.pipeline import pipeline_flow
    from flows.tokenize import tokenize_flow

    config = parse_config({
        "name": "spread", "run_dir": str(root / "run"), "ray": {"address": cluster.address},
        "ingest": {"inputs": [str(root / "sample" / "crawl-*.warc.gz")], "shard_max_records": 10},
        "filter": {"num_actors": 2, "steps": [{"rule": "gopher_repetition"}, {"rule": "c4"}]},
        "tokenize": {"vocab_size": 300, "seq_len": 32},
        "rag": {"num_actors": 2},
    })
    results = pipeline_flow(config, "rag")
    # Tokenizing a shard of the filter output above takes milliseconds: the owner's leased worker would run them
    # all before a second node's lease arrived (Ray reuses a lease for queued tasks of the same kind). Real
    # shards take seconds; so do the two shards of this corpus (the sample's reference prose, 16 times over),
    # on a cluster whose nodes each have a warm worker, as a long-lived cluster does.
    warm = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(lambda: ray.get_runtime_context().get_node_id())
    while len(set(ray.get([warm.remote() for _ in range(4)]))) < 2:
        pass
    tokens = tokenize_flow(config, str(prose_stage(root / "prose", root / "sample" / "reference.jsonl")))
    report = {
        "worker_nodes": sorted(workers),
        "nodes": {**{stage: nodes_of_tasks(name) for stage, name in TASKS.items()},
                  **{stage: nodes_of_actors(name) for stage, name in ACTORS.items()}},
        "records": {stage: results[stage]["stats"].get("records_out") for stage in ("ingest", "dedup", "filter")},
        "tokens": tokens["stats"]["records_in"],
        "prose_documents": 16 * len((root / "sample" / "reference.jsonl").read_text().splitlines()),
        "chunks": results["rag"]["stats"]["chunks"],
    }
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
