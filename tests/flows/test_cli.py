"""CLI surface: --help on every command, config errors exit 2 naming the file and field."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import flows.pipeline  # noqa: F401  (Prefect sets up its log handlers at import: not inside CliRunner's streams)
from flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["ingest"], ["sample"], ["validate"]])
def test_help_everywhere(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_run_help_lists_until_and_address() -> None:
    output = runner.invoke(app, ["run", "--help"]).output
    assert "--until" in output and "--address" in output and "--local" in output


def test_validate_reports_field_and_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("run_dir: r\ningest:\n  inputs: [a.warc]\n  extractor: nope\n")
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "ingest.extractor" in result.output


def test_validate_prints_defaults(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("run_dir: r\ningest:\n  inputs: [a.warc]\n")
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0 and '"extractor": "resiliparse"' in result.output
    assert '"min_doc_words": 50' in result.output  # filter steps show their effective thresholds, not {}


def test_unknown_until_stage_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("run_dir: r\ningest:\n  inputs: [a.warc]\n")
    result = runner.invoke(app, ["run", str(config), "--until", "serve-everything"])
    assert result.exit_code == 2 and "--until" in result.output
