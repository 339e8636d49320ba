"""The `recsys` CLI: every command has --help; bad sources fail with a message saying what to do."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from pipeline_tasks.cli import app

runner = CliRunner()
COMMANDS = ["canary", "run", "refresh", "drift", "ui", "env", "generate", "validate", "split", "recommend", "serve",
            "snapshot", "models", "flag"]


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


# --- `recsys run` checks its params and source before Airflow starts --------------------------------------

@pytest.fixture
def no_airflow(monkeypatch, tmp_path):
    """An empty RECSYS_HOME, and `recsys run` may not reach `airflow dags test` (fail the test if it does)."""
    import pipeline_tasks.cli as cli

    home = tmp_path / "home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)

    def dags_test(*args, **kwargs):
        raise AssertionError("Airflow was started for a run that should have been refused")

    monkeypatch.setattr(cli, "_dags_test", dags_test)
    return home


def _bad_source(tmp_path, case: str):
    """A source with one thing wrong; returns (path given to --data, text the message must contain)."""
    d = tmp_path / case
    items = "item_id,title\n1,a\n"
    if case == "nonexistent":
        return d, "no such directory"
    d.mkdir()
    if case == "empty_dir":
        return d, "missing interactions.parquet (or .csv) and items.parquet (or .csv)"
    (d / "items.csv").write_text(items)
    if case == "missing_event_type":
        (d / "interactions.csv").write_text("user_id,item_id,timestamp\n1,1,2025-01-01T00:00:00+00:00\n")
        return d / "interactions.csv", "missing required column(s) event_type"
    if case == "garbage_bytes":
        (d / "interactions.csv").write_bytes(bytes(range(128, 256)) * 40)
        return d / "interactions.csv", "not UTF-8 text"
    (d / "interactions.csv").write_bytes(b"")  # zero_bytes
    return d / "interactions.csv", "the file is empty (0 bytes)"


BAD_SOURCES = ["nonexistent", "empty_dir", "missing_event_type", "garbage_bytes", "zero_bytes"]


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_run_refuses_a_bad_source_at_once_in_one_line(no_airflow, tmp_path, case):
    import time

    named, problem = _bad_source(tmp_path, case)
    source = tmp_path / case
    started = time.monotonic()
    res = runner.invoke(app, ["run", "--data", str(source)])
    assert time.monotonic() - started < 10
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert str(named) in lines[0] and problem in lines[0]
    assert "Traceback" not in res.output and "unknown data source" not in res.output
    assert not (no_airflow / "airflow").exists(), "the Airflow home was touched"


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_validate_refuses_a_bad_source_in_one_line(tmp_path, case):
    named, problem = _bad_source(tmp_path, case)
    res = runner.invoke(app, ["validate", str(tmp_path / case), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [res.output.strip()] and res.output.startswith("error: ")
    assert str(named) in res.output and problem in res.output


def test_a_bad_source_fails_the_dags_ingest_without_retry(tmp_path, monkeypatch):
    """The DAG's ingest resolves its config first: a bad source is a PermanentError there (no retry)."""
    from pipeline_tasks.core.errors import PermanentError
    from pipeline_tasks.stages.common import resolve_config

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    for case in BAD_SOURCES:
        named, problem = _bad_source(tmp_path, case)
        with pytest.raises(PermanentError, match=re.escape(problem)) as err:
            resolve_config({"source": str(tmp_path / case)})
        assert str(named) in str(err.value)


@pytest.mark.parametrize(("args", "message"), [
    (["--drift-mode", "banana"], "drift_mode='banana': use 'warn' or 'fail'"),
    (["--two-tower", '{"max_epochs": 3}'], "unknown two_tower params ['max_epochs']"),
    (["--two-tower", '{"grid": [{"lrr": 0.1}]}'], "unknown two-tower hyper-parameters ['lrr']"),
    (["--index", '{"kindd": "hnsw"}'], "unknown index params ['kindd']"),
    (["--index", '{"kind": "annoy"}'], "IndexConfig.kind='annoy'"),
    (["--drift-threshold", "-1"], "DriftConfig.threshold=-1.0"),
    (["--max-stub-share", "2"], "max_stub_share=2.0"),
    (["--as-of", "yesterday"], "as_of='yesterday' is not an ISO-8601 moment"),
    (["--t-val", "2025-03-01"], "give both t_val and t_test"),
    (["--days", "10", "--faults", "all"], "spike needs more than 28 days"),
])
def test_run_refuses_invalid_params_before_a_run(no_airflow, args, message):
    res = runner.invoke(app, ["run", *args])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"error: {res.output.strip().removeprefix('error: ')}"]
    assert message in res.output
    assert "Traceback" not in res.output and "manifest" not in res.output


