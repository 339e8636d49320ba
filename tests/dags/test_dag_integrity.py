"""Every DAG imports through a DagBag, has no cycle, and follows the project's policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
HEAVY = ("torch", "pyspark", "great_expectations", "faiss", "mlflow", "feast", "evidently", "lightgbm",
         "optuna", "bentoml", "pandas")


@pytest.fixture(scope="module")
def dagbag():
    """As Airflow 3's DAG processor and task runner parse: the DAGs folder (bundle) on sys.path."""
    from airflow.dag_processing.dagbag import DagBag

    sys.path.insert(0, str(DAGS))
    try:
        yield DagBag(dag_folder=str(DAGS))
    finally:
        sys.path.remove(str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, f"DAG import errors: {dagbag.import_errors}"
    assert {"recsys_training", "recsys_item_refresh"} <= set(dagbag.dag_ids)


def test_policy_tags_retries_docs(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "recsys" in dag.tags, f"{dag_id}: needs the 'recsys' tag"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id}: needs doc_md"
        assert dag.catchup is False and dag.max_active_runs == 1, f"{dag_id}: catchup=False, max_active_runs=1"
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag_id}.{task.task_id}: retries >= 2 for transient failures"
            assert task.doc_md, f"{dag_id}.{task.task_id}: needs doc_md for the UI"
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id}: needs an execution_timeout"
            if task.task_type == "TriggerDagRunOperator":  # Airflow's operator: no body of ours to wrap
                continue
            assert getattr(task.python_callable, "recsys_fail_fast", False), (
                f"{dag_id}.{task.task_id}: wrap the body in @fail_fast so permanent errors are not retried")


def test_permanent_errors_fail_at_once_and_others_stay_retryable():
    """The one mapping: PermanentError (and subclasses) -> AirflowFailException; other errors pass through."""
    sys.path.insert(0, str(DAGS))
    try:
        from airflow.sdk.exceptions import AirflowFailException
        from recsys_common import fail_fast

        from pipeline_tasks.core.errors import InvalidParamsError
        from pipeline_tasks.data.contract import ContractError
        from pipeline_tasks.data.validate import DataQualityError
        from pipeline_tasks.evaluation.drift import DriftError
        from pipeline_tasks.features.snapshots import FeatureInputError
        from pipeline_tasks.online.index import IndexChecksumError
    finally:
        sys.path.remove(str(DAGS))
    for error in (ContractError, DataQualityError, DriftError, FeatureInputError, IndexChecksumError,
                  InvalidParamsError):
        def boom(error=error):
            raise error("bad input")

        with pytest.raises(AirflowFailException, match=f"{error.__name__}: bad input"):
            fail_fast(boom)()
    for transient in (TimeoutError, OSError, RuntimeError):
        def flaky(error=transient):
            raise error("try again")

        with pytest.raises(transient):
            fail_fast(flaky)()


def test_no_cycles_and_training_graph(dagbag):
    dag = dagbag.dags["recsys_training"]
    order = [t.task_id for t in dag.topological_sort()]  # raises on a cycle
    assert order[:3] == ["ingest", "validate", "split"]
    upstream = {t.task_id: t.upstream_task_ids for t in dag.tasks}
    assert upstream == {
        "ingest": set(),
        "validate": {"ingest"},
        "split": {"validate"},
        "build_features": {"validate", "split"},
        "feast_apply": {"build_features"},
        "materialize": {"build_features", "feast_apply"},
        "training_set": {"split", "materialize"},
        "drift_check": {"validate", "split", "build_features", "materialize"},
        "train_two_tower": {"validate", "split", "training_set", "drift_check"},  # drift before any training
        "build_index": {"train_two_tower", "build_features"},
        "candidates": {"validate", "split", "train_two_tower"},
        "ranking_set": {"candidates"},
        "tune_ranker": {"ranking_set"},
        "train_ranker": {"candidates", "ranking_set", "tune_ranker"},
        "evaluate": {"candidates", "train_ranker"},
        "register": {"candidates", "train_ranker", "build_index", "evaluate"},
        "build_bento": {"register"},
    }
    # Task groups draw the lifecycle stages in the UI without changing the task ids above.
    groups = {t.task_id: t.task_group.group_id for t in dag.tasks}
    assert groups["ingest"] == "data" and groups["train_two_tower"] == "retrieval"
    assert groups["tune_ranker"] == "ranking" and groups["register"] == "release"
    assert groups["build_bento"] == "release"


def test_item_refresh_dag(dagbag):
    dag = dagbag.dags["recsys_item_refresh"]
    assert [t.task_id for t in dag.tasks] == ["refresh_items", "publish_snapshots"]
    publish = dag.get_task("publish_snapshots")
    assert publish.upstream_task_ids == {"refresh_items"} and publish.trigger_rule == "all_done"
    assert dag.schedule == "@hourly", dag.schedule
    assert dag.params.get_param("source").description


def test_canary_dag_walks_steps_and_branches_to_rollback(dagbag):
    dag = dagbag.dags["recsys_canary"]
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["recsys_challenger"]  # scheduled by it
    for i in (1, 2, 3):
        assert dag.get_task(f"wait_{i}").mode == "reschedule"  # no worker slot held while the sample comes in
        assert dag.get_task(f"analyse_{i}").downstream_task_ids == (
            {f"rollback_{i}", f"set_share_{i + 1}"} if i < 3 else {"rollback_3", "promote"})
    assert dag.get_task("report").upstream_task_ids >= {"promote", "rollback_1", "rollback_2", "rollback_3"}
    training = dagbag.dags["recsys_training"]
    assert [o.name for o in training.get_task("register").outlets] == ["recsys_challenger"]


def test_served_drift_dag_triggers_training_per_drifted_model(dagbag):
    dag = dagbag.dags["recsys_served_drift"]
    assert dag.schedule == "@daily", dag.schedule
    trigger = dag.get_task("trigger_training")
    assert trigger.upstream_task_ids == {"served_drift"}
    assert trigger.partial_kwargs["trigger_dag_id"] == "recsys_training"  # mapped: one run per drifted model
    assert dag.params["retrain"] is False and dag.params["threshold"] == 0.2  # retraining is off by default
    for key in dag.params:
        assert dag.params.get_param(key).description, f"param {key} needs a description"


def test_params_have_descriptions(dagbag):
    """The DAG's params are exactly the run params the pipeline resolves (DEFAULT_PARAMS), each documented."""
    from pipeline_tasks.core.constants import DEFAULT_PARAMS

    params = dagbag.dags["recsys_training"].params
    assert set(params) == set(DEFAULT_PARAMS)
    assert {"source", "synthetic", "as_of", "t_val", "t_test", "quality_threshold", "max_stub_share", "horizon_days",
            "bot_events_per_day", "drift_mode", "drift_threshold", "two_tower", "index", "candidates", "ranker",
            "gate"} <= set(params)
    for key in params:
        assert params.get_param(key).description, f"param {key} needs a description"
    # the gate's stub limit is a share: the UI refuses values outside [0, 1], null means the default
    schema = params.get_param("max_stub_share").schema
    assert schema["minimum"] == 0 and schema["maximum"] == 1 and "null" in schema["type"]


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS.glob("*.py")))  # recsys_common.py too
def test_parsing_does_no_heavy_work(dag_file):
    """Parsing a DAG file imports no ML/data library (they load inside task bodies)."""
    code = (
        "import os, runpy, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); runpy.run_path(sys.argv[1]); "
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(DAGS / dag_file)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HEAVY:", f"{dag_file} imports at parse time: {res.stdout}"
