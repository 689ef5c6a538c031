"""`forgeline run` through every stage (ingest → dedup → filter → tokenize → pretrain → evaluate → rag) in one
fresh process, through the installed console script, on a tiny config over a sample the project builds:
local Ray and an ephemeral Prefect, every stage published with the counts of this fixed input, nothing in $HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.sample.build import build_sample
from dataprep.stage import StageDir

pytestmark = pytest.mark.integration

CONFIG = """\
name: all-stages
run_dir: run
ray: {num_cpus: 2}
ingest:
  inputs: [sample/crawl-*.warc.gz, sample/notes.jsonl.gz]
  shard_max_records: 40
dedup:
  lines: {mode: line}
filter:
  num_actors: 1
  steps:
    - rule: language
      params: {keep: [en]}
    - rule: gopher_repetition
    - rule: gopher_quality
    - rule: c4
    - rule: fineweb
    - rule: blocklist
    - rule: toxicity
    - rule: quality
      params: {model: run/models/quality.bin, min_score: 0.05}
  train_quality:
    positives: [sample/reference.jsonl]
    output: run/models/quality.bin
tokenize: {vocab_size: 512, seq_len: 32, holdout: 0.3}  # by doc-id hash: 0.1 of 22 docs can be none
pretrain:
  model: {preset: tiny, dim: 64, n_layers: 2, ffn_dim: 160, max_seq_len: 64}
  steps: 6
  micro_batch: 4
  warmup_steps: 2
  num_workers: 1
  checkpoint_every: 3
  keep_last: 3
  eval_every: 3
evaluate:
  tasks: [tasks/continuation.yaml]
  max_windows: 8
rag:
  num_actors: 1
"""

TASK = """\
name: continuation
type: choice
data: ../sample/tasks/continuation.jsonl
template: "{context}"
choices_field: choices
label_field: label
k: 1
max_examples: 8
"""


# records in, out and dropped by reason, for this fixed sample (80 prose pages + copies, noise, foreign pages)
STAGE_COUNTS = {
    "ingest": (153, 145, {"binary_payload": 2, "empty_payload": 1, "http_not_ok": 2, "invalid_encoding": 1,
                          "malformed_json": 1, "non_html": 1}),
}
# Filter's per-step counts are not pinned: document ids include the input's path, and line dedup keeps a repeated
# line in the first document by id, so a line or two moves between documents with the checkout's location
# (seen in clone runs: gopher_quality 48 or 49 of 100). Its input count and bookkeeping are.
DEDUP = {"exact_duplicate": 29, "fuzzy_duplicate": 2}  # document dedup; line dedup's empties vary as above


def _manifest(run_dir: Path, stage: str) -> dict:
    (path,) = [p for p in run_dir.glob(f"{stage}-*") if StageDir(p).is_complete()]
    return json.loads((path / "manifest.json").read_text())


def test_every_stage_through_the_console_script(tmp_path: Path) -> None:
    build_sample(tmp_path / "sample", prose_pages=80, warc_files=2)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "continuation.yaml").write_text(TASK)
    (tmp_path / "c.yaml").write_text(CONFIG)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FORGELINE_", "RAY_"))}
    env.update(HOME=str(home), FORGELINE_HOME=str(tmp_path / "state"))
    forgeline = str(Path(sys.executable).with_name("forgeline"))
    done = subprocess.run([forgeline, "run", "c.yaml"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "run"
    for stage in ("ingest", "dedup", "filter", "tokenize", "pretrain", "evaluate", "rag"):
        assert f"{stage}: done" in done.stdout, stage
    stats = {stage: _manifest(run_dir, stage)["stats"] for stage in (*STAGE_COUNTS, "dedup", "filter")}
    for stage, (records_in, records_out, dropped) in STAGE_COUNTS.items():
        assert (stats[stage]["records_in"], stats[stage]["records_out"]) == (records_in, records_out), stage
        assert stats[stage]["dropped"] == dropped, stage
        assert records_in == records_out + sum(dropped.values()), stage
    dedup = stats["dedup"]
    assert dedup["records_in"] == 145 and {k: dedup["dropped"][k] for k in DEDUP} == DEDUP
    assert dedup["records_in"] == dedup["records_out"] + sum(dedup["dropped"].values())
    kept, filter_in = stats["filter"]["records_out"], dedup["records_out"]
    assert stats["filter"]["records_in"] == filter_in == kept + sum(stats["filter"]["dropped"].values())
    assert 0 < kept < filter_in and stats["filter"]["dropped"]["language"] > 0
    tokens = _manifest(run_dir, "tokenize")["stats"]
    assert tokens["records_in"] == tokens["records_out"] == kept and tokens["vocab_size"] == 512
    pretrain = _manifest(run_dir, "pretrain")
    assert pretrain["stats"]["steps"] == 6 and pretrain["stats"]["resumed_from_steps"] == []
    checkpoints = Path(pretrain["path"]) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000000", "step-00000003", "step-00000006"]
    assert (Path(pretrain["path"]) / "hf" / "config.json").is_file()
    evaluate = _manifest(run_dir, "evaluate")
    steps = {row["step"] for row in pq.read_table(Path(evaluate["path"]) / "results.parquet").to_pylist()}
    assert steps == {0, 3, 6} and evaluate["stats"]["errors"] == 0
    rag = _manifest(run_dir, "rag")["stats"]
    # chunk counts follow the BPE tokenizer, which is trained without the held-out documents: those are chosen
    # by doc-id hash, and ids include the input's path, so the chunk count is not fixed across checkouts
    assert rag["documents"] == kept and rag["chunks"] == rag["vectors"] >= kept
    assert list(home.iterdir()) == [], f"written to HOME: {list(home.rglob('*'))[:5]}"
    assert (tmp_path / "state" / "prefect").is_dir()
