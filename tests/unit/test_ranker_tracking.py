"""What the tune_ranker and train_ranker tasks leave in MLflow: best params, the study's plots (HTML) and the
feature importance, in a real MLflow store (file store under tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_two_stage as tiny

from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS, QUERY_ID
from pipeline_tasks.ranking.dataset import LABEL


def _ranking_set(path, seed: int) -> str:
    """40 queries of 20 rows whose grade follows the first feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(800, len(FEATURE_COLUMNS))).astype(np.float32)
    df = pd.DataFrame(x, columns=FEATURE_COLUMNS)
    df.insert(0, QUERY_ID, np.repeat([f"q{i:02d}" for i in range(40)], 20))
    df.insert(1, LABEL, np.digitize(x[:, 0], [0.5, 1.5]).astype(np.int8))
    df.to_parquet(path)
    return str(path)


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_study_plots_and_feature_importance_go_to_mlflow(mlflow_home):
    import mlflow

    from pipeline_tasks.core.runs import run_dir, update_manifest
    from pipeline_tasks.stages.ranking import train_ranker_stage, tune_ranker_stage

    run_id = "manual__tracking"
    update_manifest(run_dir(run_id), config={"namespace": "track_ns", "ranker": {
        "n_trials": 2, "max_rounds": 20, "early_stopping_rounds": 5, "num_threads": 1, "cv_below_rows": 0}})
    sets = {"validation": {"path": _ranking_set(mlflow_home / "validation.parquet", 0)},
            "test": {"path": _ranking_set(mlflow_home / "test.parquet", 1)}}
    tuned = tune_ranker_stage(run_id, sets)
    assert tuned["n_trials"] == 2

    client = mlflow.MlflowClient()
    tune_run = client.get_run(tuned["mlflow_run_id"])
    assert tune_run.info.experiment_id == client.get_experiment_by_name("recsys_ranker_track_ns").experiment_id
    assert {f"best.{k}" for k in tuned["best_params"]} <= set(tune_run.data.params)
    assert tune_run.data.metrics["study.best_holdout_ndcg_at_10"] == pytest.approx(tuned["best_value"])
    logged = _artifacts(client, tuned["mlflow_run_id"])
    assert {"study/plots/optimization_history.html", "study/plots/param_importances.html",
            "study/trials.csv"} <= set(logged)
    local = mlflow.artifacts.download_artifacts(run_id=tuned["mlflow_run_id"],
                                                artifact_path="study/plots/optimization_history.html")
    assert "plotly" in Path(local).read_text(encoding="utf-8").lower()

    history = tiny.history()
    fits = {}
    for name in ("protocol", "serving"):
        fits[name] = str(tiny.fit(history).save(mlflow_home / "fits" / name, {"fit": name}))
    trained = train_ranker_stage(run_id, {"fits": fits}, sets, tuned)
    logged = _artifacts(client, trained["mlflow_run_id"])
    assert logged == ["feature_importance/protocol_feature_importance.csv"]
    importance = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=trained["mlflow_run_id"],
                                                                 artifact_path=logged[0]))
    assert sorted(importance["feature"]) == sorted(FEATURE_COLUMNS)
    assert importance["gain"].is_monotonic_decreasing  # by gain
    assert importance.iloc[0]["feature"] == FEATURE_COLUMNS[0]  # the feature the grades follow
