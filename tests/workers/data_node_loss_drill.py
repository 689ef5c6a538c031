"""Failure drill run in its own process by test_data_node_loss: worker nodes die mid-ingest and mid-filter.

A `ray.cluster_utils.Cluster` with a head (no CPUs) and three worker nodes of one CPU runs ingest over the
project's built sample (four input files, one Ray task each) twice, once undisturbed and once with one unit held
in flight (`FORGELINE_DRILL_HOLD`) and the node running it removed; a fresh node joins (as an autoscaler would
add one). Then the filter (an ActorPool of two actors) runs on the ingest output twice in the same way: the
removed node takes a filter actor with it, Ray restarts the actor elsewhere and retries the call. Last, the
tokenize tasks encode the kept shards twice, one held on the node that is removed. Prints one JSON line
comparing each disturbed output with its undisturbed twin and the recovery counters.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.workers.cluster_drill import loopback_cluster  # noqa: E402  (sets Ray's environment first)

# isort: split

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from dataprep.filter.config import FilterConfig  # noqa: E402
from dataprep.ingest.documents import IngestConfig, IngestUnit  # noqa: E402
from dataprep.ingest.inputs import resolve_inputs  # noqa: E402
from dataprep.sample.build import build_sample  # noqa: E402
from dataprep.stage import DATA_DIR, StageDir  # noqa: E402
from workers.drill import ATTEMPTS_DIR, HOLD_ENV  # noqa: E402
from workers.filter import retried_shards, run_filter, shard_target  # noqa: E402
from workers.ingest import retried_units, run_ingest_units, unit_target  # noqa: E402
from workers.tokenize import pack_task, shard_marker, tokenize_shard_task, train_tokenizer_task  # noqa: E402  # noqa: E402
from workers.tokenize import retried_shards as retried_streams

STEPS = [{"rule": "gopher_repetition"}, {"rule": "gopher_quality"}, {"rule": "c4"}, {"rule": "fineweb"}]


def documents(stage: StageDir) -> list[tuple[str, str]]:
    rows = []
    for shard in sorted((stage.path / DATA_DIR).glob("*.parquet")):
        table = pq.read_table(shard, columns=["doc_id", "text"])
        rows += zip(table["doc_id"].to_pylist(), table["text"].to_pylist(), strict=True)
    return sorted(rows)


def untimed(results: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{k: v for k, v in unit.items() if k != "seconds"} for unit in results or []]


def stage_at(path: Path) -> StageDir:
    stage = StageDir(path)
    stage.prepare()
    return stage


def disturbed(work: Callable[[], Any], target: Path, cluster: Any, nodes: list[Any]) -> dict[str, Any]:
    """Run `work` on a thread; when `target`'s held attempt announces its node, remove that node and add a fresh
    one. Returns the work's result and what was seen at removal."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(value=work()))
    thread.start()
    marker = target.parent / ATTEMPTS_DIR / f"{target.name}.held"
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    (victim,) = [node for node in nodes if node.node_id == marker.read_text()]
    running = thread.is_alive()
    cluster.remove_node(victim)
    nodes.remove(victim)
    nodes.append(cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1"))
    thread.join(timeout=400)
    return {"value": result.get("value"), "running_at_removal": running}


def main(folder: str) -> None:
    root = Path(folder)
    sample = root / "sample"
    build_sample(sample, prose_pages=40, warc_files=3)
    files = resolve_inputs([str(sample / "crawl-*.warc.gz"), str(sample / "notes.jsonl.gz")], "auto")
    units = [IngestUnit(i, f.uri, f.fmt) for i, f in enumerate(files)]
    settings = IngestConfig(inputs=[f.uri for f in files], shard_max_records=20)
    held_unit = unit_target(root / "ingest-disturbed", units[1])
    filter_clean_path, filter_disturbed_path = root / "filter-clean", root / "filter-disturbed"
    os.environ[HOLD_ENV] = os.pathsep.join([str(held_unit), "pending"])  # the filter target is added below
    cluster, nodes = loopback_cluster(workers=3, cpus=1, dashboard=False)
    ray.init(address=cluster.address)

    clean_ingest = stage_at(root / "ingest-clean")
    clean_results = run_ingest_units(clean_ingest, units, settings)
    hurt_ingest = stage_at(root / "ingest-disturbed")
    ingest_run = disturbed(lambda: run_ingest_units(hurt_ingest, units, settings), held_unit, cluster, nodes)

    sources = sorted((clean_ingest.path / DATA_DIR).glob("*.parquet"))
    steps = [spec.step() for spec in FilterConfig.model_validate({"steps": STEPS}).steps]
    clean_filter = stage_at(filter_clean_path)
    clean_stats = run_filter(clean_filter, sources, steps, num_actors=2)
    held_shard = shard_target(StageDir(filter_disturbed_path), sources[len(sources) // 2])
    held_stream = shard_marker(root / "streams-disturbed", len(sources) // 2)
    # new worker processes read the hold from the environment of the nodes: the nodes added from here on carry it
    os.environ[HOLD_ENV] = os.pathsep.join([str(held_unit), str(held_shard), str(held_stream)])
    for node in list(nodes):
        cluster.remove_node(node)
        nodes.remove(node)
        nodes.append(cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1"))
    cluster.wait_for_nodes()
    hurt_filter = stage_at(filter_disturbed_path)
    filter_run = disturbed(lambda: run_filter(hurt_filter, sources, steps, num_actors=2), held_shard, cluster, nodes)
    kept = sorted((filter_clean_path / DATA_DIR).glob("*.parquet"))
    tokenizer = ray.get(train_tokenizer_task.remote([str(s) for s in kept], str(root / "tokenizer"), 400, 2,
                                                    "<|endoftext|>", 64))

    def tokenize(name: str) -> dict[str, Any]:
        streams = root / f"streams-{name}"
        streams.mkdir()
        counts = ray.get([tokenize_shard_task.remote(str(source), index, str(Path(tokenizer).parent), str(streams),
                                                     0.2, "<|endoftext|>") for index, source in enumerate(kept)])
        packed = ray.get(pack_task.remote(str(streams), str(root / f"tokens-{name}"), len(kept), 32, 400, 100))
        return {"counts": counts, "packed": packed, "retried": retried_streams(streams)}

    clean_tokens = tokenize("clean")
    tokenize_run = disturbed(lambda: tokenize("disturbed"), held_stream, cluster, nodes)
    print(json.dumps({
        "tokenize_shards": len(kept),
        "tokenize_same": tokenize_run["value"]["packed"] == clean_tokens["packed"]
        and tokenize_run["value"]["counts"] == clean_tokens["counts"],
        "tokenize_running_at_removal": tokenize_run["running_at_removal"],
        "tokenize_retried": [clean_tokens["retried"], tokenize_run["value"]["retried"]],
        "ingest_units": len(units),
        "ingest_documents": len(documents(clean_ingest)),
        "ingest_same": documents(hurt_ingest) == documents(clean_ingest),
        "ingest_stats_same": untimed(ingest_run["value"]) == untimed(clean_results),
        "ingest_running_at_removal": ingest_run["running_at_removal"],
        "ingest_retried": [retried_units(clean_ingest), retried_units(hurt_ingest)],
        "filter_shards": len(sources),
        "filter_kept": len(documents(clean_filter)),
        "filter_same": documents(hurt_filter) == documents(clean_filter),
        "filter_stats_same": filter_run["value"] == clean_stats,
        "filter_running_at_removal": filter_run["running_at_removal"],
        "filter_retried": [retried_shards(clean_filter), retried_shards(hurt_filter)],
        "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
