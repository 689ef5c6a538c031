"""Runs a drill script of this folder (a simulated multi-node cluster) in its own process; returns its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_drill(script: str, folder: Path, timeout_s: int = 600) -> dict[str, Any]:
    """`python <script> <folder>`; the drill prints its report as one JSON line, returned as a dict."""
    drill = Path(__file__).with_name(script)
    done = subprocess.run([sys.executable, str(drill), str(folder)], capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    # the report is the last JSON line: Ray may log to stdout after it while shutting down
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    return report
