"""The installed `forgeline` console script: errors a user can fix are one line naming the cause and the fix, exit
code 2, no traceback on the console, the full trace in the run's log file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.errors import explain

FORGELINE = Path(sys.executable).parent / "forgeline"


def forgeline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PREFECT_API_URL"))}
    env["FORGELINE_HOME"] = str(cwd / "home")
    return subprocess.run([str(FORGELINE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    others = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    # besides the one error line only Prefect's timestamped progress lines (no traceback, no exception dump)
    assert all(" | " in line or line.startswith("See https://docs.prefect.io") for line in others), others
    return errors[0]


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ningest:\n  inputs: [{tmp_path / 'in.jsonl'}]\n")
    return path


def test_serve_with_a_wrong_model_path(config: Path, tmp_path: Path) -> None:
    line = one_line_error(forgeline("serve", str(config), "--model", str(tmp_path / "nope"), cwd=tmp_path))
    assert str(tmp_path / "nope") in line and "--model" in line
    assert "not found" in line and (tmp_path / "run" / "logs" / "forgeline.log").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(forgeline("serve", str(config), "--model", str(empty), cwd=tmp_path))
    assert "not an HF export, checkpoint or pretrain stage" in line


def test_serve_on_a_port_in_use(config: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(forgeline("serve", str(config), "--port", str(port), cwd=tmp_path))
    assert f"port {port} is in use" in line and "--port" in line


def test_address_without_a_cluster(config: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    line = one_line_error(forgeline("run", str(config), "--address", address, cwd=tmp_path))
    assert f"no Ray cluster reachable at --address '{address}'" in line and "ray start --head" in line
    line = one_line_error(forgeline("run", str(config), "--address", f"ray://{address}", cwd=tmp_path))
    assert f"--address 'ray://{address}'" in line


def test_train_toxicity_without_its_csv(tmp_path: Path) -> None:
    line = one_line_error(forgeline("train-toxicity", str(tmp_path / "labels.csv"), "--out", "m.ftz", cwd=tmp_path))
    assert "labels.csv" in line and "label-toxicity" in line


def test_missing_optional_packages_name_their_extra() -> None:
    fsspec_style = ImportError("Install s3fs to access S3")
    assert explain(fsspec_style) == ("missing optional package s3fs (Install s3fs to access S3): "
                                     "pip install 'forgeline[s3]'")
    assert "pip install 'forgeline[labels]'" in str(explain(ModuleNotFoundError("no", name="profanity_check")))
    assert explain(RuntimeError("a bug")) is None  # a bug keeps its traceback


def test_s3_input_without_s3fs_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here: the missing-package path cannot run")
    config = tmp_path / "s3.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ningest:\n  inputs: ['s3://bucket/crawl/*.warc.gz']\n")
    line = one_line_error(forgeline("ingest", str(config), cwd=tmp_path))
    assert "s3fs" in line and "forgeline[s3]" in line


def test_label_toxicity_without_its_extra(tmp_path: Path) -> None:
    if __import__("importlib").util.find_spec("profanity_check") is not None:
        pytest.skip("the labels extra is installed here")
    line = one_line_error(forgeline("label-toxicity", str(tmp_path / "out.csv"), "--sentences", "10", cwd=tmp_path))
    assert "profanity_check" in line and "forgeline[labels]" in line
