"""Point-in-time reads of the offline feature history through Feast (training sets, evaluation, index build)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import pandas as pd

from pipeline_tasks.core.settings import Settings
from pipeline_tasks.data.validate import to_utc
from pipeline_tasks.online.feature_store import ENTITY_TIMESTAMP, get_store, service_views, with_dtypes

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

TRAINING_SET = "training_set.parquet"
PIT_CHUNK_ROWS = 1_000_000  # entity rows per offline-store query (bounds memory; ~3 GB peak per chunk)
ROW_ID = "recsys_row_id"  # carried through the offline store's join to restore the request order


def _sink() -> io.TextIOWrapper:
    """Where Feast's progress output goes: discarded. A text stream over bytes (not a StringIO), because a warning
    raised meanwhile reaches Airflow's task logger, which writes to ``sys.stdout.buffer``."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8")


def attach_by_row_id(requests: pd.DataFrame, features: pd.DataFrame, feature_columns: Sequence[str]) -> pd.DataFrame:
    """The caller's rows, in their order and index, then ``feature_columns`` taken from ``features`` by row id.

    ``features`` has a ``ROW_ID`` column naming the request's position (0..n-1), in any order; a
    position without a row gets nulls (None for strings). A position twice is an error (the store
    duplicated a row). Column dtypes are kept; ``requests`` is not modified (nor copied: millions of rows).
    """
    clash = sorted(set(requests.columns) & set(feature_columns))
    if clash:
        raise ValueError(f"entity rows already have columns named like features: {clash}; rename them")
    ids = features[ROW_ID].to_numpy(dtype=np.int64)
    duplicates = len(ids) - len(np.unique(ids))
    if duplicates:
        raise RuntimeError(f"the offline store returned {duplicates} duplicate rows for {len(requests)} requests; "
                           "the point-in-time join is broken")
    position = np.full(len(requests), -1, dtype=np.int64)
    position[ids] = np.arange(len(ids))
    missing = position < 0
    if missing.any():
        log.warning("the offline store returned no row for %d of %d requests; they get null features",
                    int(missing.sum()), len(requests))
    out = requests.copy(deep=False)  # new columns go to this frame only
    for column in feature_columns:
        values = features[column]
        source = values.to_numpy() if values.dtype.kind in "fO" else values.array
        taken = pd.api.extensions.take(source, position, allow_fill=True)
        if values.dtype == object:
            taken[missing] = None
        out[column] = taken
    return out


def _utc_us(values: pd.Series) -> pd.Series:
    """UTC instants in microseconds (Spark reads no nanosecond timestamps; naive = UTC)."""
    return pd.to_datetime(values, utc=True).dt.as_unit("us")


