"""MLflow tracking against a real SQLite store: a retried task resumes its run instead of opening a second one."""

from __future__ import annotations

from pathlib import Path

from pipeline_tasks.core.settings import load_settings
from pipeline_tasks.core.tracking import find_run, mlflow_run


def test_a_retry_resumes_the_run_of_the_earlier_try(tmp_path: Path) -> None:
    import mlflow

    settings = load_settings({"RECSYS_HOME": str(tmp_path)})
    tags = {"recsys.run_id": "manual__1", "recsys.task": "train_two_tower", "recsys.source": "synthetic"}
    with mlflow_run("exp_retry", run_name="try 1", tags=tags, settings=settings,
                    resume_by=("recsys.run_id", "recsys.task")) as first:
        mlflow.log_param("lr", 0.001)
    with mlflow_run("exp_retry", run_name="try 2", tags=tags, settings=settings,
                    resume_by=("recsys.run_id", "recsys.task")) as second:
        mlflow.log_metric("loss", 1.0)
    assert second.info.run_id == first.info.run_id
    other = {**tags, "recsys.run_id": "manual__2"}
    with mlflow_run("exp_retry", tags=other, settings=settings, resume_by=("recsys.run_id", "recsys.task")) as third:
        pass
    assert third.info.run_id != first.info.run_id
    assert find_run("exp_retry", {"recsys.run_id": "manual__1"}, settings) == first.info.run_id
    assert find_run("exp_retry", {"recsys.run_id": "nope"}, settings) is None
    runs = mlflow.search_runs(experiment_names=["exp_retry"], output_format="list")
    assert len(runs) == 2
