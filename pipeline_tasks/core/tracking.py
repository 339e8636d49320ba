"""MLflow tracking: one place that points MLflow at the profile's store (embedded: SQLite + local artifacts)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_tasks.core.settings import Settings, disable_telemetry, load_settings

log = logging.getLogger(__name__)

RETRIEVAL_EXPERIMENT = "recsys_retrieval"


def mlflow_experiment(name: str, settings: Settings | None = None) -> str:
    """Point MLflow at the settings' tracking store and return the id of experiment ``name`` (created once,
    with its artifacts under ``$RECSYS_HOME/mlflow/artifacts`` in the embedded profile)."""
    import mlflow

    settings = settings or load_settings()
    disable_telemetry()
    if settings.mlflow_tracking_uri.startswith("sqlite:///"):
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (settings.mlflow_dir / "artifacts").as_uri() if settings.profile == "embedded" else None
    return mlflow.create_experiment(name, artifact_location=artifacts)


@contextmanager
def mlflow_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
               tags: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Iterator[Any]:
    """Start (or, with ``run_id``, resume) an MLflow run in ``experiment``."""
    import mlflow

    experiment_id = mlflow_experiment(experiment, settings)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=run_name,
                          tags={k: str(v) for k, v in (tags or {}).items()} or None) as run:
        yield run


def log_flat(prefix: str, values: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of ``values`` as metrics ``<prefix><key>`` (``@`` becomes ``_at_``)."""
    import mlflow

    metrics = {f"{prefix}{k}".replace("@", "_at_"): float(v) for k, v in values.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and v == v}
    if metrics:
        mlflow.log_metrics(metrics, step=step)


def log_artifacts(paths: Mapping[str, str | Path]) -> None:
    """Log files or directories as artifacts, each under its key as the artifact path."""
    import mlflow

    for key, path in paths.items():
        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=key)
        elif p.exists():
            mlflow.log_artifact(str(p), artifact_path=key)
