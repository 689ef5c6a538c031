"""Process environment defaults that must be in place before Prefect or Ray is imported.

Prefect keeps its profile, database and result storage under PREFECT_HOME; forgeline points it at
`$FORGELINE_HOME/prefect` (default `./.forgeline/prefect`) so nothing is written to the home directory and
`make ui` can open the same database. Telemetry of both Prefect and Ray is switched off.

Ray's token authentication is switched on with a per-process secret (`use_ray_token`): Ray's gRPC servers
listen on every interface even in local mode, and Ray reads its auth settings when it is imported, so this
happens here, before any import of Ray. A user's own RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH win.
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def forgeline_home() -> Path:
    """Where forgeline keeps local orchestration state (Prefect's database, UI settings)."""
    return Path(os.environ.get("FORGELINE_HOME", Path.cwd() / ".forgeline")).resolve()


def apply_defaults() -> None:
    """Set environment defaults without overriding anything the user set."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(forgeline_home() / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(forgeline_home() / "matplotlib"))  # its font cache, not ~/.cache
    for key in ("PREFECT_HOME", "MPLCONFIGDIR"):
        Path(os.environ[key]).expanduser().mkdir(parents=True, exist_ok=True)
    use_ray_token()


RAY_AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def use_ray_token() -> Path | None:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH = a new random token in `$FORGELINE_HOME/ray-auth/<pid>.token`,
    created with mode 0600 and deleted at exit; inherited by the Ray processes this process starts. Nothing is
    changed when the user configured Ray's auth or Ray is already imported (too late for its settings)."""
    if any(key in os.environ for key in RAY_AUTH_KEYS) or "ray" in sys.modules:
        return None
    folder = forgeline_home() / "ray-auth"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.token"
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    atexit.register(path.unlink, missing_ok=True)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ["RAY_AUTH_MODE"] = "token"
    return path
