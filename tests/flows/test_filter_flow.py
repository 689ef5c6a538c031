"""The filter flow and the classifier-training flows in local mode (real Ray, real Prefect test server)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.filter.config import TrainQualityConfig
from dataprep.filter.fasttext_models import FastTextClassifier, ModelError
from dataprep.filter.training_data import write_jigsaw
from flows.config import RayConfig, parse_config
from flows.pipeline import pipeline_flow
from flows.train import train_quality_flow, train_toxicity_flow
from tests.dataprep.test_filter_chain import labelled_examples

pytestmark = pytest.mark.integration


INPUTS = {  # the project's sample (always there) and the real crawl samples in ../shared
    "built_sample": ["crawl-*.warc.gz"],
    "crawl_dir": ["dolma-sample-000*.warc.gz", "cc-2020-34-multilingual.warc.gz"],
}
# per source: documents shingled by characters (the Chinese pages), documents dropped by language ID
EXPECTED = {"built_sample": (2, 23), "crawl_dir": (11, 16)}


def _config(tmp_path: Path, folder: Path, patterns: list[str], **filter_section: object) -> object:
    return parse_config({
        "run_dir": str(tmp_path / "run"),
        "ray": {"num_cpus": 2},
        "ingest": {"inputs": [str(folder / pattern) for pattern in patterns]},
        "filter": {"num_actors": 2, **filter_section},
    })


@pytest.mark.parametrize("source", list(INPUTS))
def test_filter_stage_end_to_end(source: str, request: pytest.FixtureRequest, tmp_path: Path,
                                 flow_env: None) -> None:
    # more filter actors than the session's 2 CPUs on the built sample: capped at 2 (an actor that cannot be
    # placed would hold its shards forever)
    actors = {"num_actors": 3} if source == "built_sample" else {}
    config = _config(tmp_path, request.getfixturevalue(source), INPUTS[source], **actors)
    char_documents, language_drops = EXPECTED[source]
    results = pipeline_flow(config, "filter")
    stage = Path(results["filter"]["path"])
    stats = results["filter"]["stats"]
    assert stats["records_in"] == results["dedup"]["stats"]["records_out"]
    shingles = results["dedup"]["stats"]["shingles"]  # `shingle: auto`: the Chinese pages by characters
    assert shingles["char_documents"] == char_documents
    assert shingles["word_documents"] + char_documents == results["dedup"]["stats"]["records_in"]
    kept = pq.read_table(stage / "data").to_pylist()
    assert len(kept) == stats["records_out"] > 0
    assert {d["language"] for d in kept} == {"en"}
    assert all(d["score_toxicity_score"] <= 0.5 for d in kept)
    removed_total = 0
    for step, count in stats["dropped"].items():
        rows = pq.read_table(stage / "removed" / step).to_pylist()
        assert len(rows) == count and {r["drop_step"] for r in rows} == {step}
        removed_total += count
    assert removed_total + len(kept) == stats["records_in"]
    assert stats["dropped"]["language"] == language_drops  # foreign pages, and short ones that are not English
    manifest = json.loads((stage / "manifest.json").read_text())
    assert [step["name"] for step in manifest["stats"]["steps"]] == [s.rule for s in config.filter.steps]
    assert (stage / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = pipeline_flow(config, "filter")
    assert again["filter"]["skipped"] and again["filter"]["path"] == str(stage)


def test_missing_model_fails_before_any_document(built_sample: Path, tmp_path: Path, flow_env: None) -> None:
    config = _config(tmp_path, built_sample, INPUTS["built_sample"],
                     steps=[{"rule": "quality", "params": {"model": str(tmp_path / "q.bin")}}])
    with pytest.raises(ModelError, match="quality.*does not exist"):
        pipeline_flow(config, "filter")
    assert not list((tmp_path / "run").glob("filter-*"))


def test_train_toxicity_and_quality_flows(tmp_path: Path, flow_env: None) -> None:
    examples = [("toxic" if label == "cc" else "clean", text) for label, text in labelled_examples(600)]
    write_jigsaw(tmp_path / "labels.csv", examples)
    ray_config = RayConfig(num_cpus=2)
    metrics = train_toxicity_flow(tmp_path / "labels.csv", tmp_path / "tox.ftz", ray_config, 0.2, 10, 0, False)
    assert metrics["held_out"]["precision"] > 0.9 and metrics["held_out"]["recall"] > 0.9
    model = FastTextClassifier.load(tmp_path / "tox.ftz")
    assert model.probability(["casino1 casino2 casino3"], "toxic")[0] > 0.5
    assert json.loads((tmp_path / "tox.ftz.json").read_text())["train_examples"] == 480

    positives, negatives = tmp_path / "ref.jsonl.gz", tmp_path / "crawl.jsonl"
    texts = labelled_examples(400, seed=1)
    with gzip.open(positives, "wt") as handle:
        handle.writelines(json.dumps({"text": t * 3}) + "\n" for label, t in texts if label == "hq")
    negatives.write_text("".join(json.dumps({"text": t * 3}) + "\n" for label, t in texts if label == "cc"))
    training = TrainQualityConfig(positives=[str(positives)], output=tmp_path / "quality.bin")
    metrics = train_quality_flow(training, [str(negatives)], ray_config)
    assert metrics["held_out"]["accuracy"] > 0.9
    assert FastTextClassifier.load(tmp_path / "quality.bin").top(["river3 river4 river5"])[0] == ["hq"]
    assert (tmp_path / "quality.bin").stat().st_size < 20 * 2**20  # sized to its data, quantised (was 800 MB)
