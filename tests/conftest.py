"""Shared fixtures: an isolated RECSYS_HOME per test session, telemetry off, the shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ML100K = SHARED / "data" / "ml-100k"
BENCH = SHARED / "bench"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session gets its own RECSYS_HOME (Airflow home, runs) and no telemetry."""
    from pipeline_tasks.settings import disable_telemetry

    home = tmp_path_factory.mktemp("recsys_home")
    os.environ["RECSYS_HOME"] = str(home)
    os.environ.pop("RECSYS_ARTIFACT_ROOT", None)
    os.environ.pop("AIRFLOW_HOME", None)
    disable_telemetry()
    return home


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.fail(f"MovieLens 100K not found at {ML100K}: the tests read it from ../shared/data/ml-100k")
    return ML100K
