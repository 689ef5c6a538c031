"""Drill run in its own process by test_serve_replica_loss: an engine replica's process killed under load.

A `ray.cluster_utils.Cluster` whose head runs Serve's controller, proxy and ingress (0-CPU actors) and two worker
nodes of one CPU each, so the app's two engine replicas (`min_replicas: 2`, one CPU each, a deployment of their
own: `colocate: false`) land one per node.
Clients keep sending greedy completions; one engine replica's process is killed with SIGKILL mid-load. The
ingress reruns the generations that were on it on the other replica (`engine_retries`), Serve's controller
replaces the dead replica. A victim caught with nothing in flight (no rerun counted) is followed by another kill,
up to MAX_KILLS. Prints one JSON line: the replicas' nodes before and after, every response's status,
how many generations were rerun, and whether a seeded request's output after recovery equals the one before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.workers.cluster_drill import loopback_cluster  # noqa: E402  (sets Ray's environment first)

# isort: split

import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from dataprep.tokenize.tokenizer import save_tokenizer, train_bpe  # noqa: E402
from workers.checkpoint import save_checkpoint  # noqa: E402
from workers.export import export_hf  # noqa: E402
from workers.model import Transformer  # noqa: E402
from workers.model_config import ModelConfig  # noqa: E402

# enough clients and tokens that both replicas hold generations at any instant (the engine runs in a process of
# its own and finishes a 200-token request of this model in a fraction of a second: with 4 clients the victim was
# sometimes caught between requests, and nothing was left to rerun)
CLIENTS = 8
MAX_KILLS = 3  # replicas killed at most, one after another, until one held generations (see main)
PAYLOAD = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def tiny_model(root: Path) -> Path:
    config = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    model = Transformer(config)
    model.init_weights(5)
    checkpoint = save_checkpoint(root / "ckpt", 1, model, torch.optim.AdamW(model.parameters()),
                                 {"model": config.to_dict()}, keep_last=1)
    save_tokenizer(train_bpe(["the cat sat on the mat. a dog ran in the park."] * 20, 300), root / "tok")
    return export_hf(checkpoint, root / "tok", root / "hf")


def engine_replicas() -> list[dict[str, object]]:
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [{"id": a.actor_id, "node": a.node_id, "pid": a.pid} for a in actors
            if re.fullmatch(r"ServeReplica:drill:engine", a.class_name)]


def rerun_count(base: str) -> float:
    """The ingress's count of generations rerun because their engine replica died."""
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.search(r"^forgeline_engine_retries_total ([0-9.]+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def load(base: str, statuses: list[int], stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=120) as http:
        while not stop.is_set():
            response = http.post("/v1/completions", json=PAYLOAD)
            answered = response.status_code == 200
            complete = answered and response.json()["usage"]["completion_tokens"] == PAYLOAD["max_tokens"]
            statuses.append(response.status_code if complete or response.status_code != 200 else -1)


def main(folder: str) -> None:
    from serving.app import app_builder

    root = Path(folder)
    hf = tiny_model(root)
    cluster, nodes = loopback_cluster(workers=2, cpus=1)
    workers = {node.node_id for node in nodes}
    ray.init(address=cluster.address)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(app_builder({"model": str(hf), "name": "tiny", "engine_cpus": 1, "min_replicas": 2, "max_replicas": 2,
                           "colocate": False, "access_log": False}), name="drill", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    reference = httpx.post(f"{base}/v1/completions", json=PAYLOAD, timeout=120).json()["choices"][0]["text"]
    before = engine_replicas()
    statuses: list[int] = []
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(base, statuses, stop)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    while len(statuses) < 8:
        time.sleep(0.05)
    served_before_kill = len(statuses)
    victims: list[str] = []
    for _ in range(MAX_KILLS):  # a replica caught between requests holds nothing to rerun: then kill again
        retried_before = rerun_count(base)
        victim = engine_replicas()[0]
        victims.append(str(victim["id"]))
        os.kill(int(victim["pid"]), signal.SIGKILL)  # every node runs on this machine: its process is local
        deadline = time.time() + 120
        while time.time() < deadline:
            after = engine_replicas()
            if len(after) == 2 and victim["id"] not in {a["id"] for a in after}:
                break
            time.sleep(0.5)
        recovered_at = len(statuses)
        while len(statuses) < recovered_at + 8:
            time.sleep(0.05)
        if rerun_count(base) > retried_before:
            break
    stop.set()
    for client in clients:
        client.join()
    again = httpx.post(f"{base}/v1/completions", json=PAYLOAD, timeout=120).json()["choices"][0]["text"]
    print(json.dumps({
        "worker_nodes": sorted(workers), "before": before, "after": engine_replicas(), "victims": victims,
        "statuses": statuses, "served_before_kill": served_before_kill, "recovered_at": recovered_at,
        "retried": rerun_count(base), "same_output": again == reference}))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
