"""Fixtures shared by unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def mlflow_home(tmp_path, monkeypatch):
    """A ``RECSYS_HOME`` and an MLflow file store under ``tmp_path`` (MLflow 3 keeps the file store for opt-in use)."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path
