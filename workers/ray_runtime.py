"""Start or attach to Ray: local single-node mode on loopback, or an existing cluster by address.

Ray's gRPC servers (GCS, raylet, workers, agents) listen on every interface whatever `_node_ip_address` says;
what keeps a local session closed is Ray's token authentication, which `flows._env` turns on with a
per-process secret before Ray is imported (Ray reads its auth settings at import).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

log = logging.getLogger(__name__)
T = TypeVar("T")

# Unix socket paths are limited to 107 bytes; Ray appends about 62 characters to its temp dir.
MAX_TEMP_DIR_CHARS = 44
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def ray_temp_dir(preferred: Path) -> Path:
    """`preferred` when short enough for Ray's socket paths, else a stable short path under /tmp."""
    preferred = preferred.resolve()
    if len(str(preferred)) <= MAX_TEMP_DIR_CHARS:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:10]
    short = Path("/tmp") / f"forgeline-ray-{digest}"
    log.info("Ray temp dir %s is too long for unix sockets; using %s", preferred, short)
    return short


QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


def quiet_worker_logs() -> None:
    """Ray worker setup hook (local mode without the dashboard): silence warnings that only say the State API
    (served by the dashboard) is absent."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class ClusterUnavailableError(ConnectionError):
    """`ray.address` names a Ray cluster that cannot be reached."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """For `host:port` and `ray://host:port`, a TCP connection first: Ray itself keeps retrying an unreachable
    GCS for minutes. ('auto' is left to Ray, which looks for a running cluster on this machine.)"""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ClusterUnavailableError(
            f"no Ray cluster reachable at --address {address!r} ({error.strerror or error}): start one "
            "(`ray start --head`), fix the address, or drop --address to run locally") from None


def init_ray(
    address: str | None,
    *,
    temp_dir: Path,
    num_cpus: int | None = None,
    object_store_memory_mb: int | None = None,
    dashboard: bool = False,
    dashboard_port: int = 8265,
) -> dict[str, object]:
    """Connect to Ray once per process; returns a short description of the cluster.

    `address=None` starts a local single-node Ray on 127.0.0.1 (token authentication when `flows._env` set it
    up) with its session files under `temp_dir`. Any other address ('auto', 'ray://head:10001') attaches to a
    running cluster.
    """
    if not ray.is_initialized():
        if address is None:
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
            directory = ray_temp_dir(temp_dir)
            directory.mkdir(parents=True, exist_ok=True)
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_memory_mb * 2**20 if object_store_memory_mb else None,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                _node_ip_address="127.0.0.1",
                _temp_dir=str(directory),
                configure_logging=False,
                log_to_driver=True,
                # without the dashboard there is no State API: Ray Train's placement-group cleaner would warn
                # about it every few seconds for the whole training run
                runtime_env=None if dashboard else {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"},
            )
        else:
            check_reachable(address)
            try:
                ray.init(address=address, configure_logging=False, log_to_driver=True)
            except ConnectionError as error:
                raise ClusterUnavailableError(
                    f"no Ray cluster reachable at --address {address!r} ({str(error).splitlines()[0]}): start "
                    "one (`ray start --head`), fix the address, or drop --address to run locally") from error
    resources = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": resources.get("CPU", 0)}


def with_fresh_actors(make: Callable[[], list[Any]], work: Callable[[list[Any]], T], attempts: int, phase: str
                      ) -> tuple[T, int]:
    """`work(actors)` on actors from `make()`; when an actor is lost (its node died) the phase is redone with fresh
    actors, up to `attempts` times (actor state lives in memory only). The actors are killed afterwards.
    Returns the result and how many times the phase was redone (the evidence that recovery ran)."""
    for attempt in range(1, attempts + 1):
        actors: list[Any] = []
        try:
            actors = make()
            return work(actors), attempt - 1
        except ray.exceptions.RayActorError as error:
            if attempt == attempts:
                raise
            log.warning("%s: an actor was lost (%s); redoing the phase with fresh actors (attempt %d)", phase, error,
                        attempt + 1)
        finally:
            for actor in actors:
                ray.kill(actor)
    raise AssertionError("unreachable")
