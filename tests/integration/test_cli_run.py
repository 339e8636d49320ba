"""`recsys run` for real, twice at once on a fresh RECSYS_HOME: a quiet console with a line per task, the full
log in a file, task logs where the Airflow UI reads them, and one run at a time (refused, or queued with --wait)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LATER_TASKS = ("build_features|feast_apply|materialize|training_set|drift_check|train_two_tower|build_index|"
               "candidates|ranking_set|tune_ranker|train_ranker|evaluate|register|build_bento")


def _start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline_tasks.cli", "run", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_quiet_run_with_task_logs_and_one_run_at_a_time(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["RECSYS_HOME"] = str(home)
    first = _start(env, "--data", "synthetic", "--events", "5000", "--faults", "none", "--mark-success", LATER_TASKS)
    lock = home / "run.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert time.monotonic() < deadline and first.poll() is None, "the first run never took the run lock"
        time.sleep(0.2)
    # A second run while the first runs: refused at once, naming the first and what to do.
    second = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", "run", "--events", "5000"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 3, second.stdout + second.stderr
    assert f"another `recsys run` is running on {home}: pid {first.pid}" in second.stderr
    assert "data synthetic" in second.stderr and "--wait" in second.stderr
    # A third with --wait is queued: it starts when the first has ended.
    third = _start(env, "--wait", "--events", "5000", "--faults", "none", "--mark-success", ".*")
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-4000:]
    queued, _ = third.communicate(timeout=300)
    assert third.returncode == 0, queued[-4000:]
    assert f"Waiting for the running `recsys run` to end (pid {first.pid}" in queued

    # Quiet: a line per task with its figures, then the summary; the full log has all of Airflow's output.
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert "Skipping registering function" not in out and '"level"' not in out
    assert re.search(r"^  ingest +success +\d+\.\d s  5,008 interactions, 2,000 items, 1,000 users$", out, re.M)
    assert re.search(r"^  validate +success +\d+\.\d s  5,008 input = 5,008 accepted \+ 0 quarantined", out, re.M)
    assert re.search(r"^  build_index +marked success", out, re.M)
    full_log = Path(re.search(r"^Full log +: (\S+)", out, re.M).group(1))
    assert full_log.parent == home / "logs"
    text = full_log.read_text()
    assert len(text.splitlines()) > 5 * len(lines) and "[DAG TEST] starting task_id=validate" in text
    manifest = json.loads(Path(re.search(r"^\s+manifest\s+: (\S+)$", out, re.M).group(1)).read_text())
    run_id = re.search(r"^Run id +: (\S+)$", out, re.M).group(1)
    assert f"data source   : synthetic (namespace {manifest['config']['namespace']})" in out
    # The task's log is where the API server reads it, in the UI's format (JSON lines).
    task_log = (home / "airflow" / "logs" / "dag_id=recsys_training" / f"run_id={run_id}" / "task_id=validate"
                / "attempt=1.log")
    events = [json.loads(line) for line in task_log.read_text().splitlines()]
    assert any(e["event"].startswith("validated ") and e.get("logger") == "pipeline_tasks.data.validate"
               for e in events)
    # The queued run started only after the first had finished its tasks.
    started = datetime.fromisoformat(re.search(r"logical date (\S+)\)", queued).group(1))
    assert started > datetime.fromisoformat(manifest["updated_at"])
