"""MLflow tracking: one place that points MLflow at the profile's store (embedded: SQLite + local artifacts)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_tasks.core.settings import Settings, disable_telemetry, load_settings

log = logging.getLogger(__name__)

RETRIEVAL_EXPERIMENT = "recsys_retrieval"  # + the source's namespace: one experiment per data source


def retrieval_experiment(namespace: str) -> str:
    """The MLflow experiment of a source's retrieval runs (``recsys_retrieval_<namespace>``)."""
    return f"{RETRIEVAL_EXPERIMENT}_{namespace}"


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


def find_run(experiment: str, tags: Mapping[str, Any], settings: Settings | None = None) -> str | None:
    """The id of the newest run in ``experiment`` carrying all of ``tags`` (``None`` if there is none)."""
    import mlflow

    experiment_id = mlflow_experiment(experiment, settings)
    query = " and ".join(f"tags.`{k}` = '{str(v)}'" for k, v in tags.items())
    runs = mlflow.search_runs([experiment_id], filter_string=query, order_by=["start_time DESC"], max_results=1,
                              output_format="list")
    return runs[0].info.run_id if runs else None


@contextmanager
def mlflow_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
               tags: Mapping[str, Any] | None = None, settings: Settings | None = None,
               resume_by: tuple[str, ...] = ()) -> Iterator[Any]:
    """Start (or, with ``run_id``, resume) an MLflow run in ``experiment``.

    ``resume_by`` names tags that identify the run (e.g. the DAG run id and task): a retried task whose
    earlier try opened a run with the same values resumes that run instead of opening a second one.
    """
    import mlflow

    experiment_id = mlflow_experiment(experiment, settings)
    if run_id is None and resume_by:
        run_id = find_run(experiment, {k: (tags or {})[k] for k in resume_by}, settings)
        if run_id:
            log.info("resuming MLflow run %s of an earlier try", run_id)
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


def log_params_once(params: Mapping[str, Any]) -> None:
    """Log params; a re-run of the same task that found other values (MLflow params are write-once) records them
    as ``rerun.<key>`` tags instead, with a warning, rather than failing the task."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_params(dict(params))
    except MlflowException as exc:
        log.warning("params differ from an earlier try of this task (kept as rerun.* tags): %s", exc)
        mlflow.set_tags({f"rerun.{k}": str(v) for k, v in params.items()})
