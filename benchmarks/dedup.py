"""Benchmark: dedup signatures, quality and scaling, all in one run.

1. Signatures per core (128 perms, word 5-grams, ~500-word docs, end to end from text): ours vs
   datasketch update loop / bulk, and rensa when installed, all on the same `--sig-docs` documents with a
   warm-up and `--repeat` interleaved rounds, median and min-max (what each path does: benchmarks/minhash.py).
2. Quality on a generated corpus (default 20,000 docs) with planted near-duplicates at graded edit rates
   and exact Jaccard ground truth: precision and recall of duplicate pairs with J >= 0.8 (threshold 0.8).
3. Scaling: docs/s of the whole dedup with Ray on 1 and 2 CPUs (a fresh local Ray per CPU count, a warm-up
   run, then `--repeat` runs each), for the automatic mode (the driver's components at this size) and the
   partitioned one; data held per LSH actor as the corpus doubles.
4. Components: time of verification + components + representatives, the peak RSS of any one process while
   they run (sampled from /proc every 20 ms: the driver and every Ray worker) and the most rows one task
   holds, on the driver and partitioned 1 vs 4 ways, at `--docs` and at `--big-docs` documents.

    .venv/bin/python benchmarks/dedup.py [--docs 20000] [--big-docs 200000] [--sig-docs 2000] [--repeat 3]

Last line: {"benchmark": "dedup", "metrics": {...}}, also appended to benchmarks/results/dedup.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import minhash as signature_bench  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from _record import record, spread  # noqa: E402

from dataprep.dedup.documents import DedupConfig  # noqa: E402
from dataprep.dedup.minhash import jaccard, word_shingles  # noqa: E402
from dataprep.ingest.documents import DOCUMENT_SCHEMA  # noqa: E402
from workers.dedup import read_audit, run_dedup  # noqa: E402
from workers.ray_runtime import init_ray  # noqa: E402

EDIT_RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
THRESHOLD = 0.8


def make_corpus(docs: int, seed: int = 0) -> tuple[list[dict], dict[tuple[str, str], float]]:
    """Originals plus one edited copy for 10 % of them; returns docs and the Jaccard of each planted pair."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(50_000)]
    originals = docs * 10 // 11
    rows, planted = [], {}
    for i in range(originals):
        words = [rng.choice(vocabulary) for _ in range(rng.randrange(100, 400))]
        rows.append({"doc_id": f"o{i:06d}", "text": " ".join(words)})
        if len(rows) < docs and i % 10 == 0:
            edited = list(words)
            rate = EDIT_RATES[(i // 10) % len(EDIT_RATES)]
            for position in rng.sample(range(len(edited)), max(1, int(len(edited) * rate))):
                edited[position] = rng.choice(vocabulary)
            rows.append({"doc_id": f"n{i:06d}", "text": " ".join(edited)})
            pair = (f"o{i:06d}", f"n{i:06d}")
            planted[pair] = jaccard(set(word_shingles(rows[-2]["text"])), set(word_shingles(rows[-1]["text"])))
    for row in rows:
        row.update(url=None, crawl_date=None, source="bench", source_format="jsonl", source_index=0, payload_bytes=1)
    return rows, planted


def write_shards(folder: Path, rows: list[dict], per_shard: int = 2000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(rows), per_shard)):
        path = folder / f"part-{number:05d}-00000.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start : start + per_shard], schema=DOCUMENT_SCHEMA), path)
        paths.append(path)
    return paths


def params(default_partitions: int, **components: object) -> DedupConfig:
    """The benchmark's dedup settings; `components` may set its own `partitions`."""
    return DedupConfig(**{"url": False, "threshold": THRESHOLD, "partitions": default_partitions, "keep": "lowest_id",
                          **components})


def dedup_once(sources: list[Path], work: Path, default_partitions: int, **components: object
               ) -> tuple[float, dict, list[dict]]:
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    settings = params(default_partitions, **components)
    stats, audit = run_dedup(sources, work / "work", work / "out", work / "tmp", settings)
    return time.perf_counter() - started, stats, read_audit(audit)


class PeakRss:
    """Samples the resident memory of this process and of every Ray worker process from /proc while active:
    `peak_mb`, the largest RSS one process reached, and `growth_mb`, the most one process grew above its RSS
    when first seen (the imported libraries of a worker or of this benchmark's own process are not counted)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s, self.peak_kb, self._stop = interval_s, 0, threading.Event()
        self.first_kb: dict[int, int] = {}
        self.growth_kb = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _ray_pids() -> list[int]:
        pids = [os.getpid()]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    command = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"default_worker.py" in command or command.startswith(b"ray::"):
                    pids.append(int(entry.name))
        return pids

    @staticmethod
    def _rss_kb(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in self._ray_pids():
                rss = self._rss_kb(pid)
                baseline = self.first_kb.setdefault(pid, rss)
                self.peak_kb, self.growth_kb = max(self.peak_kb, rss), max(self.growth_kb, rss - baseline)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)

    @property
    def growth_mb(self) -> float:
        return round(self.growth_kb / 1024, 1)


def components_profile(sources: list[Path], work: Path, **components: object) -> dict[str, object]:
    """One dedup on 2 CPUs; the components phase's seconds, peak RSS of one process, most rows one task held.

    The RSS sampler runs through the whole dedup but the components phase is where the modes differ; the
    signature and bucketing phases are the same code for every mode."""
    with PeakRss() as rss:
        seconds, stats, _ = dedup_once(sources, work, 2, **components)
    held = stats["components"]
    return {"seconds_total": round(seconds, 2), "components_seconds": held["seconds"],
            "peak_process_rss_mb": rss.peak_mb, "peak_process_growth_mb": rss.growth_mb,
            "largest_task_rows": held.get("largest_task_rows", held.get("documents_held")),
            **({"rounds": held["rounds"]} if "rounds" in held else {})}


def predicted_pairs(rows: list[dict]) -> set[tuple[str, str]]:
    clusters: dict[str, set[str]] = {}
    for row in rows:
        clusters.setdefault(row["cluster_id"], {row["representative_id"]}).add(row["doc_id"])
    return {tuple(sorted(p)) for members in clusters.values() for p in itertools.combinations(members, 2)}


def quality(rows: list[dict], planted: dict[tuple[str, str], float]) -> dict[str, float]:
    truth = {tuple(sorted(pair)) for pair, similarity in planted.items() if similarity >= THRESHOLD}
    predicted = predicted_pairs(rows)
    hits = len(predicted & truth)
    return {"true_pairs": len(truth), "predicted_pairs": len(predicted),
            "precision": round(hits / max(len(predicted), 1), 4), "recall": round(hits / max(len(truth), 1), 4)}


def restart_ray(cpus: int, temp: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    init_ray(None, temp_dir=temp / f"ray{cpus}", num_cpus=cpus)


def signatures_section(sig_docs: int, repeat: int) -> dict[str, object]:
    """1. Signatures per core, every implementation on the same documents."""
    texts = signature_bench.corpus(sig_docs)  # the same documents for every path (see minhash.py)
    paths = {"datasketch_update": signature_bench.datasketch_update, "datasketch_bulk": signature_bench.datasketch_bulk,
             "ours": signature_bench.ours("xxh32-words")}
    try:
        import rensa as _  # noqa: F401

        paths["rensa"] = signature_bench.rensa
    except ImportError:
        print("rensa not installed: skipped", flush=True)
    rates = signature_bench.rounds(paths, texts, repeat)
    metrics: dict[str, object] = {"signature_docs": len(texts),
                                  "signatures_docs_per_s": {name: spread(values) for name, values in rates.items()}}
    for name in ("datasketch_update", "datasketch_bulk", "rensa"):
        if name in rates:
            metrics[f"signatures_ours_vs_{name}"] = round(
                statistics.median(rates["ours"]) / statistics.median(rates[name]), 2)
    return metrics


def scaling_section(root: Path, rows: list[dict], planted: dict[tuple[str, str], float], sources: list[Path],
                    repeat: int) -> dict[str, object]:
    """2 and 3. Quality, and docs/s on 1 and 2 CPUs for both component modes (same output asserted)."""
    half_sources = write_shards(root / "half", rows[: len(rows) // 2])
    scaling: dict[str, object] = {}
    modes: dict[str, dict[str, object]] = {"auto": {}, "partitioned": {"components": "partitioned", "partitions": 4}}
    rates: dict[str, list[float]] = {}
    outputs = []
    for cpus in (1, 2):
        restart_ray(cpus, root)
        for mode, components in modes.items():
            dedup_once(sources, root / "warm", default_partitions=cpus, **components)  # warm-up: workers, imports
            for _ in range(repeat):
                seconds, stats, removed = dedup_once(sources, root / "run", default_partitions=cpus, **components)
                rates.setdefault(f"{mode}_{cpus}_cpu", []).append(len(rows) / seconds)
                outputs.append(sorted((r["doc_id"], r["representative_id"]) for r in removed))
            print(f"dedup {mode} on {cpus} CPU: {spread(rates[f'{mode}_{cpus}_cpu'])} docs/s", flush=True)
    assert all(output == outputs[0] for output in outputs), "every mode and CPU count removes the same"
    scaling["docs_per_s"] = {name: spread(values) for name, values in rates.items()}
    for mode in modes:
        scaling[f"speedup_2_vs_1_cpu_{mode}"] = round(
            statistics.median(rates[f"{mode}_2_cpu"]) / statistics.median(rates[f"{mode}_1_cpu"]), 2)
    print(f"scaling {scaling}", flush=True)
    _, half_stats, _ = dedup_once(half_sources, root / "half-run", default_partitions=2, **modes["partitioned"])
    scaling["partition_bytes_half_corpus"] = half_stats["peak_partition_bytes"]
    scaling["partition_bytes_full_corpus"] = stats["peak_partition_bytes"]
    return {"quality": quality(removed, planted), "scaling": scaling}


def components_section(root: Path, sources: list[Path], big_docs: int) -> dict[str, dict[str, object]]:
    """4. The components phase on the driver and partitioned 1 and 4 ways, at both corpus sizes (2 CPUs)."""
    restart_ray(2, root)
    profiles: dict[str, dict[str, object]] = {}
    sizes = {"docs": sources}
    if big_docs:
        big_rows, _ = make_corpus(big_docs, seed=1)
        sizes["big"] = write_shards(root / "big", big_rows)
        del big_rows
    for size, size_sources in sizes.items():
        for mode, components in {"driver": {"components": "driver"},
                                 "partitioned_1": {"components": "partitioned", "partitions": 1},
                                 "partitioned_4": {"components": "partitioned", "partitions": 4}}.items():
            dedup_once(size_sources, root / "profile", 2, **components)  # warm-up
            profile = components_profile(size_sources, root / "profile", **components)
            profiles[f"{size}_{mode}"] = profile
            print(f"components {size} {mode}: {profile}", flush=True)
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--sig-docs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--components-only", action="store_true", help="only section 4")
    parser.add_argument("--big-docs", type=int, default=200_000, help="the larger corpus of the components "
                        "profile (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    metrics: dict[str, object] = {"docs": args.docs, "repeat": args.repeat}
    if not args.components_only:
        metrics.update(signatures_section(args.sig_docs, args.repeat))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        rows, planted = make_corpus(args.docs)
        sources = write_shards(root / "full", rows)
        if not args.components_only:
            metrics.update(scaling_section(root, rows, planted, sources, args.repeat))
        metrics["components"] = {"big_docs": args.big_docs, **components_section(root, sources, args.big_docs)}
        ray.shutdown()
    record("dedup", metrics)


if __name__ == "__main__":
    main()
