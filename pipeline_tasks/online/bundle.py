"""Model bundles: what serving and ``recsys recommend`` load, found by registry alias or version.

A bundle is one version of the source's MLflow registered model (``recsys_<namespace>``). Its directory holds
``bundle.json`` (feature service, config, metrics, data snapshot hash, code version, windows), ``protocol/`` (the
fit trained up to ``t_test``, whose test figures are the reported ones), ``serving/`` (the same
hyper-parameters on every window up to ``as_of``) and ``index/`` (the serving fit's FAISS index with its
checksums). Which bundle is served is decided by the aliases ``champion`` / ``challenger`` alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_tasks.core.settings import Settings, disable_telemetry, load_settings

log = logging.getLogger(__name__)

MODEL_PREFIX = "recsys_"
BUNDLE_FILE = "bundle.json"
ALIASES = ("champion", "challenger")
GATE_TAG = "recsys.gate"
GATE_REASON_TAG = "recsys.gate_reason"


def model_name(namespace: str) -> str:
    """The registered model of a source (namespaced like its feature store)."""
    return f"{MODEL_PREFIX}{namespace}"


def client(settings: Settings | None = None) -> Any:
    """An MLflow client on the profile's tracking store."""
    import mlflow
    from mlflow import MlflowClient

    settings = settings or load_settings()
    disable_telemetry()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


@dataclass
class Bundle:
    """A registered bundle version, downloaded (or read in place) to a local directory."""

    name: str
    version: int
    path: Path
    meta: dict[str, Any]
    tags: dict[str, str]
    aliases: list[str]

    def fit_dir(self, fit: str = "serving") -> Path:
        """The directory of the ``serving`` or ``protocol`` fit."""
        if fit not in ("serving", "protocol"):
            raise ValueError(f"fit={fit!r}: use 'serving' or 'protocol'")
        return self.path / fit

    @property
    def gate_passed(self) -> bool:
        return self.tags.get(GATE_TAG) == "passed"


def open_bundle(path: str | Path) -> Bundle:
    """A bundle directory already on disk (e.g. packed into a Bento), without the registry: ``import mlflow``
    alone loads pyspark's Python modules where pyspark is installed, so a serving process resolves its
    bundle once (``load_bundle``, at build time) and opens the directory with this."""
    local = Path(path)
    meta = json.loads((local / BUNDLE_FILE).read_text())
    version = meta.get("version")
    return Bundle(meta.get("model", ""), int(version) if version is not None else 0, local, meta, {}, [])


def registered_models(settings: Settings | None = None) -> list[str]:
    """Names of the recsys registered models in the tracking store."""
    c = client(settings)
    return sorted(m.name for m in c.search_registered_models() if m.name.startswith(MODEL_PREFIX))


def aliases_of(name: str, settings: Settings | None = None) -> dict[str, int]:
    """alias -> version of a registered model (empty when it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client(settings).get_registered_model(name)
    except MlflowException:
        return {}
    return {a: int(v) for a, v in (model.aliases or {}).items()}


def load_bundle(name: str, version: int | str | None = None, alias: str = "champion",
                settings: Settings | None = None) -> Bundle:
    """The bundle of ``version`` (default: the one ``alias`` points at), as a local directory."""
    import mlflow
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        mv = c.get_model_version(name, str(version)) if version is not None else c.get_model_version_by_alias(name,
                                                                                                          alias)
    except MlflowException as exc:
        what = f"version {version}" if version is not None else f"alias '{alias}'"
        raise LookupError(f"registered model {name} has no {what}; `recsys models` lists versions and aliases "
                          f"({exc.message if hasattr(exc, 'message') else exc})") from exc
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source))
    meta = json.loads((local / BUNDLE_FILE).read_text())
    current = aliases_of(name, settings)
    return Bundle(name, int(mv.version), local, meta, dict(mv.tags or {}),
                  [a for a, v in current.items() if v == int(mv.version)])
