"""What every simulated-cluster drill of this folder shares: Ray's environment, set on import (before Ray is
imported: the drill's Ray and the nodes it starts read it), and a loopback cluster of a 0-CPU head and workers."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # a test cluster of the drill's process only, on 127.0.0.1
# every node on loopback: without this, Ray resolves the 127.0.0.1 address it is given to the LAN address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
for _variable in ("RAY_ADDRESS", "PREFECT_API_URL"):
    os.environ.pop(_variable, None)


def loopback_cluster(workers: int = 2, cpus: int = 1, dashboard: bool = True) -> tuple[Any, list[Any]]:
    """A `ray.cluster_utils.Cluster` on 127.0.0.1: a head that schedules but does not compute (0 CPUs) and
    `workers` worker nodes of `cpus` CPUs each; returns the cluster and the worker nodes."""
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": dashboard, **local})
    nodes = [cluster.add_node(num_cpus=cpus, **local) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes
