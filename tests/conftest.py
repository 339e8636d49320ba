"""Shared fixtures: an isolated RECSYS_HOME per test session, telemetry off, the shared data paths."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ML100K = SHARED / "data" / "ml-100k"
BENCH = SHARED / "bench"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    """Before anything imports Airflow: an isolated RECSYS_HOME / AIRFLOW_HOME, telemetry off."""
    from pipeline_tasks.core.settings import airflow_env, load_settings

    # RECSYS_TEST_HOME reuses a home (with RECSYS_TEST_RUN, see tests/integration/conftest.py) when iterating
    # on tests locally; CI always gets a fresh one.
    reuse = os.environ.get("RECSYS_TEST_HOME")
    home = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="recsys-test-home-"))
    os.environ["RECSYS_HOME"] = str(home)
    for key in ("RECSYS_ARTIFACT_ROOT", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER"):
        os.environ.pop(key, None)
    os.environ.update(airflow_env(load_settings()))


@pytest.fixture(scope="session")
def recsys_home() -> Path:
    return Path(os.environ["RECSYS_HOME"])


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.fail(f"MovieLens 100K not found at {ML100K}: the tests read it from ../shared/data/ml-100k")
    return ML100K


@pytest.fixture(scope="session")
def bench_protocol() -> Any:
    """The independent implementation of the offline protocol in ../shared/bench/protocol.py."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import protocol

    return protocol
