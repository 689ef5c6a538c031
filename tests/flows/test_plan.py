"""`forgeline run --dry-run`: every stage's address, skip or run and why, computed without writing anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.config import RunConfig, parse_config
from flows.pipeline import pipeline_flow, plan_pipeline
from tests.conftest import html_page, make_warc, reference_documents

pytestmark = pytest.mark.integration


def _inputs(folder: Path) -> Path:
    """A WARC of 12 prose pages (two exact copies) built from text the project ships."""
    folder.mkdir(parents=True)
    docs = reference_documents(10)
    pages = [{"url": f"https://docs.example/{i}", "body": html_page(f"page {i}", text.split("\n\n")).encode()}
             for i, (_, text) in enumerate(docs)]
    pages += [{**pages[0], "url": "https://mirror.example/0"}, {**pages[1], "url": "https://mirror.example/1"}]
    path = folder / "crawl.warc.gz"
    path.write_bytes(make_warc(pages))
    return path


def _config(root: Path, crawl: Path, **dedup: object) -> RunConfig:
    return parse_config({"run_dir": str(root / "run"), "ingest": {"inputs": [str(crawl)]}, "dedup": dedup})


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_dry_run_says_what_would_run_and_why(tmp_path: Path, flow_env: None) -> None:
    crawl = _inputs(tmp_path / "in")
    config = _config(tmp_path, crawl)

    before = _tree(tmp_path / "run")
    fresh = {plan.stage: plan for plan in plan_pipeline(config)}
    assert _tree(tmp_path / "run") == before, "a dry run writes nothing"
    assert [fresh[s].action for s in ("ingest", "dedup", "filter", "tokenize")] == ["run"] * 4
    assert fresh["ingest"].reason == "no earlier output of this stage"
    assert fresh["ingest"].inputs == [str(crawl)]
    assert fresh["pretrain"].action == "wait" and "tokenize output" in fresh["pretrain"].reason
    assert fresh["evaluate"].action == "wait"
    assert fresh["dedup"].resources["partitions"].startswith("4 bucket/document partitions")

    results = pipeline_flow(config, "dedup")
    assert results["ingest"]["path"] == fresh["ingest"].path, "the plan's address is the one the run used"
    assert results["dedup"]["path"] == fresh["dedup"].path

    again = {plan.stage: plan for plan in plan_pipeline(config, "filter")}
    assert (again["ingest"].action, again["dedup"].action, again["filter"].action) == ("skip", "skip", "run")

    changed = {plan.stage: plan for plan in plan_pipeline(_config(tmp_path, crawl, threshold=0.8), "dedup")}
    assert changed["ingest"].action == "skip"
    assert changed["dedup"].action == "run"
    assert changed["dedup"].reason == "dedup.bands: 18 → 12; dedup.rows: 7 → 10; dedup.threshold: 0.7 → 0.8"

    stat = crawl.stat()
    os.utime(crawl, (stat.st_atime, stat.st_mtime + 60))  # the same bytes, a new fingerprint (mtime)
    touched = {plan.stage: plan for plan in plan_pipeline(config, "dedup")}
    assert touched["ingest"].action == "run" and touched["ingest"].reason == f"input changed: {crawl}"
    assert touched["dedup"].action == "run" and touched["dedup"].reason.startswith("upstream changed: ingest-")


def test_cli_dry_run_prints_the_plan(tmp_path: Path) -> None:
    crawl = _inputs(tmp_path / "in")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: run\ningest:\n  inputs: [{crawl}]\n")
    result = CliRunner().invoke(app, ["dedup", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ingest: RUN — no earlier output of this stage" in result.output
    assert "dedup: RUN — no earlier output of this stage" in result.output
    assert "\nfilter:" not in result.output
    assert not (tmp_path / "run").exists()
