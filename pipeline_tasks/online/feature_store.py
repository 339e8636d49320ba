"""The Feast feature store as serving sees it: config per profile, the store, feature services, online reads.

``feature_repo/`` holds the declarative Feast objects and one ``feature_store*.yaml`` per profile;
their paths follow ``${RECSYS_HOME}`` (Feast expands environment variables in the yaml, so the
plain ``feast`` CLI works for a user who exported RECSYS_HOME). Here the same yaml is rendered
from the typed settings instead, so code never depends on what the process environment holds.
Feast is imported inside functions: it takes seconds to import.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.settings import Settings, disable_telemetry, load_settings, project_root

if TYPE_CHECKING:
    from feast import FeatureStore

OFFLINE_TABLES = ("user_features", "item_features")
ENTITY_TIMESTAMP = "event_timestamp"  # the entity-rows column Feast's point-in-time join uses
OFFLINE_GLOB = "*/*.parquet"  # snapshot_date=YYYY-MM-DD/part-*.parquet
PROFILE_CONFIGS = {"embedded": "feature_store.yaml", "production": "feature_store.production.yaml"}

_PANDAS_DTYPES = {"INT64": "Int64", "INT32": "Int64", "DOUBLE": "float64", "FLOAT": "float64", "BOOL": "boolean"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def feature_repo_dir() -> Path:
    """The declarative Feast repo (``feature_repo/`` at the project root)."""
    return project_root() / "feature_repo"


def offline_table_dir(table: str, settings: Settings | None = None) -> Path:
    """Where build_features writes one offline table (``snapshot_date=YYYY-MM-DD`` partitions)."""
    if table not in OFFLINE_TABLES:
        raise ValueError(f"unknown offline table {table!r}; expected one of {OFFLINE_TABLES}")
    settings = settings or load_settings()
    return settings.feature_store_dir / "offline" / table


_repo_settings: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("recsys_repo_settings",
                                                                              default=None)


def repo_settings() -> Settings:
    """The settings the feature repo's definition files resolve paths with: those of the apply in progress
    (:func:`pipeline_tasks.features.store.load_repo_modules`), else the environment's (plain ``feast`` CLI)."""
    return _repo_settings.get() or load_settings()


@contextlib.contextmanager
def repo_settings_as(settings: Settings) -> Iterator[None]:
    """Load the feature repo's definitions for ``settings`` (its namespace and profile) in this block."""
    token = _repo_settings.set(settings)
    try:
        yield
    finally:
        _repo_settings.reset(token)


def offline_source_kwargs(table: str, profile: str, settings: Settings | None = None) -> dict[str, Any]:
    """The path arguments of one offline table's Feast source for a profile's offline store.

    DuckDB (embedded) reads a glob of the partitions' parquet files; Spark (production) reads the
    partitioned directory and prunes by ``snapshot_date``.
    """
    root = offline_table_dir(table, settings)
    if profile == "production":
        return {"path": str(root), "file_format": "parquet", "date_partition_column": "snapshot_date"}
    from feast.data_format import ParquetFormat

    return {"path": str(root / OFFLINE_GLOB), "file_format": ParquetFormat()}


def source_dir(path: str) -> Path:
    """The offline table directory behind a source's ``path`` (which may end in the partitions' glob)."""
    return Path(path.removesuffix("/" + OFFLINE_GLOB))


def config_template(settings: Settings) -> Path:
    """The ``feature_store*.yaml`` of the settings' profile."""
    try:
        name = PROFILE_CONFIGS[settings.profile]
    except KeyError:
        raise ValueError(f"RECSYS_PROFILE={settings.profile!r} is not a profile; use one of "
                         f"{sorted(PROFILE_CONFIGS)}") from None
    return feature_repo_dir() / name


def config_values(settings: Settings) -> dict[str, str]:
    """The ``${VAR}`` values the feature store yaml files use, taken from the settings."""
    return {"RECSYS_HOME": str(settings.home), "RECSYS_NAMESPACE": settings.namespace,
            "RECSYS_REDIS_URL": settings.redis_url, "RECSYS_SPARK_MASTER": settings.spark_master}


