"""The Feast feature store: config per profile, apply, materialize, training sets, online reads.

``feature_repo/`` holds the declarative Feast objects and one ``feature_store*.yaml`` per profile;
their paths follow ``${RECSYS_HOME}`` (Feast expands environment variables in the yaml, so the
plain ``feast`` CLI works for a user who exported RECSYS_HOME). Here the same yaml is rendered
from the typed settings instead, so code never depends on what the process environment holds.

Writers of the long-lived state under ``<feature_store_dir>`` (apply, materialize, the Spark job
writing offline partitions) hold :func:`feature_store_lock`, which serialises them across
processes and DAGs. Feast is imported inside functions: it takes seconds to import.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline_tasks.settings import Settings, disable_telemetry, load_settings, project_root

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

OFFLINE_TABLES = ("user_features", "item_features")
ENTITY_TIMESTAMP = "event_timestamp"  # the entity-rows column Feast's point-in-time join uses
PROFILE_CONFIGS = {"embedded": "feature_store.yaml", "production": "feature_store.production.yaml"}
TRAINING_SET = "training_set.parquet"
LOCK_NAME = ".lock"
DEFAULT_LOCK_TIMEOUT_S = 3600.0

_PANDAS_DTYPES = {"INT64": "Int64", "INT32": "Int64", "DOUBLE": "float64", "FLOAT": "float64", "BOOL": "boolean"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- paths and config -----------------------------------------------------------------------

def feature_repo_dir() -> Path:
    """The declarative Feast repo (``feature_repo/`` at the project root)."""
    return project_root() / "feature_repo"


def offline_table_dir(table: str, settings: Settings | None = None) -> Path:
    """Where build_features writes one offline table (``snapshot_date=YYYY-MM-DD`` partitions)."""
    if table not in OFFLINE_TABLES:
        raise ValueError(f"unknown offline table {table!r}; expected one of {OFFLINE_TABLES}")
    settings = settings or load_settings()
    return settings.feature_store_dir / "offline" / table


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
    return {"RECSYS_HOME": str(settings.home), "RECSYS_REDIS_URL": settings.redis_url}


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


# --- the writers' lock ----------------------------------------------------------------------

_thread_locks: dict[tuple[str, int], threading.RLock] = {}
_held: dict[tuple[str, int], tuple[IO[str], int]] = {}


@contextlib.contextmanager
def feature_store_lock(settings: Settings | None = None,
                       timeout: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the exclusive writers' lock of the feature store (re-entrant within one thread).

    Serialises apply, materialize and offline-table writes across processes (an ``fcntl`` lock
    on ``<feature_store_dir>/.lock``). Waits up to ``timeout`` seconds, then raises TimeoutError.
    """
    settings = settings or load_settings()
    path = settings.feature_store_dir / LOCK_NAME
    key = (str(path), os.getpid())  # per process: a forked child must take the lock itself
    rlock = _thread_locks.setdefault(key, threading.RLock())
    if not rlock.acquire(timeout=timeout):
        raise TimeoutError(f"feature store lock {path}: another thread held it for {timeout:.0f}s")
    try:
        if key in _held:
            fh, depth = _held[key]
            _held[key] = (fh, depth + 1)
        else:
            _held[key] = (_acquire_file_lock(path, timeout), 1)
        try:
            yield path
        finally:
            fh, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fh, depth - 1)
            else:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
    finally:
        rlock.release()


def _acquire_file_lock(path: Path, timeout: float, what: str = "feature store",
                       writers: str = "apply/materialize/build_features") -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - closed when the lock is released
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not waited:
                fh.seek(0)
                log.info("waiting for the %s lock %s (held by %s)", what, path, fh.read().strip() or "?")
                waited = True
            if time.monotonic() >= deadline:
                fh.close()
                raise TimeoutError(f"{what} lock {path} still held after {timeout:.0f}s; another "
                                   f"{writers} is running (or hung: see the pid in the file)") from None
            time.sleep(0.2)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(UTC).isoformat()}))
    fh.flush()
    return fh


# --- apply ----------------------------------------------------------------------------------

