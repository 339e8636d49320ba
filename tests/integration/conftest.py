"""Integration fixtures: run the real CLI / Airflow in subprocesses against the session's RECSYS_HOME."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliRun:
    returncode: int
    output: str
    run_id: str | None
    manifest: dict | None

    @property
    def run_dir(self) -> Path:
        assert self.manifest, f"no manifest; output tail:\n{self.output[-3000:]}"
        return Path(self.manifest["run_dir"])


def recsys(*args: str, timeout: int = 900) -> CliRun:
    """Run ``recsys ARGS`` (the installed CLI module) and read back the run's manifest."""
    res = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ), check=False)
    output = res.stdout + res.stderr
    match = re.search(r"^Run id\s+: (\S+)$", res.stdout, flags=re.M)
    run_id = match.group(1) if match else None
    manifest = None
    m = re.search(r"^\s+manifest\s+: (\S+)$", res.stdout, flags=re.M)
    if m and Path(m.group(1)).exists():
        manifest = json.loads(Path(m.group(1)).read_text())
    return CliRun(res.returncode, output, run_id, manifest)


@pytest.fixture(scope="session")
def run_recsys():
    return recsys


@pytest.fixture(scope="session")
def spark():
    """One local[*] SparkSession shared by every Spark test (a JVM holds a single SparkContext)."""
    from pipeline_tasks.features.spark import get_spark

    # Test jobs are small and short: the JVM's quick (C1) JIT beats waiting for its optimising one.
    fast_jvm = {"spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -Duser.timezone=UTC"}
    session = get_spark(master="local[*]", app_name="recsys-tests", conf=fast_jvm)
    yield session
    session.stop()


# One full `recsys run` per test session, shared by every test that needs a finished run (CI-sized:
# one config per model, fewer bootstrap resamples). The README's quality tables come from the
# benchmark commands, not from this run.
# The serving fit (a third two-tower fit on every window) is off here: test_item_refresh's run trains and uses one.
CI_TWO_TOWER = {"grid": [{"logq": "sample"}], "mf_grid": [{"logq": "sample", "lr": 5e-3}], "n_boot": 200,
                "serving_fit": False}
CI_RANKER = {"n_trials": 2, "timeout_s": 60}


@dataclass
class FinishedRun:
    run: CliRun
    registered: dict  # the register task's outputs: model, version, gate, alias, bundle_dir


@pytest.fixture(scope="session")
def ml100k_run(ml100k: Path) -> FinishedRun:
    """`recsys run --data movielens:ml-100k`, every task, once per session (``RECSYS_TEST_RUN`` = a finished
    run's manifest.json, in ``RECSYS_TEST_HOME``, reuses that run instead: for iterating on tests locally)."""
    reuse = os.environ.get("RECSYS_TEST_RUN")
    if reuse:
        manifest = json.loads(Path(reuse).read_text())
        return FinishedRun(CliRun(0, "", manifest.get("run_id"), manifest), manifest["tasks"]["register"]["outputs"])
    run = recsys("run", "--data", f"movielens:{ml100k}", "--two-tower", json.dumps(CI_TWO_TOWER),
                 "--ranker", json.dumps(CI_RANKER), timeout=1500)
    assert run.returncode == 0, run.output[-4000:]
    return FinishedRun(run, run.manifest["tasks"]["register"]["outputs"])