# The `recsys run` option of each DAG param (and the value it must arrive with in the run's conf).
PARAM_OPTIONS = {
    "source": (["--data", "synthetic"], "synthetic"),
    "synthetic": (["--events", "3000", "--users", "40", "--items", "60", "--days", "40", "--faults", "none",
                   "--seed", "3"],
                  {"n_users": 40, "n_items": 60, "n_days": 40, "n_events": 3000, "faults": "none", "seed": 3}),
    "as_of": (["--as-of", "2025-03-01T00:00:00+00:00"], "2025-03-01T00:00:00+00:00"),
    "t_val": (["--t-val", "2025-02-01"], "2025-02-01"),
    "t_test": (["--t-test", "2025-02-15"], "2025-02-15"),
    "quality_threshold": (["--quality-threshold", "0.9"], 0.9),
    "max_stub_share": (["--max-stub-share", "0.2"], 0.2),
    "horizon_days": (["--horizon-days", "900"], 900),
    "bot_events_per_day": (["--bot-events-per-day", "500"], 500),
    "drift_mode": (["--drift-mode", "fail"], "fail"),
    "drift_threshold": (["--drift-threshold", "0.3"], 0.3),
    "two_tower": (["--two-tower", '{"n_boot": 10}'], {"n_boot": 10}),
    "index": (["--index", '{"kind": "flat"}'], {"kind": "flat"}),
    "candidates": (["--candidates", '{"pool_size": 100}'], {"pool_size": 100}),
    "ranker": (["--ranker", '{"n_trials": 3}'], {"n_trials": 3}),
    "gate": (["--gate", '{"tolerance": 0.02}'], {"tolerance": 0.02}),
    "feedback_log": (["--feedback-log", "/tmp"], "/tmp"),
}


def test_run_has_an_option_for_every_dag_param(monkeypatch, tmp_path):
    import pipeline_tasks.cli as cli
    from pipeline_tasks.core.constants import DEFAULT_PARAMS

    assert set(PARAM_OPTIONS) == set(DEFAULT_PARAMS), "a DAG param has no `recsys run` option (or one was removed)"
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    seen = {}

    def dags_test(dag_id, conf, extra, settings, full_log, verbose):
        seen.update(conf)
        return 0, None, []

    monkeypatch.setattr(cli, "_dags_test", dags_test)
    args = [a for opts, _ in PARAM_OPTIONS.values() for a in opts]
    res = runner.invoke(app, ["run", *args])
    assert res.exit_code == 0, res.output
    assert seen == {key: value for key, (_, value) in PARAM_OPTIONS.items()}


def test_max_stub_share_reaches_the_validate_stage(monkeypatch, tmp_path):
    """Param, then RECSYS_MAX_STUB_SHARE, then the default, into the ValidationConfig the validate task uses."""
    from pipeline_tasks.core.constants import DEFAULT_MAX_STUB_SHARE
    from pipeline_tasks.stages.common import resolve_config, validation_config

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.delenv("RECSYS_MAX_STUB_SHARE", raising=False)
    assert validation_config(resolve_config({})).max_stub_share == DEFAULT_MAX_STUB_SHARE
    monkeypatch.setenv("RECSYS_MAX_STUB_SHARE", "0.3")
    assert validation_config(resolve_config({})).max_stub_share == 0.3
    assert validation_config(resolve_config({"max_stub_share": 0.1})).max_stub_share == 0.1


# --- relative paths -----------------------------------------------------------------------------------------