def load_repo_modules(repo: Path | None = None) -> list[ModuleType]:
    """Import the repo's definition files afresh (as ``feast apply`` does, without its chdir).

    Fresh every time: the sources' paths are computed at import from the settings, which may
    have changed since an earlier call in this process.
    """
    repo = repo or feature_repo_dir()
    names = [p.stem for p in sorted(repo.glob("*.py")) if p.name != "__init__.py"]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(repo))
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # as feast apply: no __pycache__ there
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.dont_write_bytecode = bytecode
        sys.path.remove(str(repo))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def apply_repo(settings: Settings | None = None) -> dict[str, Any]:
    """Register ``feature_repo/``'s objects in the registry and create their online tables.

    Idempotent: re-applying an unchanged repo changes nothing; objects removed from the repo
    are removed from the registry (the same plan as ``feast apply``).
    """
    settings = settings or load_settings()
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView, Project
    from feast.data_source import DataSource
    from feast.feature_view import DUMMY_ENTITY
    from feast.repo_contents import RepoContents
    from feast.repo_operations import apply_total_with_repo_instance
    from feast.stream_feature_view import StreamFeatureView

    kinds: dict[type, list[Any]] = {Entity: [], DataSource: [], FeatureView: [], OnDemandFeatureView: [],
                                    FeatureService: []}
    for module in load_repo_modules():
        for obj in vars(module).values():
            for kind, found in kinds.items():
                if isinstance(obj, kind) and not isinstance(obj, StreamFeatureView) \
                        and not any(obj is seen for seen in found):
                    found.append(obj)
    for view in kinds[FeatureView]:  # a source declared inline in a view is registered too (as feast apply)
        if view.batch_source is not None and not any(view.batch_source is s for s in kinds[DataSource]):
            kinds[DataSource].append(view.batch_source)
    _check_source_paths(kinds[DataSource], settings)

    with feature_store_lock(settings):
        store = get_store(settings)
        repo = RepoContents(
            projects=[Project(name=store.project, description=store.config.project_description or "")],
            data_sources=kinds[DataSource], feature_views=kinds[FeatureView],
            on_demand_feature_views=kinds[OnDemandFeatureView], stream_feature_views=[], label_views=[],
            entities=[*kinds[Entity], DUMMY_ENTITY], feature_services=kinds[FeatureService], permissions=[],
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # Feast prints its plan; keep it in the task log instead
            apply_total_with_repo_instance(store, store.project, store.registry, repo,
                                           skip_source_validation=False)
        for line in out.getvalue().splitlines():
            if line.strip():
                log.info("feast apply: %s", line)
    result = {
        "project": store.project,
        "profile": settings.profile,
        "registry": str(store.config.registry.path),
        "online_store": store.config.online_store.type,
        "entities": sorted(e.name for e in kinds[Entity]),
        "feature_views": sorted(fv.name for fv in kinds[FeatureView]),
        "feature_services": sorted(fs.name for fs in kinds[FeatureService]),
    }
    log.info("applied feature repo: %s", result)
    return result


def _check_source_paths(sources: Sequence[Any], settings: Settings) -> None:
    root = settings.feature_store_dir.resolve()
    for source in sources:
        path = Path(getattr(source, "path", "") or "")
        if path.is_absolute() and not path.resolve().is_relative_to(root):
            raise ValueError(f"feature_repo source {source.name!r} reads {path}, outside {root}: the repo "
                             f"resolves RECSYS_HOME from the environment ({os.environ.get('RECSYS_HOME')!r}) "
                             f"but the settings say {settings.home}; export RECSYS_HOME={settings.home}")


# --- materialize ----------------------------------------------------------------------------

def materialize_end(end_date: str | date | datetime) -> datetime:
    """The UTC instant to materialize up to (inclusive).

    A date (or ``YYYY-MM-DD``) means "the whole day": the next day's midnight, which includes
    that day's snapshot (stamped at the end of the day). A naive datetime is taken as UTC.
    """
    if isinstance(end_date, str) and _DATE_ONLY.match(end_date.strip()):
        end_date = date.fromisoformat(end_date.strip())
    if isinstance(end_date, date) and not isinstance(end_date, datetime):
        return datetime(end_date.year, end_date.month, end_date.day, tzinfo=UTC) + timedelta(days=1)
    ts = pd.Timestamp(end_date)
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
    return ts.to_pydatetime()


def materialize(end_date: str | date | datetime, settings: Settings | None = None) -> dict[str, Any]:
    """Load the newest offline values up to ``end_date`` into the online store, incrementally.

    The first run of a feature view starts at ``end - ttl`` (from the data's time, not the wall
    clock: a historical dataset such as MovieLens 1998 is far older than ``now - ttl``); later
    runs continue from where the previous one ended (``materialize_incremental``). An end at or
    before the last one is a no-op, so a re-run never puts older values back online.
    """
    settings = settings or load_settings()
    end = materialize_end(end_date)
    views: dict[str, Any] = {}
    with feature_store_lock(settings):
        store = get_store(settings)
        feature_views = store.list_feature_views()
        if not feature_views:
            raise RuntimeError(f"no feature views in project {store.project!r}: run apply_repo first")
        for fv in feature_views:
            source_dir = Path(fv.batch_source.path)
            if not source_dir.exists() or not any(source_dir.rglob("*.parquet")):
                raise FileNotFoundError(f"{fv.name}: no offline snapshots under {source_dir}; "
                                        "run build_features for this date first")
            last = fv.most_recent_end_time
            out = io.StringIO()
            if last is None:
                start = end - fv.ttl if fv.ttl else datetime(1970, 1, 1, tzinfo=UTC)
                with contextlib.redirect_stdout(out):
                    store.materialize(start_date=start, end_date=end, feature_views=[fv.name])
                mode = "initial"
            elif end > last:
                start = last
                with contextlib.redirect_stdout(out):
                    store.materialize_incremental(end_date=end, feature_views=[fv.name])
                mode = "incremental"
            else:
                views[fv.name] = {"mode": "up_to_date", "materialized_until": last.isoformat(), "entities": 0}
                log.info("%s already materialized until %s; nothing to do for %s", fv.name, last, end)
                continue
            entities = _count_entities(source_dir, fv.entity_columns[0].name, start, end)
            views[fv.name] = {"mode": mode, "start": start.isoformat(), "end": end.isoformat(),
                              "entities": entities}
            log.info("materialized %s (%s) %s .. %s: %d entities", fv.name, mode, start, end, entities)
            if entities == 0:
                log.warning("%s: no offline rows between %s and %s, so nothing new went online; is there a "
                            "snapshot for this date?", fv.name, start, end)
    return {"project": store.project, "online_store": store.config.online_store.type, "end": end.isoformat(),
            "feature_views": views}


def _count_entities(source_dir: Path, join_key: str, start: datetime, end: datetime) -> int:
    """Distinct entities with a row in ``[start, end]`` (what materialization wrote)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    partitioning = ds.partitioning(pa.schema([("snapshot_date", pa.string())]), flavor="hive")
    dataset = ds.dataset(source_dir, format="parquet", partitioning=partitioning)
    # Partition pruning first (ISO dates compare as strings), then the exact interval.
    pruned = (ds.field("snapshot_date") >= (start - timedelta(days=1)).date().isoformat()) & (
        ds.field("snapshot_date") <= end.date().isoformat())
    df = dataset.to_table(columns=[join_key, ENTITY_TIMESTAMP], filter=pruned).to_pandas()
    ts = pd.to_datetime(df[ENTITY_TIMESTAMP], utc=True)
    return int(df.loc[(ts >= start) & (ts <= end), join_key].nunique())


# --- training sets (point-in-time correct) -----------------------------------------------------

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


def align_to_requests(requests: pd.DataFrame, features: pd.DataFrame, keys: Sequence[str],
                      feature_columns: Sequence[str], timestamp_col: str = ENTITY_TIMESTAMP) -> pd.DataFrame:
    """One row per request row, in request order: the caller's columns, then ``feature_columns``.

    ``features`` holds at most one row per (keys, timestamp), in any order, possibly missing
    some; a request row without a match gets nulls. Keys are compared as strings, timestamps
    as UTC instants (naive = UTC).
    """
    clash = sorted(set(requests.columns) & set(feature_columns))
    if clash:
        raise ValueError(f"entity rows already have columns named like features: {clash}; rename them")
    on = [*keys, timestamp_col]
    left = _join_frame(requests, keys, timestamp_col)
    right = pd.concat([_join_frame(features, keys, timestamp_col), features[list(feature_columns)]], axis=1)
    right = right.drop_duplicates(subset=on, keep="last")
    merged = left.merge(right, on=on, how="left", sort=False, validate="many_to_one")
    out = requests.copy()
    for column in feature_columns:
        out[column] = merged[column].to_numpy()
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


def _join_frame(df: pd.DataFrame, keys: Sequence[str], timestamp_col: str) -> pd.DataFrame:
    out = pd.DataFrame({key: df[key].astype(str).to_numpy() for key in keys}, index=df.index)
    out[timestamp_col] = _utc_ns(df[timestamp_col])
    return out


def _utc_ns(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).dt.as_unit("ns")


def _offline_entity_ids(source_path: str, join_key: str) -> set[str]:
    """The entities that have at least one row in an offline table."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if not source_path or not Path(source_path).exists():
        return set()
    column = ds.dataset(source_path, format="parquet", partitioning="hive").to_table(columns=[join_key])[join_key]
    return {str(v) for v in pc.unique(column).to_pylist() if v is not None}


def training_set(entity_rows: pd.DataFrame, feature_service: str, settings: Settings | None = None,
                 *, store: FeatureStore | None = None) -> pd.DataFrame:
    """Point-in-time correct features for each entity row (Feast historical retrieval).

    ``entity_rows`` needs the service's join keys (``user_id`` and/or ``item_id``) and an
    ``event_timestamp`` (the label time; naive = UTC); other columns (labels, ...) are kept.
    Returns exactly one row per entity row, in the given order, with nulls where no feature
    row was valid at that time.

    Feast 0.67's file offline store drops entity rows whose entity has rows but none valid
    yet, returns rows sorted by time, collapses duplicate (entity, time) rows, and fails
    outright (a dask "Divisions calculation failed" error) when an entity has no row at all.
    So each feature view is asked separately, for its known entities only, and the answers are
    joined back onto the request.
    """
    import dask

    store = store or get_store(settings)
    views = service_views(store, feature_service)
    needed = list(dict.fromkeys([*(v.join_key for v in views), ENTITY_TIMESTAMP]))
    absent = [c for c in needed if c not in entity_rows.columns]
    if absent:
        raise ValueError(f"entity rows for {feature_service} need columns {needed}; missing {absent}")
    nulls = entity_rows[needed].isna().any(axis=1)
    if nulls.any():
        first = entity_rows.loc[nulls].iloc[0][needed].to_dict()
        raise ValueError(f"{int(nulls.sum())} entity rows have a null in {needed} (first: {first}); drop them first")

    out = entity_rows
    for view in views:
        requests = _join_frame(entity_rows, [view.join_key], ENTITY_TIMESTAMP).drop_duplicates()
        known = requests[view.join_key].isin(_offline_entity_ids(view.source_path, view.join_key))
        requests = requests.loc[known].reset_index(drop=True)
        if requests.empty:
            features = pd.DataFrame(columns=[view.join_key, ENTITY_TIMESTAMP, *view.features])
        else:
            # Dask's default shuffle made Feast's entity/feature merge take ~90 s per view on 1,000 rows
            # here; the task-based shuffle gives the same result in a fraction of the time.
            with contextlib.redirect_stdout(io.StringIO()), dask.config.set({"dataframe.shuffle.method": "tasks"}):
                features = store.get_historical_features(entity_df=requests, features=view.refs).to_df()
        log.info("%s/%s: %d entity rows, %d distinct (%s, time) with a known entity, %d with a valid feature row",
                 feature_service, view.view, len(entity_rows), len(requests), view.join_key, len(features))
        out = align_to_requests(out, features, [view.join_key], view.features)
    return with_dtypes(out, views)


def training_set_stage(entity_rows: str | Path | pd.DataFrame, out_dir: str | Path,
                       feature_service: str = "ranker_v1", settings: Settings | None = None) -> dict[str, Any]:
    """Write ``training_set.parquet`` for the entity rows (a parquet path or a DataFrame).

    Returns the path, the row counts and, per feature view, the share of rows that got features
    (a low share means the snapshots do not cover the label times).
    """
    rows = entity_rows if isinstance(entity_rows, pd.DataFrame) else pd.read_parquet(entity_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = get_store(settings)
    df = training_set(rows, feature_service, store=store)
    path = out_dir / TRAINING_SET
    df.to_parquet(path, index=False)
    coverage = {v.view: round(float(df[list(v.features)].notna().any(axis=1).mean()), 4) if len(df) else 0.0
                for v in service_views(store, feature_service)}
    log.info("training set %s: %d rows, share of rows with features per view %s", path, len(df), coverage)
    return {"training_set": str(path), "rows": len(df), "entity_rows": len(rows), "feature_service": feature_service,
            "coverage": coverage}


# --- online ---------------------------------------------------------------------------------

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
