"""Process environment defaults that must be in place before Prefect or Ray is imported.

Prefect keeps its profile, database and result storage under PREFECT_HOME; forgeline points it at
`$FORGELINE_HOME/prefect` (default `./.forgeline/prefect`) so nothing is written to the home directory and
`make ui` can open the same database. Telemetry of both Prefect and Ray is switched off.
"""

from __future__ import annotations

import os
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

