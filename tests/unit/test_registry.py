"""The registry gate and aliases against a real MLflow store (SQLite under a temporary RECSYS_HOME)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline_tasks.bundle.registry import (
    GateConfig,
    GateDecision,
    PromotionRefusedError,
    decide,
    list_versions,
    promote,
    register_version,
    version_of_run,
)
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.bundle import BUNDLE_FILE, aliases_of, load_bundle

NAME = "recsys_test_ns"


def _report(ndcg: float, pool: float, pop_ndcg: float = 0.1, pop_pool: float = 0.5, champion=None) -> dict:
    return {"pool_size": 500, "champion": champion,
            "rows": {"two-stage": {"ndcg@10": ndcg}, "merged pool": {"recall@500": pool},
                     "popularity": {"ndcg@10": pop_ndcg, "recall@500": pop_pool}}}


def _paired(ndcg: float, pool: float, version: int = 1) -> dict:
    return {"version": version, "paired": {"ndcg@10": {"difference": ndcg, "ci95": [ndcg - 0.02, ndcg + 0.02]},
                                           "pool_recall": {"difference": pool, "ci95": [pool - 0.02, pool + 0.02]}}}


def test_decide_first_model_must_beat_popularity():
    ok = decide(_report(0.2, 0.7), GateConfig())
    assert ok.passed and ok.alias == "champion"
    bad = decide(_report(0.2, 0.4), GateConfig())
    assert not bad.passed and bad.alias is None and "pool_recall" in bad.reason and "-0.1000" in bad.reason


def test_decide_against_champion_with_tolerance():
    cfg = GateConfig(tolerance=0.01)
    assert decide(_report(0.2, 0.7, champion=_paired(-0.005, 0.0)), cfg).alias == "challenger"
    worse = decide(_report(0.2, 0.7, champion=_paired(-0.05, 0.01)), cfg)
    assert not worse.passed and "ndcg@10 trails the champion (version 1) by 0.0500" in worse.reason
    invalid = decide(_report(0.2, 0.7, champion={"version": 1, "invalid": "champion tested later"}), cfg)
    assert not invalid.passed and invalid.reason == "champion tested later"
    with pytest.raises(InvalidParamsError):
        GateConfig.from_params({"tolerance": -1})
    with pytest.raises(InvalidParamsError, match="unknown gate params"):
        GateConfig.from_params({"metric": ["x"]})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    return tmp_path


def _bundle(tmp_path, n: int) -> str:
    d = tmp_path / f"bundle{n}"
    d.mkdir()
    (d / BUNDLE_FILE).write_text(json.dumps({"run_id": f"run{n}", "t_test": "2025-01-01T00:00:00+00:00"}))
    return d.as_uri()


def test_aliases_move_only_on_a_passing_gate_and_promote_refuses_failed(home):
    first = register_version(NAME, _bundle(home, 1), "", {"recsys.run_id": "run1"},
                             GateDecision(True, "champion", "first model", {}))
    assert aliases_of(NAME) == {"champion": first}
    # A deliberately worse challenger: registered for the record, aliases untouched.
    worse = register_version(NAME, _bundle(home, 2), "", {"recsys.run_id": "run2"},
                             GateDecision(False, None, "ndcg@10 trails the champion by 0.05", {}))
    assert aliases_of(NAME) == {"champion": first}
    assert load_bundle(NAME).version == first  # what serving loads is unchanged
    with pytest.raises(PromotionRefusedError, match="gate failed.*trails the champion"):
        promote(NAME, worse)
    assert aliases_of(NAME) == {"champion": first}
    good = register_version(NAME, _bundle(home, 3), "", {"recsys.run_id": "run3"},
                            GateDecision(True, "challenger", "within tolerance", {}))
    assert aliases_of(NAME) == {"champion": first, "challenger": good}
    promote(NAME, good)
    assert aliases_of(NAME) == {"champion": good}  # the challenger became champion
    assert load_bundle(NAME).meta["run_id"] == "run3"
    assert version_of_run(NAME, "run2") == worse and version_of_run(NAME, "nope") is None  # retries find it
    rows = {r["version"]: r for r in list_versions(NAME)}
    assert rows[worse]["gate"] == "failed" and rows[good]["aliases"] == ["champion"]
    with pytest.raises(PromotionRefusedError, match="no version 99"):
        promote(NAME, 99)


def test_models_cli_lists_and_refuses(home):
    from pipeline_tasks.cli import app

    register_version(NAME, _bundle(home, 1), "", {"recsys.run_id": "run1"}, GateDecision(True, "champion", "ok", {}))
    register_version(NAME, _bundle(home, 2), "", {"recsys.run_id": "run2"},
                     GateDecision(False, None, "pool_recall trails the champion by 0.2", {}))
    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0, listed.output
    assert "v1" in listed.output and "champion" in listed.output and "gate=failed" in listed.output
    assert "pool_recall trails the champion by 0.2" in listed.output
    refused = runner.invoke(app, ["models", "promote", "2"])
    assert refused.exit_code == 1 and "gate failed" in refused.output


def test_drift_reference_is_the_champions_training_data(home):
    from pipeline_tasks.core.settings import load_settings
    from pipeline_tasks.stages.evaluation import champion_reference

    settings = load_settings()
    assert champion_reference("test_ns", settings) == (None, None)  # no champion: the run's training window
    accepted = home / "accepted"
    accepted.mkdir()
    (accepted / "interactions.parquet").write_bytes(b"")
    d = home / "bundle_c"
    d.mkdir()
    (d / BUNDLE_FILE).write_text(json.dumps({"accepted_dir": str(accepted), "as_of": "2025-02-01T00:00:00+00:00"}))
    register_version(NAME, d.as_uri(), "", {}, GateDecision(True, "champion", "ok", {}))
    assert champion_reference("test_ns", settings) == (accepted / "interactions.parquet",
                                                       "2025-02-01T00:00:00+00:00")
