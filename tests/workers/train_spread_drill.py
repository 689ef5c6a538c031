"""Drill run in its own process by test_train_spread: Ray Train across simulated nodes, a worker killed.

A `ray.cluster_utils.Cluster` with a head that schedules but does not compute (0 CPUs) and two worker nodes of
two CPUs each (both workers would fit on one). The real pretrain flow trains a small model with two Ray Train
workers placed `SPREAD` (one per node, FSDP2 over gloo), once undisturbed and once with the last rank
SIGKILLing itself after step 13
(`FORGELINE_INJECT_FAULT=pretrain:13:kill`); Ray Train restarts the group from the latest checkpoint.
Prints one JSON line: the nodes the training workers ran on, the steps each run resumed from, and both runs'
logged losses.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.workers.cluster_drill import loopback_cluster  # noqa: E402  (sets Ray's environment first)

# isort: split

from ray.util.state import list_actors  # noqa: E402

COMPARED = ("loss", "grad_norm", "lr", "val_loss")


def train_worker_nodes() -> list[str]:
    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    return sorted({a.node_id for a in actors if "TrainWorker" in a.class_name and a.node_id})


def main(folder: str) -> None:
    root = Path(folder)
    cluster, nodes = loopback_cluster(workers=2, cpus=2)
    # two CPUs per node: both workers would fit on one node, so landing on both is the SPREAD placement's doing
    workers = {node.node_id for node in nodes}
    os.environ["FORGELINE_HOME"] = str(root / "home")
    os.environ["PREFECT_HOME"] = str(root / "home" / "prefect")

    from dataprep.evaluate.curves import read_metrics
    from flows.config import parse_config
    from flows.pretrain import pretrain_flow
    from flows.tokenize import tokenize_flow
    from tests.conftest import reference_documents, write_corpus_stage

    def config(run: str):  # type: ignore[no-untyped-def]
        return parse_config({
            "name": "train-spread", "run_dir": str(root / run), "ray": {"address": cluster.address},
            "ingest": {"inputs": ["unused.jsonl"]},
            "tokenize": {"vocab_size": 512, "seq_len": 32, "holdout": 0.1, "windows_per_shard": 50},
            "pretrain": {"model": {"preset": "tiny", "dim": 64, "n_layers": 2, "ffn_dim": 160, "max_seq_len": 64},
                         "steps": 24, "micro_batch": 4, "lr": 5e-3, "warmup_steps": 4, "num_workers": 2,
                         "placement_strategy": "SPREAD", "checkpoint_every": 8, "eval_every": 8,
                         "eval_windows": 16, "keep_last": 2, "max_failures": 1}})

    corpus = write_corpus_stage(root / "corpus" / "filter-test", reference_documents(120))
    tokens = tokenize_flow(config("undisturbed"), str(corpus))["path"]
    undisturbed = pretrain_flow(config("undisturbed"), tokens)
    os.environ["FORGELINE_INJECT_FAULT"] = "pretrain:13:kill"
    killed = pretrain_flow(config("killed"), tokens)

    def losses(result: dict) -> list[list[object]]:  # type: ignore[type-arg]
        return [[row.get(k) for k in COMPARED] for row in read_metrics(Path(result["path"]) / "metrics.jsonl")]

    print(json.dumps({
        "worker_nodes": sorted(workers), "train_nodes": train_worker_nodes(),
        "fault_marker": (Path(killed["path"]) / ".fault-step-13").is_file(),
        "resumed": {"undisturbed": undisturbed["stats"]["resumed_from_steps"],
                    "killed": killed["stats"]["resumed_from_steps"]},
        "losses": {"undisturbed": losses(undisturbed), "killed": losses(killed)}}))
    import ray

    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
