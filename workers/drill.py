"""Recovery evidence and the node-loss drill hook shared by the Ray tasks and actors of the data stages.

`mark_attempt(target)` records that work on `target` (an output file, or a unit's name under the stage) began;
a second attempt (Ray retrying the task after its worker or node died, or a restarted actor retrying the call)
finds the first's marker and leaves a `.retried` one, which `retried(folder)` counts: the proof, in the output,
that recovery ran. `drill_hold(target)`, for the failure drills only (`FORGELINE_DRILL_HOLD=<target>`): the
first attempt at that target writes `<name>.held` holding its node id, then waits in flight until its node is
removed, so a drill can remove exactly the node doing that work (several targets: joined with `os.pathsep`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

ATTEMPTS_DIR = ".attempts"
HOLD_ENV = "FORGELINE_DRILL_HOLD"


def mark_attempt(target: Path) -> bool:
    """Record an attempt at `target` (markers in `<target's folder>/.attempts/`); True when it is a retry."""
    folder = target.parent / ATTEMPTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    started = folder / f"{target.name}.started"
    retry = started.exists()
    if retry:
        (folder / f"{target.name}.retried").touch()
    started.touch()
    return retry


def drill_hold(target: Path) -> None:
    """Hold the first attempt at the drill's target in flight, after announcing its node (see the module)."""
    if str(target) not in os.environ.get(HOLD_ENV, "").split(os.pathsep):
        return
    marker = target.parent / ATTEMPTS_DIR / f"{target.name}.held"
    marker.with_suffix(".tmp").write_text(ray.get_runtime_context().get_node_id())
    marker.with_suffix(".tmp").rename(marker)
    time.sleep(3600)


def attempt(target: Path) -> None:
    """Both: mark the attempt, and on a first attempt honour the drill's hold."""
    if not mark_attempt(target):
        drill_hold(target)


def retried(folder: Path) -> int:
    """How many targets in `folder` were worked on more than once."""
    return len(list((folder / ATTEMPTS_DIR).glob("*.retried")))
