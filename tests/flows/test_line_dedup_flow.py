"""`dedup.lines` in the dedup stage on real pages: the sample crawl the project builds and the dolma WARCs."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dataprep.dedup.lines import ccnet_reference, normalize_line
from dataprep.sample.build import build_sample
from flows.config import RunConfig, parse_config
from flows.pipeline import pipeline_flow

pytestmark = pytest.mark.integration
SPAM = "click here to claim your free iphone now!!! limited offer, only today!!!"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 prose pages of the sample crawl (spam lines repeated across pages), plus two pages of nothing but a
    line other pages also carry: line dedup must empty them."""
    folder = tmp_path_factory.mktemp("sample")
    build_sample(folder, prose_pages=60)
    stub = [{"id": "stub-a", "text": "Subscribe to our newsletter!"}, {"id": "stub-b", "text": "Best deals"}]
    with gzip.open(folder / "stubs.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in stub)
    return folder


def _config(run_dir: Path, inputs: list[str], **lines: Any) -> RunConfig:
    return parse_config({"run_dir": str(run_dir), "ray": {"num_cpus": 2}, "ingest": {"inputs": inputs},
                         "dedup": {"lines": {"mode": "line", **lines}}})


def _texts(folder: Path) -> dict[str, str]:
    return {row["doc_id"]: row["text"] for path in sorted(folder.glob("*.parquet"))
            for row in pq.read_table(path, columns=["doc_id", "text"]).to_pylist()}


def test_repeated_lines_leave_every_document_but_the_first(sample: Path, tmp_path: Path, flow_env: None) -> None:
    config = _config(tmp_path / "run", [str(sample / "crawl-*.warc.gz"), str(sample / "stubs.jsonl.gz")])
    result = pipeline_flow(config, "dedup")["dedup"]
    stage, stats = Path(result["path"]), result["stats"]
    before = _texts(stage / "_work" / "kept")  # the documents document dedup kept
    after = _texts(stage / "data")
    removed = pq.read_table(stage / "removed").to_pylist()

    reference = ccnet_reference(list(before.items()))  # CCNet's rule in plain Python, on normalised strings
    assert after == {doc_id: text for doc_id, text in reference.items() if doc_id in after}
    emptied = sorted(doc_id for doc_id, text in reference.items() if not text.strip())
    assert sorted(row["doc_id"] for row in removed) == emptied and len(emptied) >= 1
    assert all(row["reason"] == "line_dedup_empty" for row in removed)
    assert stats["dropped"]["line_dedup_empty"] == len(emptied)
    assert stats["records_in"] == stats["records_out"] + sum(stats["dropped"].values())

    documents_with = Counter(line for text in before.values() for line in {normalize_line(x) for x in
                                                                           text.split("\n")} if line)
    for doc_id, text in before.items():
        kept_lines = set(reference[doc_id].split("\n"))
        for line in text.split("\n"):
            if line not in kept_lines:
                assert documents_with[normalize_line(line)] >= 2, f"{line!r} occurs once yet left {doc_id}"
    spam_holders = [doc_id for doc_id, text in after.items() if SPAM in text.lower()]
    assert documents_with[SPAM] >= 3 and len(spam_holders) == 1

    lines = stats["lines"]
    assert lines["counting"]["expected_removals"] == lines["pairs_removed"] > 0, "count pass == removal pass"
    assert lines["segments_removed"] == sum(row["lines_removed"] for row in
                                            pq.read_table(stage / "data").to_pylist()) + sum(
        row["lines_removed"] for row in removed)
    assert lines["top_removed"][0]["docs"] == max(c for c in documents_with.values())
    assert pipeline_flow(config, "dedup")["dedup"]["skipped"], "a rerun skips the complete stage"


def test_shared_navigation_of_real_crawl_pages(crawl_dir: Path, tmp_path: Path, flow_env: None) -> None:
    config = _config(tmp_path / "run", [str(crawl_dir / "dolma-sample-000*.warc.gz")], rule="boilerplate",
                     min_docs=3)
    result = pipeline_flow(config, "dedup")["dedup"]
    stage = Path(result["path"])
    before, after = _texts(stage / "_work" / "kept"), _texts(stage / "data")
    documents_with = Counter(line for text in before.values() for line in {normalize_line(x) for x in
                                                                           text.split("\n")} if line)
    assert documents_with["learn more"] >= 3
    assert not any("learn more" in {normalize_line(x) for x in text.split("\n")} for text in after.values())
    for doc_id, text in after.items():  # every line left is one that fewer than 3 documents share
        assert all(documents_with[normalize_line(x)] < 3 for x in text.split("\n") if normalize_line(x))
        article = [x for x in before[doc_id].split("\n") if documents_with[normalize_line(x)] == 1]
        assert all(x in text.split("\n") for x in article), "a line that occurs once is never removed"
