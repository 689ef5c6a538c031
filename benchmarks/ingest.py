"""Benchmark: WARC → main text on one core, resiliparse vs trafilatura vs our default, same files, one run.

Speed: records/s and payload MB/s through the whole ingest path (read, decode, extract) in one process.
Quality: bag-of-words precision / recall / F1 of the extracted text against the known main text of the
sample's prose pages (`truth.jsonl`), so boilerplate kept costs precision and article text lost costs recall.

    .venv/bin/python benchmarks/ingest.py [--pages 0] [--repeat 3]

Last line: {"benchmark": "ingest", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataprep.ingest.documents import IngestConfig, process_record  # noqa: E402
from dataprep.ingest.readers import RawRecord, open_records  # noqa: E402
from dataprep.sample.build import build_sample  # noqa: E402

EXTRACTORS = ("resiliparse", "trafilatura")
DEFAULT = IngestConfig.model_fields["extractor"].default


def load_records(files: list[Path]) -> list[RawRecord]:
    records = []
    for path in files:
        records += [r for r in open_records(str(path), "warc") if r.rec_type == "response"]
    return records


def run_path(records: list[RawRecord], extractor: str, repeat: int) -> tuple[float, dict[str, str]]:
    settings = IngestConfig(inputs=["-"], extractor=extractor)
    best = float("inf")
    texts: dict[str, str] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        for raw in records:
            kind, row, _ = process_record(raw, settings)
            if kind == "doc" and row is not None:
                texts[row["url"]] = row["text"]
        best = min(best, time.perf_counter() - started)
    return best, texts


def bag_f1(predicted: str, truth: str) -> tuple[float, float, float]:
    pred, gold = Counter(predicted.split()), Counter(truth.split())
    overlap = sum((pred & gold).values())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(gold.values()), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)


def quality(texts: dict[str, str], truth: dict[str, str]) -> dict[str, float]:
    scores = [bag_f1(texts.get(url, ""), gold) for url, gold in truth.items()]
    return {name: round(sum(s[i] for s in scores) / len(scores), 4)
            for i, name in enumerate(("precision", "recall", "f1"))}


def big_file_memory(gigabytes: float) -> dict[str, float]:
    """Ingest one large WARC (the sample's gzip members repeated) in a child process; report its peak RSS."""
    import resource
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        build_sample(Path(tmp) / "s", warc_files=1)
        member = (Path(tmp) / "s" / "crawl-00000.warc.gz").read_bytes()
        payload_per_copy = sum(r.payload_bytes for r in load_records([Path(tmp) / "s" / "crawl-00000.warc.gz"]))
        copies = max(1, int(gigabytes * 1e9 / payload_per_copy))
        big = Path(tmp) / "big.warc.gz"
        with open(big, "wb") as handle:
            for _ in range(copies):
                handle.write(member)
        code = (
            "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
            "from dataprep.ingest.documents import IngestConfig, IngestUnit, run_ingest_unit;"
            "from dataprep.stage import StageDir; s = StageDir(Path(sys.argv[2])); s.prepare();"
            "c = IngestConfig(inputs=[sys.argv[1]]); t = time.perf_counter();"
            "r = run_ingest_unit(s, IngestUnit(0, sys.argv[1], 'warc'), c);"
            "print(r['docs_out'], time.perf_counter() - t)"
        )
        repo = str(Path(__file__).resolve().parents[1])
        out = subprocess.run([sys.executable, "-c", code, str(big), str(Path(tmp) / "ingest-big"), repo],
                             check=True, capture_output=True, text=True).stdout.split()
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {"payload_gb": round(copies * payload_per_copy / 1e9, 2), "file_gb": round(big.stat().st_size / 1e9, 2),
                "docs": int(out[0]), "seconds": round(float(out[1]), 1), "peak_rss_mb": round(peak_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=0, help="prose pages in the generated sample (0 = all)")
    parser.add_argument("--repeat", type=int, default=1, help="timed passes per extractor (best is kept)")
    parser.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/crawl",
                        help="folder of real WARC files to time as well (skipped when absent)")
    parser.add_argument("--big-gb", type=float, default=0.0,
                        help="also ingest one WARC of about this many GB of payload and report peak RSS")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_sample(tmp, prose_pages=args.pages or None)
        files = sorted(Path(tmp).glob("crawl-*.warc.gz"))
        records = load_records(files)
        truth = {}
        for line in (Path(tmp) / "truth.jsonl").read_text().splitlines():
            item = json.loads(line)
            truth.setdefault(item["url"], item["text"])
    real_files = sorted(p for p in args.real.glob("*.warc.gz") if not p.name.endswith(".wet.gz")) \
        if args.real.is_dir() else []
    real_records = load_records(real_files) if real_files else []

    mb = sum(r.payload_bytes for r in records) / 1e6
    metrics: dict[str, object] = {"records": len(records), "payload_mb": round(mb, 2), "default": DEFAULT}
    for name in EXTRACTORS:
        seconds, texts = run_path(records, name, args.repeat)
        entry = {"records_per_s": round(len(records) / seconds, 1), "mb_per_s": round(mb / seconds, 2),
                 **quality(texts, truth)}
        if real_records:
            real_seconds, _ = run_path(real_records, name, args.repeat)
            entry["real_records_per_s"] = round(len(real_records) / real_seconds, 1)
            entry["real_mb_per_s"] = round(sum(r.payload_bytes for r in real_records) / 1e6 / real_seconds, 2)
        metrics[name] = entry
        print(f"{name:12s} {json.dumps(entry)}", flush=True)
    if args.big_gb:
        metrics["big_file"] = big_file_memory(args.big_gb)
        print(f"big file     {json.dumps(metrics['big_file'])}", flush=True)
    metrics["default_speedup_vs_trafilatura"] = round(
        metrics[DEFAULT]["records_per_s"] / metrics["trafilatura"]["records_per_s"], 2)  # type: ignore[index]
    print(json.dumps({"benchmark": "ingest", "metrics": metrics}))


if __name__ == "__main__":
    main()