def test_every_path_argument_accepts_relative_paths(monkeypatch, tmp_path):
    """As the README's walk-through types them: `recsys validate DIR OUT` etc. from the current directory."""
    import pipeline_tasks.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_HOME", "home")
    res = runner.invoke(app, ["generate", "src", "--users", "40", "--items", "60", "--days", "40",
                              "--events", "2000"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", "src", "val"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "val" / "report.json").exists() and (tmp_path / "val" / "data_docs" / "index.html").exists()
    res = runner.invoke(app, ["split", "val/accepted", "split"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "split" / "split.json").exists()
    # `run --data DIR`, `run --data movielens:DIR` and `refresh --source DIR` hand Airflow absolute paths
    confs = []
    monkeypatch.setattr(cli, "_dags_test", lambda dag_id, conf, *a: (confs.append(conf), (0, None, []))[1])
    assert runner.invoke(app, ["run", "--data", "src"]).exit_code == 0
    assert runner.invoke(app, ["refresh", "--source", "src"]).exit_code == 0
    assert confs[0]["source"] == confs[1]["source"] == str(tmp_path / "src")
    ml = tmp_path / "ml"
    ml.mkdir()
    for name in ("u.item", "u.genre", "u.user"):
        (ml / name).write_text("")
    (ml / "u.data").write_text("1\t2\t5\t881250949\n")
    res = runner.invoke(app, ["run", "--data", "movielens:ml"])
    assert res.exit_code == 0, res.output
    assert confs[2]["source"] == f"movielens:{ml}"


def _registered(tmp_path, monkeypatch, alias: str) -> tuple[object, str]:
    """A run whose register task registered version 2 of recsys_x with ``alias`` (its manifest, as register writes
    it), on a fresh RECSYS_HOME."""
    import json

    from pipeline_tasks.core.runs import MANIFEST, run_dir
    from pipeline_tasks.core.settings import load_settings

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    settings = load_settings()
    run_id = "manual__2026-12-01T00:00:00+00:00"
    root = run_dir(run_id, settings)
    root.mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps({"tasks": {"register": {"status": "success", "outputs": {
        "model": "recsys_x", "version": 2, "alias": alias, "gate": "passed"}}}}))
    return settings, run_id


def test_run_starts_the_canary_walk_when_a_challenger_is_registered_and_the_router_runs(tmp_path, monkeypatch,
                                                                                        capsys):
    """`recsys run` after register: a challenger with a live router starts `recsys canary start` detached; without
    a router it says how to start one; a new champion (first model) starts nothing."""
    import json
    import os

    import pipeline_tasks.cli as cli
    from pipeline_tasks.bundle.canary import canary_dir

    started: list[list[str]] = []

    class Spawn:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)
            assert kwargs["start_new_session"] and kwargs["stdin"] is not None  # detached from the run's terminal

    monkeypatch.setattr(cli.subprocess, "Popen", Spawn)
    settings, run_id = _registered(tmp_path, monkeypatch, "challenger")
    cli._start_canary(run_id, settings)
    assert not started and "recsys canary start --model recsys_x" in capsys.readouterr().out  # no router

    router = canary_dir("recsys_x", settings) / "router.json"
    router.parent.mkdir(parents=True)
    router.write_text(json.dumps({"pid": os.getpid(), "port": 1, "role": "router"}))  # a live process
    cli._start_canary(run_id, settings)
    assert started == [[cli.sys.executable, "-m", "pipeline_tasks.cli", "canary", "start", "--model", "recsys_x",
                        "--challenger-version", "2"]]
    assert "is walking 5 -> 25 -> 50 -> 100 %" in capsys.readouterr().out

    started.clear()
    settings, run_id = _registered(tmp_path / "b", monkeypatch, "champion")
    cli._start_canary(run_id, settings)
    assert not started and capsys.readouterr().out == ""


def test_drift_refuses_bad_params_before_airflow_starts():
    res = runner.invoke(app, ["drift", "--features", "event_type,colour"])
    assert res.exit_code == 2 and "colour" in res.output
    res = runner.invoke(app, ["drift", "--window-days", "0"])
    assert res.exit_code == 2 and "window_days" in res.output