def training_set(entity_rows: pd.DataFrame, feature_service: str, settings: Settings | None = None,
                 *, store: FeatureStore | None = None, chunk_rows: int = PIT_CHUNK_ROWS,
                 until: datetime | pd.Timestamp | None = None, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Point-in-time correct features for each entity row: the one Feast historical read of the project.

    ``entity_rows`` needs the service's join keys (``user_id`` and/or ``item_id``) and an
    ``event_timestamp`` (the moment asked about; naive = UTC); other columns (labels, ...) are kept.
    Returns exactly one row per entity row, in the given order and index, with nulls where no
    feature row was valid at that time (unknown entity, nothing yet, or older than the view's TTL).
    The profile's offline store (DuckDB embedded, Spark in production) does the join in one query
    over all the service's views; a row id carried through it restores the order.

    ``until`` (the end of a run's last recorded snapshot day) caps the moments asked about, so a run
    reads only the partitions it recorded, never one written later. ``keys`` restricts the read to the
    service's views with those join keys (e.g. ``["item_id"]`` for item features alone).
    """
    store = store or get_store(settings)
    views = [v for v in service_views(store, feature_service) if keys is None or v.join_key in keys]
    if not views:
        raise ValueError(f"{feature_service} has no feature view with join keys {list(keys or [])}")
    keys = list(dict.fromkeys(v.join_key for v in views))
    needed = [*keys, ENTITY_TIMESTAMP]
    absent = [c for c in needed if c not in entity_rows.columns]
    if absent:
        raise ValueError(f"entity rows for {feature_service} need columns {needed}; missing {absent}")
    nulls = entity_rows[needed].isna().any(axis=1)
    if nulls.any():
        first = entity_rows.loc[nulls].iloc[0][needed].to_dict()
        raise ValueError(f"{int(nulls.sum())} entity rows have a null in {needed} (first: {first}); drop them first")
    feature_columns = [f for v in views for f in v.features]
    if not len(entity_rows):
        return attach_by_row_id(entity_rows, with_dtypes(pd.DataFrame(columns=[ROW_ID, *feature_columns]), views),
                                feature_columns)

    request = pd.DataFrame({key: entity_rows[key].astype(str).to_numpy() for key in keys})
    moments = _utc_us(entity_rows[ENTITY_TIMESTAMP])
    if until is not None:
        moments = moments.clip(upper=to_utc(until))
    request[ENTITY_TIMESTAMP] = moments.to_numpy()
    request[ROW_ID] = np.arange(len(request), dtype=np.int64)
    service = [ref for view in views for ref in view.refs]
    started = time.perf_counter()
    parts = []
    # In chunks: the store's answer carries every request column again, so memory grows with the chunk,
    # not with the whole request (5 M rows at once peaked at 12.6 GB; see tests/benchmarks/bench_point_in_time.py).
    for start in range(0, len(request), chunk_rows):
        with contextlib.redirect_stdout(_sink()):  # Feast prints progress; the task log gets the summary
            answer = store.get_historical_features(entity_df=request.iloc[start:start + chunk_rows],
                                                   features=service).to_df()
        parts.append(with_dtypes(answer[[ROW_ID, *feature_columns]], views))
        del answer
    del request
    features = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    del parts
    log.info("%s: %d point-in-time rows from the %s offline store in %.1fs", feature_service, len(entity_rows),
             store.config.offline_store.type, time.perf_counter() - started)
    return attach_by_row_id(entity_rows, features, feature_columns)


class TrainingSetResult(TypedDict, total=False):
    """The training set's file, its rows and the share of rows that got features, per view."""

    training_set: str
    rows: int
    entity_rows: int
    feature_service: str
    coverage: dict[str, float]
    context_columns: list[str]  # added by the training_set stage


def training_set_stage(entity_rows: str | Path | pd.DataFrame, out_dir: str | Path,
                       feature_service: str = "ranker_v1", settings: Settings | None = None,
                       until: datetime | pd.Timestamp | None = None) -> TrainingSetResult:
    """Write ``training_set.parquet`` for the entity rows (a parquet path or a DataFrame).

    Returns the path, the row counts and, per feature view, the share of rows that got features
    (a low share means the snapshots do not cover the label times).
    """
    rows = entity_rows if isinstance(entity_rows, pd.DataFrame) else pd.read_parquet(entity_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = get_store(settings)
    df = training_set(rows, feature_service, store=store, until=until)
    path = out_dir / TRAINING_SET
    df.to_parquet(path, index=False)
    coverage = {v.view: round(float(df[list(v.features)].notna().any(axis=1).mean()), 4) if len(df) else 0.0
                for v in service_views(store, feature_service)}
    log.info("training set %s: %d rows, share of rows with features per view %s", path, len(df), coverage)
    return TrainingSetResult(training_set=str(path), rows=len(df), entity_rows=len(rows),
                             feature_service=feature_service, coverage=coverage)


def _snapshot_day_before(ts: str) -> str:
    """The snapshot valid at ``ts``: the one of the UTC day before (rows are stamped at the day's end)."""
    return (to_utc(ts).floor("D") - pd.Timedelta(days=1)).date().isoformat()


def snapshot_rows(day: str, columns: dict[str, list[str]] | None = None, settings: Settings | None = None
                  ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """All user and item rows of one recorded daily snapshot (``None`` where there is no such partition);
    ``columns`` limits what is read, per table. For distributions over a whole day (the drift check);
    features of given entities at given moments come from :func:`training_set`."""
    from pipeline_tasks.online.feature_store import offline_table_dir

    out: list[pd.DataFrame | None] = []
    for table in ("user_features", "item_features"):
        part = offline_table_dir(table, settings) / f"snapshot_date={day}"
        wanted = (columns or {}).get(table)
        out.append(pd.read_parquet(part, columns=wanted) if part.exists() else None)
    return out[0], out[1]


def features_at(moment: datetime | pd.Timestamp | str, *, user_ids: Sequence[str] = (), item_ids: Sequence[str] = (),
                feature_service: str = "two_tower_v1", settings: Settings | None = None,
                until: datetime | pd.Timestamp | None = None,
                store: FeatureStore | None = None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The users' and items' features valid at ``moment`` (what the online store served then), through the
    same point-in-time read as training sets: ``(user_rows, item_rows)``, ``None`` for an empty id list."""
    store = store or get_store(settings)
    at = to_utc(str(moment))
    out: list[pd.DataFrame | None] = []
    for key, ids in (("user_id", user_ids), ("item_id", item_ids)):
        if not len(ids):
            out.append(None)
            continue
        rows = pd.DataFrame({key: pd.Series(list(ids), dtype=object).astype(str), ENTITY_TIMESTAMP: at})
        out.append(training_set(rows, feature_service, store=store, until=until, keys=[key]))
    return out[0], out[1]


def end_of_day(day: str) -> pd.Timestamp:
    """The end of a snapshot day (midnight starting the next UTC day): the run's ``until`` for its last day."""
    return pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1)
