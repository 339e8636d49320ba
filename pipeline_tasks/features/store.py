"""Writing the Feast feature store: the writers' lock, apply, materialize (config and reads: online.feature_store).

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
import importlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pandas as pd

from pipeline_tasks.core.locks import acquire_file_lock, release_file_lock
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.feature_store import (
    ENTITY_TIMESTAMP,
    feature_repo_dir,
    get_store,
    repo_settings_as,
    source_dir,
)

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
DEFAULT_LOCK_TIMEOUT_S = 3600.0

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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
            _held[key] = (acquire_file_lock(path, timeout), 1)
        try:
            yield path
        finally:
            fh, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fh, depth - 1)
            else:
                release_file_lock(fh)
    finally:
        rlock.release()


# --- apply ----------------------------------------------------------------------------------

def load_repo_modules(repo: Path | None = None, settings: Settings | None = None) -> list[ModuleType]:
    """Import the repo's definition files afresh (as ``feast apply`` does, without its chdir).

    Fresh every time: the sources' paths are computed at import from ``settings`` (namespace,
    profile), which may differ from an earlier call in this process.
    """
    repo = repo or feature_repo_dir()
    settings = settings or load_settings()
    names = [p.stem for p in sorted(repo.glob("*.py")) if p.name != "__init__.py"]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(repo))
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # as feast apply: no __pycache__ there
    try:
        with repo_settings_as(settings):
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
    for module in load_repo_modules(settings=settings):
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
                                           skip_source_validation=True)  # a glob never "exists": checked above
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
        path = source_dir(getattr(source, "path", "") or "")
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
            table_dir = source_dir(fv.batch_source.path)
            if not table_dir.exists() or not any(table_dir.rglob("*.parquet")):
                raise FileNotFoundError(f"{fv.name}: no offline snapshots under {table_dir}; "
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
            entities = _count_entities(table_dir, fv.entity_columns[0].name, start, end)
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
