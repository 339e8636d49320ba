"""The `recsys` CLI: every command has --help; bad sources fail with a message saying what to do."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline_tasks.cli import app

runner = CliRunner()
COMMANDS = ["run", "ui", "env", "generate", "validate", "split"]


def test_top_level_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and len(res.output) > 100


def test_env_prints_airflow_home_under_recsys_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    res = runner.invoke(app, ["env"])
    assert res.exit_code == 0
    assert f'export AIRFLOW_HOME="{tmp_path / "airflow"}"' in res.output


def test_generate_validate_split_by_hand(tmp_path):
    res = runner.invoke(app, ["generate", str(tmp_path / "src"), "--users", "50", "--items", "80", "--days", "40",
                              "--events", "3000", "--faults", "all"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(tmp_path / "src"), str(tmp_path / "val"),
                              "--quality-threshold", "0.5"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "val" / "quarantine" / "interactions.parquet").exists()
    res = runner.invoke(app, ["split", str(tmp_path / "val" / "accepted"), str(tmp_path / "split")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "split" / "split.json").exists()


def test_validate_gate_failure_exits_1_with_reasons(tmp_path):
    runner.invoke(app, ["generate", str(tmp_path / "src"), "--users", "50", "--items", "80", "--days", "40",
                        "--events", "2000", "--faults", "0.05"])
    res = runner.invoke(app, ["validate", str(tmp_path / "src"), str(tmp_path / "val")])
    assert res.exit_code == 1
    assert "Data quality gate failed" in res.output and "Top reasons" in res.output


def test_generate_bad_config_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["generate", str(tmp_path / "src"), "--days", "10", "--faults", "all"])
    assert res.exit_code == 2
    assert "spike needs more than 28 days" in res.output
