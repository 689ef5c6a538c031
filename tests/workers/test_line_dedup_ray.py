"""Line dedup on real local Ray: agreement with the CCNet reference, determinism, emptied documents, stats."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from dataprep.dedup.lines import EMPTY_REASON, LineDedupConfig, ccnet_reference, doc_order, line_dedup_local
from dataprep.dedup.lines import normalize_line as norm
from dataprep.ingest.documents import DOCUMENT_SCHEMA
from workers.line_dedup import LineCountActor, run_line_dedup

pytestmark = pytest.mark.integration

NAV = ["Home | News | Sport | Weather", "Sign in to your account", "Cookie settings"]
FOOTER = "© Example Media Group. All rights reserved."
PER_SHARD = 7
Corpus = tuple[Path, list[dict], list[Path]]
Runs = dict[str, tuple[dict, Path]]


def _words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(count))


def _corpus(rng: random.Random, documents: int = 34) -> list[dict]:
    """Articles wrapped in shared navigation (and sometimes a footer), plus one page of navigation only."""
    docs = []
    for i in range(documents):
        article = [f"{_words(rng, 10)}." for _ in range(rng.randrange(3, 7))]
        lines = [*NAV, "", *article, "", FOOTER] if i % 2 else [*NAV, *article, *article[:1], NAV[0]]
        docs.append({"doc_id": f"page-{i:03d}", "text": "\n".join(lines)})
    owner = min(docs, key=lambda d: doc_order(d["doc_id"]))["doc_id"]
    nav_only = next(f"nav-{n}" for n in range(100) if doc_order(f"nav-{n}") > doc_order(owner))
    docs.append({"doc_id": nav_only, "text": "\n".join(NAV) + "\n\n" + FOOTER})
    rng.shuffle(docs)
    return [{**d, "url": f"https://news.example/{d['doc_id']}", "source": "test", "source_format": "jsonl",
             "source_index": i, "payload_bytes": len(d["text"])} for i, d in enumerate(docs)]


def _write_shards(folder: Path, docs: list[dict]) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, start in enumerate(range(0, len(docs), PER_SHARD)):
        path = folder / f"part-{number:05d}-00000.parquet"
        pq.write_table(pa.Table.from_pylist(docs[start : start + PER_SHARD], schema=DOCUMENT_SCHEMA), path)
        paths.append(path)
    return paths


def _run(root: Path, name: str, sources: list[Path], config: LineDedupConfig) -> tuple[dict, Path]:
    out = root / name
    stats = run_line_dedup(sources, out / "data", out / "removed", out / "_tmp", config)
    return stats, out


def _read(folder: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("*.parquet"))}


def _texts(out: Path, sub: str = "data") -> dict[str, str]:
    return {row["doc_id"]: row["text"] for rows in _read(out / sub).values() for row in rows}


def _without_actors(stats: dict) -> dict:
    """The stats that must not depend on the actor count (per-actor tables and timings do)."""
    kept = {k: v for k, v in stats.items() if k != "seconds"}
    return {**kept, "counting": {k: v for k, v in stats["counting"].items() if k != "per_actor"}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Corpus:
    root = tmp_path_factory.mktemp("line-dedup")
    docs = _corpus(random.Random(11))
    return root, docs, _write_shards(root / "input", docs)


@pytest.fixture(scope="module")
def first_runs(corpus: Corpus) -> Runs:
    root, _, sources = corpus
    shuffled = list(sources)
    random.Random(5).shuffle(shuffled)
    return {
        "one": _run(root, "one", sources, LineDedupConfig(mode="line", num_actors=1)),
        "three": _run(root, "three", shuffled, LineDedupConfig(mode="line", num_actors=3)),
        "bloom": _run(root, "bloom", shuffled[::-1], LineDedupConfig(mode="line", num_actors=2, bloom=True)),
    }


def test_identical_for_actor_count_shard_order_and_bloom(first_runs: Runs) -> None:
    (one, out_one), (three, out_three), (bloom, out_bloom) = first_runs["one"], first_runs["three"], first_runs["bloom"]
    for sub in ("data", "removed"):
        assert _read(out_one / sub) == _read(out_three / sub) == _read(out_bloom / sub)
    assert _without_actors(one) == _without_actors(three)
    exact_keys = ("hashes", "distinct_hashes", "distinct_hashes_exact")
    assert {k: v for k, v in _without_actors(bloom).items() if k != "counting"} == {
        k: v for k, v in _without_actors(one).items() if k != "counting"}
    assert {k: v for k, v in bloom["counting"].items() if k not in (*exact_keys, "per_actor")} == {
        k: v for k, v in one["counting"].items() if k not in (*exact_keys, "per_actor")}


def test_output_equals_ccnet_reference(corpus: Corpus, first_runs: Runs) -> None:
    _, docs, _ = corpus
    reference = ccnet_reference([(d["doc_id"], d["text"]) for d in docs])
    stats, out = first_runs["three"]
    kept, removed = _texts(out), _texts(out, "removed")
    assert set(kept) | set(removed) == set(reference) and not set(kept) & set(removed)
    assert kept == {d: reference[d] for d in kept}
    assert all(not reference[d].strip() for d in removed)
    local = line_dedup_local([(d["doc_id"], d["text"]) for d in docs], LineDedupConfig(mode="line"))
    assert {d: v[0] for d, v in local.items()} == reference


def test_navigation_kept_only_by_first_owner_and_articles_stay(corpus: Corpus, first_runs: Runs) -> None:
    _, docs, _ = corpus
    _, out = first_runs["one"]
    kept = _texts(out)
    owner = min(docs, key=lambda d: doc_order(d["doc_id"]))["doc_id"]
    for line in NAV:
        holders = [d for d, text in kept.items() if line in text.split("\n")]
        assert holders == [owner]
    by_id = {d["doc_id"]: d["text"] for d in docs}
    for doc_id, text in kept.items():
        article = [line for line in by_id[doc_id].split("\n") if line and line not in NAV and line != FOOTER]
        assert all(line in text for line in article)


def test_emptied_document_goes_to_removed(corpus: Corpus, first_runs: Runs) -> None:
    stats, out = first_runs["one"]
    removed = [row for rows in _read(out / "removed").values() for row in rows]
    assert [r["doc_id"].startswith("nav-") for r in removed] == [True]
    assert removed[0]["reason"] == EMPTY_REASON and removed[0]["lines_removed"] == len(NAV) + 1
    assert stats["dropped"] == {EMPTY_REASON: 1}
    assert stats["documents_in"] == len(corpus[1]) == stats["documents_out"] + 1


def test_schema_and_counters(corpus: Corpus, first_runs: Runs) -> None:
    _, docs, sources = corpus
    _, out = first_runs["one"]
    for source in sources:
        schema = pq.read_schema(out / "data" / source.name)
        assert schema.names == [*DOCUMENT_SCHEMA.names, "lines_removed", "chars_removed"]
    by_id = {d["doc_id"]: d["text"] for d in docs}
    for rows in _read(out / "data").values():
        for row in rows:
            assert row["chars_removed"] == len(by_id[row["doc_id"]]) - len(row["text"])
            assert row["lines_removed"] == len(by_id[row["doc_id"]].split("\n")) - len(row["text"].split("\n"))


def test_counting_stats_agree_with_removal(corpus: Corpus, first_runs: Runs) -> None:
    _, docs, _ = corpus
    stats, _ = first_runs["three"]
    per_doc = Counter(n for d in docs for n in {norm(line) for line in d["text"].split("\n")} if n)
    expected = sum(count - 1 for count in per_doc.values() if count > 1)
    assert stats["pairs_removed"] == stats["counting"]["expected_removals"] == expected
    assert stats["counting"]["distinct_hashes"] == len(per_doc)
    assert stats["segments_seen"] == sum(len(d["text"].split("\n")) for d in docs)
    assert stats["segments_removed"] > stats["pairs_removed"]  # a navigation line twice in one page
    local = line_dedup_local([(d["doc_id"], d["text"]) for d in docs], LineDedupConfig(mode="line"))
    assert stats["chars_removed"] == sum(chars for _, _, chars in local.values())
    assert stats["segments_removed"] == sum(lines for _, lines, _ in local.values())
    assert stats["chars_in"] == sum(len(d["text"]) for d in docs)
    top = {row["text"]: row["docs"] for row in stats["top_removed"]}
    for line in NAV:
        assert top[line] == per_doc[norm(line)]
    per_actor = [a["hashes"] for a in stats["counting"]["per_actor"]]
    assert len(per_actor) == 3 and sum(per_actor) == len(per_doc)
    assert all(0.2 * len(per_doc) < count < 0.5 * len(per_doc) for count in per_actor)


def test_boilerplate_rule_and_off(corpus: Corpus) -> None:
    root, docs, sources = corpus
    config = LineDedupConfig(mode="line", rule="boilerplate", min_docs=3, num_actors=2)
    stats, out = _run(root, "boiler", sources, config)
    local = line_dedup_local([(d["doc_id"], d["text"]) for d in docs], config)
    kept = _texts(out)
    assert kept == {d: local[d][0] for d in kept}
    assert all(line not in text for text in kept.values() for line in NAV)
    assert stats["dropped"] == {EMPTY_REASON: 1}
    off_stats, off = _run(root, "off", sources, LineDedupConfig())
    assert _texts(off) == {d["doc_id"]: d["text"] for d in docs}
    assert off_stats["chars_removed"] == 0 and off_stats["documents_out"] == len(docs)


def test_actor_ignores_a_repeated_batch(ray_local: None) -> None:
    actor = LineCountActor.remote(LineDedupConfig(mode="line"), 10)
    hashes, keys = np.array([5, 6], np.uint64), np.array([1, 1], np.int64)
    assert ray.get(actor.add_batch.remote("count:a:0", hashes, keys)) == 2
    assert ray.get(actor.add_batch.remote("count:a:0", hashes, keys)) == 0  # a retried task's batch
    ray.get(actor.add_batch.remote("count:b:0", hashes[:1], np.array([-3], np.int64)))
    removable, owners = ray.get(actor.query.remote(np.array([5, 6, 7], np.uint64)))
    assert removable.tolist() == [5] and owners.tolist() == [-3]
    assert ray.get(actor.summary.remote())["hashes"] == 2
    ray.kill(actor)


def test_duplicate_shard_names_rejected(tmp_path: Path) -> None:
    sources = [tmp_path / "a" / "part.parquet", tmp_path / "b" / "part.parquet"]
    with pytest.raises(ValueError, match="distinct file names"):
        run_line_dedup(sources, tmp_path / "data", tmp_path / "removed", tmp_path / "_tmp", LineDedupConfig())
