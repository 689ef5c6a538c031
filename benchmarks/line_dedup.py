"""Benchmark: corpus-wide line dedup (`dedup.lines`) against CCNet's rule in plain Python, same corpus.

Corpus: real English prose (the sample's sources: Python's language reference and library docstrings), split
into documents of 4-12 paragraphs, each wrapped in one of 40 sites' boilerplate (navigation, cookie notice,
footer lines) with an occasional shared template paragraph: what line dedup exists to remove.

Measured, each the median of `--repeat` runs (min-max beside), after one warm-up run:
- ours on Ray (`workers.line_dedup.run_line_dedup`, 1 and 4 count actors, 2 CPUs): lines/s per core of the
  counting pass (hashing + counting) and of the removal pass, and table bytes per actor;
- the reference: `dataprep.dedup.lines.ccnet_reference`, CCNet's first-occurrence rule in a few lines of plain
  Python on normalised strings, one process: lines/s;
- agreement: the fraction of (document, line) removals on which ours and the reference agree (goal >= 99 %;
  over lines that can be removed: blank lines never are), characters removed (ours also drops the blank lines
  of a document it empties: the document goes to `removed/`), documents affected and emptied by each; the same
  for paragraph mode.

The corpus reuses a pool of real paragraphs, so many documents repeat earlier ones almost entirely: a stress
case (most lines go) rather than a typical crawl.

    .venv/bin/python benchmarks/line_dedup.py [--docs 20000] [--repeat 3]

Last line: {"benchmark": "line_dedup", "metrics": {...}}, also appended to benchmarks/results/line_dedup.jsonl.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from _record import record, spread  # noqa: E402

from dataprep.dedup.lines import LineDedupConfig, ccnet_reference, normalize_line, segments  # noqa: E402
from dataprep.sample.prose import iter_articles  # noqa: E402
from workers.line_dedup import run_line_dedup  # noqa: E402
from workers.ray_runtime import init_ray  # noqa: E402

CPUS = 2


def site_boilerplate(site: int) -> tuple[list[str], list[str]]:
    """A site's header and footer lines (some shared by every site, most its own)."""
    header = [f"Site {site} Documentation", "Home | Guides | Reference | Blog | Contact",
              f"You are here: site{site} / docs", "Skip to main content"]
    footer = [f"Copyright 2026 Site {site}. All rights reserved.", "We use cookies to improve your experience.",
              f"Follow site {site} on social media", "Privacy policy | Terms of use"]
    return header, footer


def make_corpus(docs: int, seed: int = 0) -> list[tuple[str, str]]:
    """(doc_id, text) documents: real paragraphs wrapped in their site's boilerplate."""
    rng = random.Random(seed)
    paragraphs = [p for article in iter_articles() for p in article.paragraphs if len(p) > 80]
    templates = [f"This page is part of the site {s} handbook; see the index for related topics." for s in range(5)]
    corpus = []
    for number in range(docs):
        header, footer = site_boilerplate(rng.randrange(40))
        body = rng.sample(paragraphs, rng.randrange(4, 13))
        if rng.random() < 0.2:
            body.insert(rng.randrange(len(body) + 1), rng.choice(templates))
        corpus.append((f"doc-{number:07d}", "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n\n" +
                       "\n".join(footer)))
    return corpus


def write_shards(folder: Path, corpus: list[tuple[str, str]], per_shard: int = 2000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(corpus), per_shard)):
        rows = corpus[start:start + per_shard]
        path = folder / f"part-{number:05d}-00000.parquet"
        pq.write_table(pa.table({"doc_id": [d for d, _ in rows], "text": [t for _, t in rows]}), path)
        paths.append(path)
    return paths


def read_texts(folder: Path) -> dict[str, str]:
    return {row["doc_id"]: row["text"] for path in sorted(folder.glob("*.parquet"))
            for row in pq.read_table(path, columns=["doc_id", "text"]).to_pylist()}


