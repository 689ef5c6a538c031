"""Config loading: typed, relative paths resolved against the file, errors name the file and field."""

from pathlib import Path

import pytest

from flows.config import ConfigError, load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "run.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "run_dir: ../runs/x\ningest:\n  inputs: [../data/*.warc.gz, s3://bucket/a.warc.gz]\n")
    config = load_config(path)
    assert config.run_dir == (tmp_path / "runs" / "x").resolve()
    assert config.ingest.inputs == [str((tmp_path / "data" / "*.warc.gz").resolve()), "s3://bucket/a.warc.gz"]
    assert config.ingest.extractor == "resiliparse" and config.ray.address is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("run_dir: r\ningest:\n  inputs: [a.warc]\n  extractor: boilerpipe\n", "ingest.extractor"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\n  shard_max_records: many\n", "ingest.shard_max_records"),
        ("run_dir: r\ningest:\n  inputs: []\n", "ingest.inputs"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\n  typo_field: 1\n", "ingest.typo_field"),
        ("ingest:\n  inputs: [a.warc]\n", "run_dir"),
        ("run_dir: r\nray:\n  num_cpus: 0\ningest:\n  inputs: [a.warc]\n", "ray.num_cpus"),
        # a bad value in every other section names its field
        ("run_dir: r\ningest:\n  inputs: [a.warc]\norchestration:\n  task_retries: -1\n", "orchestration.task_retries"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\ndedup:\n  threshold: 1.5\n", "dedup.threshold"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\ndedup:\n  shingle: letters\n", "dedup.shingle"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\ndedup:\n  lines:\n    mode: sentence\n", "dedup.lines.mode"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nfilter:\n  num_actors: 0\n", "filter.num_actors"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\ntokenize:\n  vocab_size: lots\n", "tokenize.vocab_size"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\npretrain:\n  steps: 0\n", "pretrain.steps"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nevaluate:\n  max_windows: 0\n", "evaluate.max_windows"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nrag:\n  hybrid:\n    method: borda\n", "rag.hybrid.method"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nrag:\n  max_k: 0\n", "rag.max_k"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nfinetune:\n  method: qlora\n", "finetune.method"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nfinetune:\n  lora:\n    target_modules: [wq]\n", "finetune.lora"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nfinetune:\n  checkpoint: best\n", "finetune.checkpoint"),
        ("run_dir: r\ningest:\n  inputs: [a.warc]\nfinetune:\n  overlong: wrap\n", "finetune.overlong"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, body: str, field: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and f"  {field}:" in str(error.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_committed_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.ingest.inputs and config.run_dir.is_absolute()


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "run_dir: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a"], "x.yaml")


def test_finetune_runs_only_when_configured(tmp_path: Path) -> None:
    from flows.pipeline import stages_until

    plain = load_config(_write(tmp_path, "run_dir: r\ningest:\n  inputs: [a.warc]\n"))
    assert "finetune" not in stages_until(None, plain)
    assert stages_until("finetune", plain) == ("ingest", "dedup", "filter", "tokenize", "pretrain", "finetune")
    tuned = load_config(_write(tmp_path, "run_dir: r\ningest:\n  inputs: [a.warc]\nfinetune:\n  data: i.jsonl\n"))
    order = stages_until(None, tuned)
    assert order.index("pretrain") < order.index("evaluate") < order.index("finetune")
    assert tuned.finetune.data == str(tmp_path / "conf" / "i.jsonl"), "relative to the config file"
