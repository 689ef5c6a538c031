"""The ingest flow in local mode (real Ray, real Prefect) over the sample the project builds, real crawl samples
and crafted bad input. The fault drills run on the built sample, so a clone without `../shared` runs them."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.ingest.inputs import InputError
from flows.config import parse_config
from flows.ingest import ingest_flow
from tests.conftest import make_warc, mid_member_cut

pytestmark = pytest.mark.integration

REAL_FILES = {
    "cc-2020-34-multilingual.warc.gz": 16,
    "dolma-sample-0000.warc.gz": 22,
    "dolma-sample-0001.warc.gz": 15,
    "whirlwind.warc.gz": 1,
    "whirlwind.warc.wet.gz": 1,
    "cc-en-head-0091.jsonl": 10,
}


BUILT_FILES = {"crawl-00000.warc.gz": 42, "crawl-00001.warc.gz": 43, "notes.jsonl.gz": 20}


def _config(run_dir: Path, inputs: list[str], **ingest: object):
    return parse_config({"run_dir": str(run_dir), "orchestration": {"task_retries": 0},
                         "ingest": {"inputs": inputs, **ingest}})


def _docs(result: dict) -> list[dict]:
    return pq.read_table(Path(result["path"]) / "data").to_pylist()


@pytest.fixture(scope="module")
def real_run(crawl_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: None, ray_local: None):
    inputs = [str(crawl_dir / name) for name in REAL_FILES]
    config = _config(tmp_path_factory.mktemp("real"), inputs, shard_max_records=8)
    return config, ingest_flow(config)


def test_record_counts_per_file(real_run) -> None:
    _, result = real_run
    docs = _docs(result)
    for name, expected in REAL_FILES.items():
        assert sum(d["source"].endswith("/" + name) for d in docs) == expected, name
    manifest = (Path(result["path"]) / "manifest.json").read_text()
    assert '"records_out": 65' in manifest
    stats = result["stats"]
    assert stats["records_in"] == stats["records_out"] + sum(stats["dropped"].values())
    assert (Path(result["path"]) / "_SUCCESS").is_file()


def test_chinese_and_russian_pages_decode(real_run) -> None:
    by_url = {d["url"]: d for d in _docs(real_run[1])}
    russian = by_url["http://01spb.ru/company/"]
    assert russian["charset"] == "cp1251" and "Стратегия пожарной безопасности" in russian["text"]
    chinese = by_url["http://0760.jxtdw.com/area/sanxiang/"]
    assert chinese["charset"] == "gbk" and "中山英才网热线" in chinese["text"]


def test_identical_allenai_captures_all_present(real_run) -> None:
    docs = [d for d in _docs(real_run[1]) if d["source"].endswith("dolma-sample-0001.warc.gz")]
    allenai = [d for d in docs if d["url"].rstrip("/") in ("https://allenai.org", "http://allenai.org")]
    assert len(allenai) == 3
    assert len({d["text"] for d in allenai}) == 1 and len({d["doc_id"] for d in allenai}) == 3


def test_wet_text_close_to_warc_extraction(real_run) -> None:
    docs = {d["source_format"]: d for d in _docs(real_run[1]) if "an.wikipedia.org/wiki/Escopete" in (d["url"] or "")}
    wet_words, warc_words = docs["wet"]["text"].split(), docs["warc"]["text"].split()
    overlap = sum(b.size for b in difflib.SequenceMatcher(None, warc_words, wet_words).get_matching_blocks())
    assert overlap / len(warc_words) > 0.8, "most of our main text is in Common Crawl's WET text"
    assert len(warc_words) < len(wet_words), "main-text extraction drops the navigation WET keeps"


def test_rerun_is_skipped(real_run) -> None:
    config, first = real_run
    again = ingest_flow(config)
    assert again["skipped"] and again["path"] == first["path"]


@pytest.fixture(scope="module")
def built_run(built_sample: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: None, ray_local: None):
    inputs = [str(built_sample / "crawl-*.warc.gz"), str(built_sample / "notes.jsonl.gz")]
    config = _config(tmp_path_factory.mktemp("built"), inputs, shard_max_records=10)
    return config, ingest_flow(config)


def test_built_sample_counts_per_file_and_reasons(built_run) -> None:
    _, result = built_run
    docs = _docs(result)
    per_file = {name: sum(d["source"].endswith("/" + name) for d in docs)
                for name in ("crawl-00000.warc.gz", "crawl-00001.warc.gz", "notes.jsonl.gz")}
    assert per_file == BUILT_FILES
    stats = result["stats"]
    assert stats["records_out"] == sum(BUILT_FILES.values())
    assert stats["dropped"] == {"binary_payload": 2, "empty_payload": 1, "http_not_ok": 2, "invalid_encoding": 1,
                                "malformed_json": 1, "non_html": 1}
    assert stats["records_in"] == stats["records_out"] + sum(stats["dropped"].values())


def test_built_cp1251_and_gbk_pages_decode(built_run, built_sample: Path) -> None:
    by_url = {d["url"]: d for d in _docs(built_run[1])}
    lines = {lang: (Path(__file__).parents[2] / "dataprep" / "sample" / "sample_text" / f"{lang}.txt")
             .read_text().splitlines() for lang in ("ru", "zh")}
    russian, chinese = by_url["https://ru.news.example/1.html"], by_url["https://zh.news.example/1.html"]
    assert russian["charset"] == "cp1251" and lines["ru"][1] in russian["text"]
    assert chinese["charset"] == "gbk" and lines["zh"][1] in chinese["text"]


def test_built_recaptures_all_present(built_run) -> None:
    urls = [d["url"] for d in _docs(built_run[1]) if d["source_format"] == "warc"]
    again = {url for url in urls if urls.count(url) > 1}
    assert len(again) == 1, "the sample re-captures one page: both captures are ingested (dedup removes one)"


def without_recovery(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key != "recovery"}


def test_fault_then_rerun_equals_undisturbed_run(built_sample: Path, tmp_path: Path, flow_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [str(built_sample / "crawl-00000.warc.gz"), str(built_sample / "crawl-00001.warc.gz")]
    clean = ingest_flow(_config(tmp_path / "clean", inputs, shard_max_records=10))

    config = _config(tmp_path / "crashed", inputs, shard_max_records=10)
    monkeypatch.setenv("FORGELINE_INJECT_FAULT", "ingest:2")
    with pytest.raises(Exception, match="injected fault"):
        ingest_flow(config)
    stage = Path(clean["path"].replace(str(tmp_path / "clean"), str(tmp_path / "crashed")))
    assert not (stage / "_SUCCESS").exists()
    assert len(list((stage / "data").glob("*.parquet"))) == 4, "two shards published per file before the fault"
    monkeypatch.delenv("FORGELINE_INJECT_FAULT")
    resumed = ingest_flow(config)

    assert Path(resumed["path"]).name == Path(clean["path"]).name
    assert without_recovery(resumed["stats"]) == without_recovery(clean["stats"])
    assert clean["stats"]["recovery"] == {"units_retried": 0}
    assert resumed["stats"]["recovery"] == {"units_retried": 2}, "the rerun re-entered both interrupted units"
    for subdir in ("data", "quarantine"):
        clean_files = sorted(p.name for p in (Path(clean["path"]) / subdir).glob("*.parquet"))
        assert clean_files == sorted(p.name for p in (stage / subdir).glob("*.parquet"))
        for name in clean_files:
            assert pq.read_table(stage / subdir / name).equals(pq.read_table(Path(clean["path"]) / subdir / name))


def test_worker_killed_mid_unit_is_retried_by_ray_and_resumes(built_sample: Path, tmp_path: Path,
                                                               flow_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [str(built_sample / "crawl-00000.warc.gz")]
    clean = ingest_flow(_config(tmp_path / "clean", inputs, shard_max_records=10))
    monkeypatch.setenv("FORGELINE_INJECT_FAULT", "ingest:2:kill")
    killed = ingest_flow(_config(tmp_path / "killed", inputs, shard_max_records=10))
    (unit,) = json.loads((Path(killed["path"]) / "manifest.json").read_text())["units"]
    assert unit["resumed_from_shard"] == 2, "the retried task continued after the two published shards"
    assert without_recovery(killed["stats"]) == without_recovery(clean["stats"])
    assert killed["stats"]["recovery"] == {"units_retried": 1}, "Ray reran the killed task"
    assert pq.read_table(Path(killed["path"]) / "data").equals(pq.read_table(Path(clean["path"]) / "data"))


def test_bad_input_is_quarantined_and_the_rest_completes(tmp_path: Path, flow_env: None) -> None:
    good = make_warc([{"url": f"https://ok.example/{i}", "body": b"<html><body><p>" + b"Fine words here. " * 20
                       + b"</p></body></html>"} for i in range(30)])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.warc.gz").write_bytes(good)
    (tmp_path / "in" / "truncated.warc.gz").write_bytes(good[: mid_member_cut(good, 15)])
    (tmp_path / "in" / "notes.jsonl").write_bytes(b'{"text": "a fine note"}\n{broken\n\xff\xfe{"text": 1}\n')
    result = ingest_flow(_config(tmp_path / "run", [str(tmp_path / "in" / "*")]))
    stats = result["stats"]
    assert stats["records_out"] == 30 + 1 + sum(1 for d in _docs(result) if "truncated" in d["source"])
    assert stats["dropped"]["malformed_json"] == 1 and stats["dropped"]["invalid_utf8"] == 1
    assert stats["dropped"].get("truncated_record", 0) >= 1
    quarantine = pq.read_table(Path(result["path"]) / "quarantine").to_pylist()
    assert {q["reason"] for q in quarantine} >= {"malformed_json", "truncated_record"}
    assert all(q["source"] and q["source_offset"] is not None for q in quarantine)


def test_missing_input_fails_before_any_work(tmp_path: Path, flow_env: None) -> None:
    with pytest.raises(InputError, match=r"ingest.inputs\[1\]"):
        ingest_flow(_config(tmp_path / "run", [__file__, str(tmp_path / "nope*.warc")]))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_stats_artifact_is_on_the_flow_run(real_run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-stats"])))
    assert artifacts and any("records in" in (a.data or "") for a in artifacts)
    assert any(a.flow_run_id for a in artifacts)
