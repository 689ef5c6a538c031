"""Benchmark bookkeeping: every run's metrics appended to `benchmarks/results/NAME.jsonl` with the date, the
commit and the machine, and printed as the script's last line; medians with min-max over repeated runs; the
one way every side of a comparison is timed (`interleaved`: a warm-up each, then interleaved rounds)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


def spread(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """The headline of repeated measurements: median, with min and max beside it."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def per_second(items: int, work: Callable[[], Any]) -> Callable[[], float]:
    """A run for `interleaved`: times one call of `work` and returns `items` per second."""
    def run() -> float:
        started = time.perf_counter()
        work()
        return items / (time.perf_counter() - started)

    return run


def interleaved(runs: Mapping[str, Callable[[], T]], repeat: int,
                on_round: Callable[[int, dict[str, list[T]]], None] | None = None, warm_up: bool = True,
                alternate: bool = False) -> dict[str, list[T]]:
    """Each run once untimed as a warm-up (unless `warm_up` is false), then `repeat` rounds calling every run once
    in turn, so a slow moment of the machine hits all sides alike; with `alternate`, every other round calls them
    in reverse order (no side always runs right after another). Returns what each run returned (its rate, or a
    dict of measurements), per round."""
    if warm_up:
        for run in runs.values():
            run()
    results: dict[str, list[T]] = {name: [] for name in runs}
    for number in range(1, repeat + 1):
        order = list(runs) if not alternate or number % 2 else list(reversed(list(runs)))
        for name in order:
            results[name].append(runs[name]())
        if on_round is not None:
            on_round(number, results)
    return results


def commit() -> str:
    """The checked-out commit, `-dirty` when the tree has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and Python: enough to tell runs on different machines apart."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory_kb = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1),
            "python": platform.python_version()}


def record(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Append this run to `results/<name>.jsonl` and print it as the last line."""
    line = {"benchmark": name, "metrics": metrics, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(), "machine": machine()}
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"{name}.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)
    return line
