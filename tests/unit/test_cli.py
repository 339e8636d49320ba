"""The `recsys` CLI: every command has --help; bad sources fail with a message saying what to do."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline_tasks.cli import app

runner = CliRunner()
COMMANDS = ["run", "refresh", "ui", "env", "generate", "validate", "split"]


def _click_commands() -> dict:
    import typer

    return typer.main.get_command(app).commands


def test_top_level_help_lists_every_command():
    assert sorted(_click_commands()) == sorted(COMMANDS), "a command was added or removed: update COMMANDS"
    res = runner.invoke(app, ["--help"], terminal_width=200)
    assert res.exit_code == 0
    for name, cmd in _click_commands().items():
        summary = (cmd.help or "").strip().splitlines()[0]
        assert summary, f"`recsys {name}` has no docstring"
        assert name in res.output and summary[:40] in res.output, f"`recsys --help` does not list {name}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    """Each command's help shows its summary and documents every option it takes."""
    res = runner.invoke(app, [cmd, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    command = _click_commands()[cmd]
    assert "Usage" in res.output and (command.help or "").strip().splitlines()[0][:40] in res.output
    for param in command.params:
        if param.param_type_name == "option":
            assert param.opts[0] in res.output, f"`recsys {cmd} --help` does not show {param.opts[0]}"
            assert param.help, f"`recsys {cmd}` option {param.opts[0]} has no help text"


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
