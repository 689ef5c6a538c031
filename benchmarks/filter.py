"""Benchmark: our heuristic chain vs DataTrove's (Gopher repetition → Gopher quality → C4 → FineWeb), same docs.

Documents: the kept output of a dedup (or ingest) stage, by default the demo's (`make demo` first), plus the
real crawl samples in ../shared/data/crawl when present (ingested here with our readers). DataTrove is a
benchmark-only install (`pip install datatrove spacy`). Reports docs/s per core for both chains (one process;
both get one untimed warm-up pass, then `--repeat` interleaved rounds time each chain once; the headline is
the median with min-max), agreement of the final keep/drop decision, and per rule (each applied alone to the same
original text) a confusion matrix with examples of disagreements.

    .venv/bin/python benchmarks/filter.py [--docs-dir runs/demo/dedup-*/data] [--repeat 3]

Last line: {"benchmark": "filter", "metrics": {...}}, also appended to benchmarks/results/filter.jsonl.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402
from _record import interleaved, per_second, record, spread  # noqa: E402

from dataprep.filter.rules import HEURISTIC_RULES  # noqa: E402

CHAIN = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "crawl"


def load_documents(pattern: str) -> list[str]:
    texts = [t for f in sorted(glob.glob(pattern)) for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]
    if SHARED.is_dir():
        from dataprep.ingest.documents import IngestConfig, process_record
        from dataprep.ingest.readers import open_records

        settings = IngestConfig(inputs=[str(SHARED)])
        for path in sorted(SHARED.glob("*.warc.gz")):
            fmt = "wet" if ".wet." in path.name else "warc"
            for record in open_records(str(path), fmt):
                kind, row, _ = process_record(record, settings)
                if kind == "doc" and row and row.get("text"):
                    texts.append(row["text"])
    return texts


def ours_chain(texts: list[str]) -> list[tuple[bool, str | None]]:
    rules = [(name, HEURISTIC_RULES[name], HEURISTIC_RULES[name].params()) for name in CHAIN]
    decisions = []
    for text in texts:
        verdict: tuple[bool, str | None] = (True, None)
        for name, rule, params in rules:
            outcome = rule.apply(text, params)
            if outcome.reason is not None:
                verdict = (False, f"{name}:{outcome.reason}")
                break
            if outcome.text is not None:
                text = outcome.text
        decisions.append(verdict)
    return decisions


def datatrove_filters() -> dict[str, object]:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
            "c4": C4QualityFilter(), "fineweb": FineWebQualityFilter()}


def datatrove_one(filter_, text: str) -> tuple[bool, str | None, str]:
    from datatrove.data import Document

    document = Document(text=text, id="x")
    result = filter_.filter(document)
    keep, reason = (result, None) if isinstance(result, bool) else result
    return keep, reason, document.text


def datatrove_chain(texts: list[str]) -> list[tuple[bool, str | None]]:
    filters = datatrove_filters()
    decisions = []
    for text in texts:
        verdict: tuple[bool, str | None] = (True, None)
        for name in CHAIN:
            keep, reason, text = datatrove_one(filters[name], text)
            if not keep:
                verdict = (False, f"{name}:{reason}")
                break
        decisions.append(verdict)
    return decisions


def timed_rounds(chains: dict[str, Any], texts: list[str], repeat: int
                 ) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Both chains alike: one untimed warm-up pass each, then `repeat` rounds, each timing every chain once in
    turn (interleaved, so a slow moment hits both). Returns docs/s per round and each chain's decisions."""
    decisions: dict[str, list] = {}
    runs = {name: per_second(len(texts), lambda n=name, c=chain: decisions.__setitem__(n, c(texts)))
            for name, chain in chains.items()}
    return interleaved(runs, repeat), decisions


def per_rule_confusion(texts: list[str]) -> dict[str, dict[str, object]]:
    filters = datatrove_filters()
    report: dict[str, dict[str, object]] = {}
    for name in CHAIN:
        rule, params = HEURISTIC_RULES[name], HEURISTIC_RULES[name].params()
        matrix = {"both_keep": 0, "both_drop": 0, "ours_drop_only": 0, "datatrove_drop_only": 0}
        examples: list[dict[str, object]] = []
        for text in texts:
            ours = rule.apply(text, params)
            keep, reason, _ = datatrove_one(filters[name], text)
            ours_keep = ours.reason is None
            if ours_keep and keep:
                key = "both_keep"
            elif not ours_keep and not keep:
                key = "both_drop"
            elif not ours_keep:
                key = "ours_drop_only"
            else:
                key = "datatrove_drop_only"
            matrix[key] += 1
            if key in ("ours_drop_only", "datatrove_drop_only") and len(examples) < 4:
                examples.append({"ours": ours.reason, "datatrove": reason, "text": text[:160]})
        agreement = (matrix["both_keep"] + matrix["both_drop"]) / max(len(texts), 1)
        report[name] = {**matrix, "agreement": round(agreement, 4), "disagreements": examples}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs-dir", default="runs/demo/dedup-*/data/*.parquet")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    texts = load_documents(args.docs_dir)
    if not texts:
        sys.exit(f"no documents match {args.docs_dir}: run `make demo` first")
    print(f"{len(texts):,} documents, {sum(map(len, texts)) / 1e6:.2f} M characters", flush=True)
    rates, decisions = timed_rounds({"ours": ours_chain, "datatrove": datatrove_chain}, texts, args.repeat)
    ours, theirs = decisions["ours"], decisions["datatrove"]
    ours_rate, theirs_rate = (statistics.median(rates[name]) for name in ("ours", "datatrove"))
    print(f"ours       {ours_rate:10.0f} docs/s (rounds: {[round(r) for r in rates['ours']]})", flush=True)
    print(f"datatrove  {theirs_rate:10.0f} docs/s (rounds: {[round(r) for r in rates['datatrove']]})", flush=True)
    agree = sum(a[0] == b[0] for a, b in zip(ours, theirs, strict=True)) / len(texts)
    rules = per_rule_confusion(texts)
    for name, row in rules.items():
        print(name, {k: v for k, v in row.items() if k != "disagreements"})
        for example in row["disagreements"]:  # type: ignore[union-attr]
            print("   ", json.dumps(example, ensure_ascii=False)[:300])
    print(f"final decision agreement {agree:.4f}; kept ours {sum(k for k, _ in ours)} datatrove "
          f"{sum(k for k, _ in theirs)}")
    metrics = {
        "documents": len(texts),
        "repeat": args.repeat,
        "ours_docs_per_s": spread(rates["ours"]),
        "datatrove_docs_per_s": spread(rates["datatrove"]),
        "speedup_of_medians": round(ours_rate / theirs_rate, 2),
        "decision_agreement": round(agree, 4),
        "kept_ours": sum(k for k, _ in ours),
        "kept_datatrove": sum(k for k, _ in theirs),
        "rule_agreement": {name: row["agreement"] for name, row in rules.items()},
        "rule_confusion": {name: {k: row[k] for k in ("both_keep", "both_drop", "ours_drop_only",
                                                      "datatrove_drop_only")} for name, row in rules.items()},
    }
    record("filter", metrics)


if __name__ == "__main__":
    main()