def render_config(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``${NAME}`` in ``template`` by ``values[NAME]`` (comment lines are left as is).

    Raises KeyError naming the variables that have no value.
    """
    lines = template.splitlines(keepends=True)
    used = {m.group(1) for line in lines if not line.lstrip().startswith("#") for m in _VAR.finditer(line)}
    missing = sorted(used - set(values))
    if missing:
        raise KeyError(f"feature store yaml uses {missing} but no value was given for them")
    return "".join(line if line.lstrip().startswith("#") else _VAR.sub(lambda m: values[m.group(1)], line)
                   for line in lines)


def repo_config_dict(settings: Settings) -> dict[str, Any]:
    """The rendered feature store yaml of the settings' profile, as a dict.

    ``settings.extra["feast_project"]`` overrides the project name (tests use a unique one so
    that they never touch another run's Redis keys).
    """
    import yaml

    text = render_config(config_template(settings).read_text(), config_values(settings))
    raw = yaml.safe_load(text)
    if settings.extra.get("feast_project"):
        raw["project"] = settings.extra["feast_project"]
    return raw


def get_store(settings: Settings | None = None) -> FeatureStore:
    """A FeatureStore for the settings' profile, with ``feature_repo/`` as its repo path."""
    settings = settings or load_settings()
    disable_telemetry()
    from feast import FeatureStore, RepoConfig

    config = RepoConfig(**repo_config_dict(settings))
    config.repo_path = feature_repo_dir()
    return FeatureStore(repo_path=str(feature_repo_dir()), config=config)


@dataclass(frozen=True)
class ViewFeatures:
    """The features one feature service takes from one feature view."""

    view: str
    join_key: str
    features: tuple[str, ...]
    dtypes: tuple[Any, ...]  # pandas dtypes, same order as ``features``
    source_path: str

    @property
    def refs(self) -> list[str]:
        return [f"{self.view}:{f}" for f in self.features]


# Resolved feature services per store. Safe to keep for a store's lifetime because services are
# versioned and never edited (a change is a new ``..._v2``); it saves ~tens of ms per online request.
_service_views_cache: weakref.WeakKeyDictionary[Any, dict[str, list[ViewFeatures]]] = weakref.WeakKeyDictionary()


def service_views(store: FeatureStore, feature_service: str) -> list[ViewFeatures]:
    """The feature views of a feature service with their join key and features, in service order."""
    per_store = _service_views_cache.setdefault(store, {})
    if feature_service not in per_store:
        per_store[feature_service] = _resolve_service(store, feature_service)
    return per_store[feature_service]


def _resolve_service(store: FeatureStore, feature_service: str) -> list[ViewFeatures]:
    service = store.get_feature_service(feature_service, allow_cache=True)
    out = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name, allow_registry_cache=True)
        keys = [projection.join_key_map.get(c.name, c.name) for c in view.entity_columns]
        if len(keys) != 1:
            raise ValueError(f"{feature_service}: view {view.name} has join keys {keys}; expected exactly one")
        out.append(ViewFeatures(
            view=projection.name_to_use(), join_key=keys[0], features=tuple(f.name for f in projection.features),
            dtypes=tuple(_PANDAS_DTYPES.get(f.dtype.to_value_type().name, object) for f in projection.features),
            source_path=getattr(view.batch_source, "path", ""),
        ))
    return out


def with_dtypes(df: pd.DataFrame, views: Sequence[ViewFeatures]) -> pd.DataFrame:
    """Feature columns with the same dtypes whether or not nulls occur: nullable Int64, float64,
    or object (strings, with None for null)."""
    out = df.copy()
    for view in views:
        for column, dtype in zip(view.features, view.dtypes, strict=True):
            if column not in out:
                continue
            if dtype is object:
                out[column] = out[column].astype(object).where(out[column].notna(), None)
            else:
                out[column] = out[column].astype(dtype)
    return out


def online_features(user_id: str, item_ids: Sequence[str], settings: Settings | None = None, *,
                    feature_service: str = "ranker_v1",
                    store: FeatureStore | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """One user's features and ``item_ids``' features from the online store (two SDK reads).

    Returns ``(user_features, item_features)``: a dict with ``user_id`` and the service's user
    features, and a DataFrame with one row per requested item (same order) starting with
    ``item_id``, typed as in :func:`training_set`; values are null where the online store has
    nothing. Pass ``store`` (from :func:`get_store`) to reuse one across requests.
    """
    store = store or get_store(settings)
    views = service_views(store, feature_service)
    by_key: dict[str, list[str]] = {}
    for view in views:
        by_key.setdefault(view.join_key, []).extend(view.refs)
    unexpected = sorted(set(by_key) - {"user_id", "item_id"})
    if unexpected:
        raise ValueError(f"{feature_service} needs join keys {unexpected}; online_features serves user_id/item_id")
    user: dict[str, Any] = {"user_id": user_id}
    if "user_id" in by_key:
        response = store.get_online_features(features=by_key["user_id"], entity_rows=[{"user_id": user_id}])
        values = response.to_dict()
        user.update({ref.split(":", 1)[1]: values[ref.split(":", 1)[1]][0] for ref in by_key["user_id"]})
    item_views = [v for v in views if v.join_key == "item_id"]
    columns: dict[str, Any] = {"item_id": pd.array(list(item_ids), dtype=object)}
    if item_ids and item_views:
        refs = [ref for view in item_views for ref in view.refs]
        values = store.get_online_features(features=refs, entity_rows=[{"item_id": i} for i in item_ids]).to_dict()
    else:
        values = {}
    for view in item_views:
        for feature, dtype in zip(view.features, view.dtypes, strict=True):
            columns[feature] = _typed_array(values.get(feature, [None] * len(item_ids)), dtype)
    return user, pd.DataFrame(columns)


def _typed_array(values: list[Any], dtype: Any) -> Any:
    """A column from Python values (None = null) with the dtype :func:`with_dtypes` gives."""
    if dtype == "float64":
        return np.array([np.nan if v is None else v for v in values], dtype="float64")
    return pd.array(values, dtype=dtype)
