"""The README's command table against the installed `forgeline` console script: every command it lists exists,
every option it shows is one the command takes, every option has help text, and the examples that need no run
directory (plan, validate, sample, --dry-run) exit 0. (The error paths are in test_cli_errors.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import typer.main

import flows.pipeline  # noqa: F401  (Prefect sets up its log handlers at import)
from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
FORGELINE = Path(sys.executable).parent / "forgeline"


def readme_commands() -> list[tuple[str, set[str]]]:
    """(command, options shown) per line of the README's command block (continuation lines join the previous)."""
    block = REPO.joinpath("README.md").read_text().split("## Commands", 1)[1].split("```text", 1)[1].split("```")[0]
    rows: list[tuple[str, set[str]]] = []
    for line in block.strip().splitlines():
        usage = re.split(r"\s{3,}", line.strip())[0]
        options = set(re.findall(r"(--[a-z][a-z-]*)", usage))
        if line.startswith("forgeline "):
            rows.append((usage.split()[1], options))
        else:
            rows[-1][1].update(options)
    return rows


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PREFECT_API_URL"))}
    env["FORGELINE_HOME"] = str(cwd / "home")
    return subprocess.run([str(FORGELINE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_every_listed_command_and_option_exists_with_help() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")  # typer's group (its own vendored click)
    listed = readme_commands()
    assert len(listed) >= 15
    for name, options in listed:
        command = group.commands.get(name)
        assert command is not None, f"README lists `forgeline {name}`, which does not exist"
        taken = {flag for param in command.params  # a boolean pair's off switch (--no-x) counts too
                 for flag in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]}
        assert options <= taken, f"`forgeline {name}`: README shows {sorted(options - taken)}, not accepted"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"`forgeline {name} {param.opts[0]}` has no help text"
    assert {name for name, _ in listed} == set(group.commands), "README and CLI list different commands"


def test_console_script_runs_the_examples_that_need_no_run(tmp_path: Path) -> None:
    help_text = console("--help", cwd=tmp_path)
    assert help_text.returncode == 0 and all(name in help_text.stdout for name, _ in readme_commands())
    plan = console("plan", "--model", "tiny", "--gpus", "1", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert '"gpus": 1' in plan.stdout
    validate = console("validate", str(REPO / "configs" / "demo.yaml"), cwd=tmp_path)
    assert validate.returncode == 0 and '"name": "demo"' in validate.stdout, validate.stderr
    sample = console("sample", str(tmp_path / "sample"), "--pages", "3", cwd=tmp_path)
    assert sample.returncode == 0 and "sample: " in sample.stdout, sample.stderr
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ningest:\n  inputs: [{tmp_path / 'sample'}/*.warc.gz]\n")
    dry = console("run", str(config), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "ingest: RUN" in dry.stdout, dry.stdout + dry.stderr
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
