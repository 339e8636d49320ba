"""Typed settings: defaults in code, overrides from the environment (``RECSYS_*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline_tasks.core.constants import (
    DEFAULT_BOT_EVENTS_PER_DAY,
    DEFAULT_HORIZON_DAYS,
    DEFAULT_MAX_STUB_SHARE,
    DEFAULT_QUALITY_THRESHOLD,
    EVENT_TYPES,
)


@dataclass(frozen=True)
class Settings:
    """Where things live and which profile runs.

    ``home`` holds long-lived state (Airflow home, Feast store, MLflow store);
    ``artifact_root`` holds one directory per DAG run.
    """

    home: Path
    artifact_root: Path
    profile: str = "embedded"
    spark_master: str = "local[*]"
    event_types: tuple[str, ...] = EVENT_TYPES
    horizon_days: int = DEFAULT_HORIZON_DAYS
    bot_events_per_day: int = DEFAULT_BOT_EVENTS_PER_DAY
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    max_stub_share: float = DEFAULT_MAX_STUB_SHARE
    # The data source's identity (``pipeline_tasks.core.namespace``): its own feature store and MLflow
    # experiment, so two sources in one home never mix. Runs set it from their source; tools default to it.
    namespace: str = "default"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def feature_store_dir(self) -> Path:
        """Long-lived Feast state of this namespace: registry, online store (SQLite), offline feature tables."""
        return self.home / "feature_store" / self.namespace

    @property
    def mlflow_dir(self) -> Path:
        """The embedded MLflow store: SQLite backend and local artifacts."""
        return self.home / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        """``RECSYS_MLFLOW_TRACKING_URI`` (e.g. a PostgreSQL URI in production), else the embedded SQLite store."""
        return self.extra.get("mlflow_tracking_uri") or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def index_dir(self) -> Path:
        """Long-lived extensions of registered bundles' FAISS indexes written by the item refresh
        (``<model>/v<version>/r0001/ ...``) and the index writers' lock; a bundle's own index lives in the bundle."""
        return self.home / "indexes"

    @property
    def redis_url(self) -> str:
        """Redis for the production profile's online store (``RECSYS_REDIS_URL``)."""
        return self.extra.get("redis_url", "127.0.0.1:6379")


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from the environment (nothing is read at import time)."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("RECSYS_HOME", Path.home() / ".recsys")).expanduser().resolve()
    artifact_root = Path(env.get("RECSYS_ARTIFACT_ROOT", home / "runs")).expanduser().resolve()
    event_types = tuple(
        e.strip() for e in env.get("RECSYS_EVENT_TYPES", ",".join(EVENT_TYPES)).split(",") if e.strip()
    )
    return Settings(
        home=home,
        artifact_root=artifact_root,
        profile=env.get("RECSYS_PROFILE", "embedded"),
        spark_master=env.get("RECSYS_SPARK_MASTER", "local[*]"),
        event_types=event_types,
        horizon_days=int(env.get("RECSYS_HORIZON_DAYS", DEFAULT_HORIZON_DAYS)),
        bot_events_per_day=int(env.get("RECSYS_BOT_EVENTS_PER_DAY", DEFAULT_BOT_EVENTS_PER_DAY)),
        quality_threshold=float(env.get("RECSYS_QUALITY_THRESHOLD", DEFAULT_QUALITY_THRESHOLD)),
        max_stub_share=float(env.get("RECSYS_MAX_STUB_SHARE", DEFAULT_MAX_STUB_SHARE)),
        namespace=env.get("RECSYS_NAMESPACE") or "default",
        extra={"redis_url": env.get("RECSYS_REDIS_URL", "127.0.0.1:6379"),
               "mlflow_tracking_uri": env.get("RECSYS_MLFLOW_TRACKING_URI", "")},
    )


# Usage telemetry of the bundled tools is off: the product runs offline.
OFFLINE_ENV = {
    "GX_ANALYTICS_ENABLED": "False",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "True",
    "FEAST_USAGE": "False",
    "EVIDENTLY_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "SCARF_ANALYTICS": "false",
    "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def disable_telemetry(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the telemetry opt-outs in ``env`` (default: this process) unless the user set them."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)
    return dict(target)


def project_root() -> Path:
    """The repository root (``dags/``, ``expectations/``, ``feature_repo/`` live there)."""
    return Path(__file__).resolve().parents[2]


def airflow_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Airflow commands: the same AIRFLOW_HOME for ``recsys run`` and ``airflow
    standalone``; the embedded SQLite default unless the user configured another database."""
    import sys

    env = dict(os.environ if base is None else base)
    disable_telemetry(env)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("RECSYS_HOME", str(settings.home))
    env["AIRFLOW_HOME"] = env.get("AIRFLOW_HOME") or str(settings.airflow_home)
    defaults = {
        # Where task logs go and the API server reads them; `recsys run` writes its tasks' logs there too.
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(Path(env["AIRFLOW_HOME"]) / "logs"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project_root() / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # schedules start when you unpause
        # One laptop, no login: every local user is admin (embedded profile only).
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True" if settings.profile == "embedded" else "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env
