"""Point-in-time reads of the offline feature history through Feast (training sets, evaluation, index build)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.settings import Settings
from pipeline_tasks.data.validate import to_utc
from pipeline_tasks.online.feature_store import ENTITY_TIMESTAMP, get_store, service_views, with_dtypes

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

TRAINING_SET = "training_set.parquet"
ROW_ID = "recsys_row_id"  # carried through the offline store's join to restore the request order


def attach_by_row_id(requests: pd.DataFrame, features: pd.DataFrame, feature_columns: Sequence[str]) -> pd.DataFrame:
    """The caller's rows, in their order and index, then ``feature_columns`` taken from ``features`` by row id.

    ``features`` has a ``ROW_ID`` column naming the request's position (0..n-1), in any order; a
    position without a row gets nulls. A position twice is an error (the store duplicated a row).
    """
    clash = sorted(set(requests.columns) & set(feature_columns))
    if clash:
        raise ValueError(f"entity rows already have columns named like features: {clash}; rename them")
    ids = features[ROW_ID].to_numpy()
    if len(pd.unique(ids)) != len(ids):
        raise RuntimeError(f"the offline store returned {len(ids) - len(pd.unique(ids))} duplicate rows for "
                           f"{len(requests)} requests; the point-in-time join is broken")
    aligned = features.set_index(ROW_ID).reindex(range(len(requests)))
    missing = int(aligned.index.difference(pd.Index(ids)).size)
    if missing:
        log.warning("the offline store returned no row for %d of %d requests; they get null features",
                    missing, len(requests))
    out = requests.copy()
    for column in feature_columns:
        out[column] = aligned[column].to_numpy()
    return out


def _utc_us(values: pd.Series) -> pd.Series:
    """UTC instants in microseconds (Spark reads no nanosecond timestamps; naive = UTC)."""
    return pd.to_datetime(values, utc=True).dt.as_unit("us")


def training_set(entity_rows: pd.DataFrame, feature_service: str, settings: Settings | None = None,
                 *, store: FeatureStore | None = None) -> pd.DataFrame:
    """Point-in-time correct features for each entity row: the one Feast historical read of the project.

    ``entity_rows`` needs the service's join keys (``user_id`` and/or ``item_id``) and an
    ``event_timestamp`` (the moment asked about; naive = UTC); other columns (labels, ...) are kept.
    Returns exactly one row per entity row, in the given order and index, with nulls where no
    feature row was valid at that time (unknown entity, nothing yet, or older than the view's TTL).
    The profile's offline store (DuckDB embedded, Spark in production) does the join in one query
    over all the service's views; a row id carried through it restores the order.
    """
    store = store or get_store(settings)
    views = service_views(store, feature_service)
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
        return with_dtypes(attach_by_row_id(entity_rows, pd.DataFrame(columns=[ROW_ID, *feature_columns]),
                                            feature_columns), views)

    request = pd.DataFrame({key: entity_rows[key].astype(str).to_numpy() for key in keys})
    request[ENTITY_TIMESTAMP] = _utc_us(entity_rows[ENTITY_TIMESTAMP]).to_numpy()
    request[ROW_ID] = np.arange(len(request), dtype=np.int64)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # Feast prints progress; the task log gets the summary
        features = store.get_historical_features(
            entity_df=request, features=store.get_feature_service(feature_service, allow_cache=True)).to_df()
    del request
    log.info("%s: %d point-in-time rows from the %s offline store in %.1fs", feature_service, len(entity_rows),
             store.config.offline_store.type, time.perf_counter() - started)
    return with_dtypes(attach_by_row_id(entity_rows, features, feature_columns), views)


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


def _snapshot_day_before(ts: str) -> str:
    """The snapshot valid at ``ts``: the one of the UTC day before (rows are stamped at the day's end)."""
    return (to_utc(ts).floor("D") - pd.Timedelta(days=1)).date().isoformat()


def snapshot_rows(day: str, columns: dict[str, list[str]] | None = None
                  ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The user and item feature rows of one daily snapshot (``None`` where the store has no such partition);
    ``columns`` limits what is read, per table."""
    from pipeline_tasks.online.feature_store import offline_table_dir

    out: list[pd.DataFrame | None] = []
    for table in ("user_features", "item_features"):
        part = offline_table_dir(table) / f"snapshot_date={day}"
        wanted = (columns or {}).get(table)
        out.append(pd.read_parquet(part, columns=wanted) if part.exists() else None)
    return out[0], out[1]


def snapshot_at(moment: pd.Timestamp) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The feature rows valid at ``moment``: the snapshot of the UTC day before (what the online store serves)."""
    return snapshot_rows(_snapshot_day_before(str(moment)))