def removals(before: dict[str, str], after: dict[str, str], mode: str) -> set[tuple[str, int]]:
    """(document, segment index) pairs removed, over segments that can be removed at all (blank ones cannot; a
    document that removal emptied is left out of our output and counts as every segment removed)."""
    removed = set()
    for doc_id, text in before.items():
        kept, position = segments(after.get(doc_id, ""), mode), 0
        for index, part in enumerate(segments(text, mode)):
            if position < len(kept) and kept[position] == part:
                position += 1
            elif normalize_line(part):
                removed.add((doc_id, index))
    return removed


def ours(sources: list[Path], root: Path, config: LineDedupConfig) -> tuple[dict, dict[str, str]]:
    out = root / f"out-{time.time_ns()}"
    stats = run_line_dedup(sources, out / "data", out / "removed", out / "tmp", config)
    return stats, read_texts(out / "data")


def reference(corpus: list[tuple[str, str]], mode: str) -> tuple[float, dict[str, str]]:
    started = time.perf_counter()
    result = ccnet_reference(corpus, mode)
    return time.perf_counter() - started, result


def agreement(corpus: dict[str, str], ours_after: dict[str, str], ref_after: dict[str, str], mode: str) -> dict:
    mine, theirs = removals(corpus, ours_after, mode), removals(corpus, ref_after, mode)
    union = mine | theirs
    return {"agreement": round(len(mine & theirs) / len(union), 6) if union else 1.0,
            "removed_ours": len(mine), "removed_reference": len(theirs),
            "chars_removed_ours": sum(len(corpus[d]) - len(ours_after.get(d, "")) for d in corpus),
            "chars_removed_reference": sum(len(corpus[d]) - len(ref_after[d]) for d in corpus),
            "docs_emptied_ours": sum(d not in ours_after for d in corpus),
            "docs_emptied_reference": sum(not ref_after[d].strip() for d in corpus),
            "docs_affected_ours": len({d for d, _ in mine}), "docs_affected_reference": len({d for d, _ in theirs})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    corpus = make_corpus(args.docs)
    by_id = dict(corpus)
    lines = sum(len(segments(text, "line")) for _, text in corpus)
    metrics: dict[str, object] = {"docs": len(corpus), "lines": lines, "cpus": CPUS}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        sources = write_shards(root / "in", corpus)
        init_ray(None, temp_dir=root / "ray", num_cpus=CPUS)
        for actors in (1, 4):
            config = LineDedupConfig(mode="line", num_actors=actors)
            ours(sources, root, config)  # warm-up
            runs = [ours(sources, root, config) for _ in range(args.repeat)]
            stats = runs[-1][0]
            counting = [lines / (r[0]["seconds"]["hash"] + r[0]["seconds"]["count"]) / CPUS for r in runs]
            removing = [lines / r[0]["seconds"]["remove"] / CPUS for r in runs]
            metrics[f"actors_{actors}"] = {
                "count_pass_lines_per_s_per_core": spread(counting, 0),
                "removal_pass_lines_per_s_per_core": spread(removing, 0),
                "max_table_bytes_per_actor": max(a["table_bytes"] for a in stats["counting"]["per_actor"]),
                "distinct_hashes": stats["counting"]["distinct_hashes"]}
            print(f"{actors} actor(s): {metrics[f'actors_{actors}']}", flush=True)
        ray_after = runs[-1][1]
        reference(corpus, "line")  # warm-up
        ref_runs = [reference(corpus, "line") for _ in range(args.repeat)]
        metrics["reference_lines_per_s_one_process"] = spread([lines / seconds for seconds, _ in ref_runs], 0)
        metrics["line_mode"] = agreement(by_id, ray_after, ref_runs[-1][1], "line")
        _, paragraph_after = ours(sources, root, LineDedupConfig(mode="paragraph", num_actors=4))
        metrics["paragraph_mode"] = agreement(by_id, paragraph_after, ccnet_reference(corpus, "paragraph"),
                                              "paragraph")
        ray.shutdown()
    record("line_dedup", metrics)


if __name__ == "__main__":
    main()
