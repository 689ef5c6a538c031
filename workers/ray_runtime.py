"""Start or attach to Ray: local single-node mode on loopback, or an existing cluster by address.

Ray's gRPC servers (GCS, raylet, workers, agents) listen on every interface whatever `_node_ip_address` says;
what keeps a local session closed is Ray's token authentication, which `use_local_token` turns on for a local
start with a per-process secret (not Ray's default `~/.ray/auth_token`). Attaching to a cluster leaves its
auth settings alone, and a user's own RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH always win.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import secrets
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


RAY_AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_DIR = "auth"


def use_local_token(directory: Path) -> Path | None:
    """Token authentication for the local Ray this process starts: a new random 256-bit token in
    `directory`/auth/<pid>.token, created with mode 0600 (never readable by others, not even briefly) and deleted
    at exit; RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE=token are set for Ray's processes, and this process's Ray
    config is refreshed the way `ray.init` itself does it. Nothing changes when the user configured Ray's auth."""
    if any(key in os.environ for key in RAY_AUTH_KEYS):
        return None
    folder = directory / TOKEN_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.token"
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    atexit.register(path.unlink, missing_ok=True)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    _enable_token_auth()  # RAY_AUTH_MODE=token, then Ray re-reads its config (what ray.init does by default)
    AuthenticationTokenLoader.instance().reset_cache()
    return path


QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


def quiet_worker_logs() -> None:
    """Ray worker setup hook (local mode): silence warnings that only say the State API (served by the dashboard)
    is absent, and Ray Train's INFO dump of every `ray.train.report` (its logger is named after its file)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    report_logger = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
    logging.getLogger(str(report_logger)).setLevel(logging.WARNING)


class ClusterUnavailableError(ConnectionError):
    """`ray.address` names a Ray cluster that cannot be reached."""

    @classmethod
    def at(cls, address: str, reason: str) -> ClusterUnavailableError:
        return cls(f"no Ray cluster reachable at --address {address!r} ({reason}): start one (`ray start --head`), "
                   "fix the address, or drop --address to run locally")


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
        raise ClusterUnavailableError.at(address, str(error.strerror or error)) from None


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
            use_local_token(directory)
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
                # a readable console: without the dashboard there is no State API, and Ray Train's placement-group
                # cleaner would warn about it every few seconds; Train also logs every report in full
                runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"},
            )
        else:
            check_reachable(address)
            try:
                ray.init(address=address, configure_logging=False, log_to_driver=True)
            except ConnectionError as error:
                raise ClusterUnavailableError.at(address, str(error).splitlines()[0]) from error
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
