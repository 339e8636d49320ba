"""Drift on served traffic, for real: feedback logs written by the service's own log writer, the champion of the
session's ml-100k run as the reference, Evidently's PSI, and `recsys_served_drift` in `airflow dags test` (through
`recsys drift`), whose `trigger_training` queues a `recsys_training` run in the metadata database.

- served traffic that replays users of the champion's training data (their whole histories, so activity per
  user-day and the event mix are the reference's) is not flagged, and nothing is retrained even with `retrain` on;
- traffic like a live service's (clicks and purchases now, on the popular items it serves) is flagged, with the
  features that moved; with `retrain` on, the DAG queues a `recsys_training` run whose conf is the champion's
  source and settings plus the feedback log;
- too few events give no verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def _champion_training(ml100k_run) -> pd.DataFrame:
    from pipeline_tasks.online.bundle import load_bundle

    bundle = load_bundle(ml100k_run.registered["model"], version=int(ml100k_run.registered["version"]))
    return pd.read_parquet(Path(bundle.meta["accepted_dir"]) / "interactions.parquet")


def _log(root: Path, rows: pd.DataFrame) -> None:
    """Rows appended as a service appends /feedback events (the same writer)."""
    from pipeline_tasks.online.feedback_log import FeedbackLog

    log = FeedbackLog(root)
    try:
        records = [{"request_id": f"r{i}", "user_id": str(r.user_id), "item_id": str(r.item_id),
                    "event_type": r.event_type, "timestamp": pd.Timestamp(r.timestamp).isoformat(),
                    "device": None, "location": None, "model_version": 1, "variant": "champion"}
                   for i, r in enumerate(rows.itertuples())]
        for start in range(0, len(records), 1000):
            log.append("feedback", records[start:start + 1000])
    finally:
        log.close()


@pytest.fixture(scope="module")
def logs(ml100k_run, tmp_path_factory) -> dict[str, Path]:
    """Three feedback logs: a replay of training users, live-like served traffic, a handful of events."""
    train = _champion_training(ml100k_run)
    rng = np.random.default_rng(3)
    users = rng.choice(train["user_id"].unique(), size=200, replace=False)
    replay = train[train["user_id"].isin(users)]
    top = train["item_id"].value_counts().index[:300].to_numpy()
    now = datetime.now(UTC)
    n = 3000
    served = pd.DataFrame({"user_id": rng.choice(train["user_id"].unique(), n),
                           "item_id": rng.choice(top, n),
                           "event_type": rng.choice(["click", "purchase"], n, p=[0.8, 0.2]),
                           "timestamp": [now - timedelta(seconds=int(s)) for s in rng.integers(0, 3600, n)]})
    out = {}
    for name, rows in (("replay", replay), ("served", served), ("few", served.head(20))):
        out[name] = tmp_path_factory.mktemp(f"feedback-{name}")
        _log(out[name], rows)
    return out


def test_replayed_training_traffic_is_not_drift(ml100k_run, logs, tmp_path):
    from pipeline_tasks.evaluation.served_drift import ServedDriftConfig, served_drift

    model = ml100k_run.registered["model"]
    res = served_drift(model, tmp_path, ServedDriftConfig(retrain=True), log_dir=logs["replay"])
    assert res["status"] == "ok" and res["flagged"] == [], res["psi"]
    assert res["events"] == res["in_window"] > 5000 and res["champion_version"] == int(ml100k_run.registered["version"])
    assert "retrain_params" not in res
    assert max(res["psi"].values()) < 0.2 and {"event_type", "category", "hour", "user_activity"} <= set(res["psi"])
    assert Path(res["report_html"]).exists()
    assert json.loads((tmp_path / "served_drift.json").read_text())["status"] == "ok"


def test_live_traffic_drifts_and_asks_for_retraining(ml100k_run, logs, tmp_path):
    from pipeline_tasks.evaluation.served_drift import ServedDriftConfig, served_drift

    model = ml100k_run.registered["model"]
    res = served_drift(model, tmp_path, ServedDriftConfig(retrain=True), log_dir=logs["served"])
    assert res["status"] == "drift" and "event_type" in res["flagged"] and "item_popularity" in res["flagged"], res
    params = res["retrain_params"]
    assert params["feedback_log"] == str(logs["served"])
    assert params["source"] == ml100k_run.run.manifest["config"]["source"]
    assert not {"as_of", "t_val", "t_test"} & set(params)  # the retraining run's windows are resolved anew
    off = served_drift(model, tmp_path / "off", ServedDriftConfig(), log_dir=logs["served"])
    assert off["status"] == "drift" and "retrain_params" not in off  # retraining is off by default
    few = served_drift(model, tmp_path / "few", ServedDriftConfig(), log_dir=logs["few"])
    assert few["status"] == "too_few_events" and "min_events=200" in few["message"]
    old = served_drift(model, tmp_path / "old", ServedDriftConfig(window_days=1),
                       log_dir=logs["served"], now=datetime.now(UTC) + timedelta(days=3))
    assert old["status"] == "too_few_events" and old["in_window"] == 0  # the window is by log time


def test_dag_reports_drift_and_queues_a_training_run(ml100k_run, logs):
    """`recsys drift --retrain --no-run-triggered`: the DAG reports the drift and queues the training run (the CLI
    would otherwise run it in place, a whole training run, when no scheduler runs)."""
    from pipeline_tasks.core.settings import airflow_env, load_settings

    model = ml100k_run.registered["model"]
    env = {**os.environ, "RECSYS_FEEDBACK_DIR": str(logs["served"])}
    res = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", "drift", "--model", model, "--retrain",
                          "--no-run-triggered"], capture_output=True, text=True, env=env, timeout=600, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "served_drift" in out and f"{model} drift (" in out, out[-3000:]
    manifest = Path([line.split(":", 1)[1].strip() for line in res.stdout.splitlines()
                     if line.strip().startswith("manifest")][0])
    task = json.loads(manifest.read_text())["tasks"]["served_drift"]["outputs"]
    assert task["drifted"] == [model] and len(task["trigger"]) == 1
    report = Path(task["models"][model]["report_html"])
    assert report.exists() and "event_type" in report.read_text()
    assert "queued" in res.stdout and task["trigger"][0]["trigger_run_id"] in res.stdout

    # The metadata database holds the triggered run, queued, with the retraining conf.
    probe = ("import json, sys\nfrom airflow.models.dagrun import DagRun\nfrom airflow.utils.session import "
             "create_session\nwith create_session() as s:\n    dr = s.query(DagRun).filter(DagRun.run_id == sys.argv[1]"
             ").one()\n    print(json.dumps({'state': str(dr.state), 'conf': dr.conf, 'dag_id': dr.dag_id}))\n")
    found = subprocess.run([sys.executable, "-c", probe, task["trigger"][0]["trigger_run_id"]], capture_output=True,
                           text=True, env=airflow_env(load_settings(), env), timeout=120, check=False)
    assert found.returncode == 0, found.stderr[-3000:]
    run = json.loads(found.stdout.strip().splitlines()[-1])
    assert run["dag_id"] == "recsys_training" and run["state"] == "queued"
    assert run["conf"]["feedback_log"] == str(logs["served"]) and run["conf"]["source"]

    # Without --retrain the DAG reports and triggers nothing.
    quiet = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", "drift", "--model", model],
                           capture_output=True, text=True, env=env, timeout=600, check=False)
    assert quiet.returncode == 0 and "Retraining" not in quiet.stdout, quiet.stdout[-3000:]
    assert f"Served drift  : {model}: drift" in quiet.stdout and "drift_report.html" in quiet.stdout
