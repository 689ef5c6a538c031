"""The dedup flow in local mode: identical captures of one page collapse to one, on the sample the project builds
(a re-captured page) and on the real crawl sample (three allenai.org captures)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.config import parse_config
from flows.pipeline import pipeline_flow

pytestmark = pytest.mark.integration


def test_recaptured_page_of_the_built_sample_collapses(built_sample: Path, tmp_path: Path, flow_env: None) -> None:
    config = parse_config({"run_dir": str(tmp_path / "run"),
                           "ingest": {"inputs": [str(built_sample / "crawl-*.warc.gz")]}})
    results = pipeline_flow(config, "dedup")
    docs = pq.read_table(Path(results["ingest"]["path"]) / "data").to_pylist()
    urls = [d["url"] for d in docs]
    (recaptured,) = {url for url in urls if urls.count(url) == 2}
    duplicates = pq.read_table(Path(results["dedup"]["path"]) / "duplicates.parquet").to_pylist()
    url_of = {d["doc_id"]: d["url"] for d in docs}
    assert [(d["method"], d["similarity"]) for d in duplicates if url_of[d["doc_id"]] == recaptured] == [("exact", 1.0)]
    kept = pq.read_table(Path(results["dedup"]["path"]) / "data").to_pylist()
    assert sum(url_of[d["doc_id"]] == recaptured for d in kept) == 1
    stats = results["dedup"]["stats"]
    assert (stats["records_in"], stats["records_out"]) == (85, 85 - len(duplicates))
    assert stats["dropped"] == {"exact_duplicate": 9, "fuzzy_duplicate": 2}  # 3 copies, 6 repeated short pages
    assert stats["shingles"] == {"setting": "auto", "ngram": 5, "word_documents": 83, "char_documents": 2}
    again = pipeline_flow(config, "dedup")
    assert again["ingest"]["skipped"] and again["dedup"]["skipped"]


def test_identical_captures_collapse_to_one(crawl_dir: Path, tmp_path: Path, flow_env: None) -> None:
    config = parse_config({"run_dir": str(tmp_path / "run"),
                           "ingest": {"inputs": [str(crawl_dir / "dolma-sample-0001.warc.gz")]}})
    results = pipeline_flow(config, "dedup")
    dedup = results["dedup"]
    duplicates = pq.read_table(Path(dedup["path"]) / "duplicates.parquet").to_pylist()
    docs = pq.read_table(Path(results["ingest"]["path"]) / "data").to_pylist()
    url_of = {d["doc_id"]: d["url"] for d in docs}
    allenai = [d for d in duplicates if url_of[d["doc_id"]] == "https://allenai.org/"]
    assert len(allenai) == 2 and {d["method"] for d in allenai} == {"exact"}
    assert {d["similarity"] for d in allenai} == {1.0}
    kept = pq.read_table(Path(dedup["path"]) / "data").to_pylist()
    assert sum(url_of[d["doc_id"]] == "https://allenai.org/" for d in kept) == 1
    assert dedup["stats"]["records_in"] == 15 and dedup["stats"]["records_out"] == 15 - len(duplicates)
    assert dedup["stats"]["shingles"] == {"setting": "auto", "ngram": 5, "word_documents": 15, "char_documents": 0}
    assert (Path(dedup["path"]) / "_SUCCESS").is_file()
    again = pipeline_flow(config, "dedup")
    assert again["ingest"]["skipped"] and again["dedup"]["skipped"]
