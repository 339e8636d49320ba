"""`recsys ui` starts `airflow standalone` on the same AIRFLOW_HOME as `recsys run`: the DAG, its
graph, the runs made by `recsys run` and their task logs are served by its API (what the UI shows)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_ui_shows_the_dag_and_its_runs(ml100k_run):
    run = ml100k_run.run  # the session's finished run (every task ran)
    port = _free_port()
    env = {**os.environ, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
           "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline_tasks.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        runs = None
        while time.monotonic() < deadline:
            r = _get(f"{base}/api/v2/dags/recsys_training/dagRuns")
            if r is not None and r.status_code == 200 and r.json().get("dag_runs"):
                runs = r.json()["dag_runs"]
                break
            assert proc.poll() is None, "airflow standalone exited"
            time.sleep(3)
        assert runs, "the API server did not list recsys_training's runs in time"
        assert run.run_id in {r["dag_run_id"] for r in runs}
        dag = _get(f"{base}/api/v2/dags/recsys_training/details").json()
        assert "recsys" in [t["name"] if isinstance(t, dict) else t for t in dag["tags"]]
        assert "ingest" in dag["doc_md"]
        tasks = _get(f"{base}/api/v2/dags/recsys_training/tasks").json()["tasks"]
        graph = {t["task_id"]: set(t["downstream_task_ids"]) for t in tasks}
        assert graph["ingest"] == {"validate"} and graph["validate"] >= {"split"}
        page = _get(f"{base}/dags/recsys_training")
        assert page is not None and page.status_code == 200 and "<html" in page.text.lower()
        # The run's task logs: `recsys run` (airflow dags test) writes them where the API server reads them.
        logs = _get(f"{base}/api/v2/dags/recsys_training/dagRuns/{quote(run.run_id, safe='')}/taskInstances/"
                    "validate/logs/1")
        assert logs is not None and logs.status_code == 200, logs and logs.text[:500]
        events = [e.get("event", "") for e in logs.json()["content"]]
        assert any(e.startswith("validated ") for e in events), events[:20]  # the validate task's own line
        assert not any("Log file not found" in e for e in events)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
