"""Request-time context features: one pure function shared by training-set assembly and serving.

The feature tables (``pipeline_tasks.features.snapshots``) describe a user or an item as of the end of a
day; this module adds what only the request knows (its time, device and location) and the
user x item cross features, from the same rows in both places, so training and serving cannot
drift apart. pandas/numpy only: no Spark, no Feast.

Output columns (:data:`CONTEXT_FEATURE_COLUMNS`, all float64, one row per request, the requests'
index):

- ``hour_sin``, ``hour_cos``: the UTC time of day on a circle (24 h period, minutes included),
  so 23:59 and 00:01 are neighbours. NaN when the request time is unknown.
- ``weekday_sin``, ``weekday_cos``: the UTC day of the week on a circle (Monday = 0, 7-day period).
- ``device_mobile``, ``device_desktop``, ``device_tablet``, ``device_other``: one-hot of the
  device, trimmed and lower-cased; anything else, empty or null is ``other`` (exactly one is 1).
- ``location_known``: 1 when the request has a non-empty location, else 0.
- ``user_category_share``: the user's share of interactions in the item's category, from
  ``user_top{1,2,3}_category`` / ``_share``; 0 when the category is not among them or unknown.
- ``item_age_days_at_request``: ``item_age_days`` moved forward from its row's
  ``event_timestamp`` to the request time (never negative); NaN when the item row is missing.
- ``user_days_since_last_event_at_request``: the same for ``user_days_since_last_event``.

A row's ``event_timestamp`` is used when the row carries one (Feast can return it); without it
the row is taken to be the daily snapshot valid at the request, i.e. the one whose
``event_timestamp`` is the request's UTC midnight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.online.arrays import utc_ns

REQUEST_TIMESTAMP = "request_timestamp"
DEVICES = ("mobile", "desktop", "tablet")  # anything else is "other"
TOP_CATEGORIES = 3
# The feature-row columns context_features reads (besides an optional event_timestamp).
CONTEXT_USER_COLUMNS = [*(f"user_top{k}_{part}" for k in range(1, TOP_CATEGORIES + 1)
                          for part in ("category", "share")), "user_days_since_last_event"]
CONTEXT_ITEM_COLUMNS = ["item_category", "item_age_days"]
SECONDS_PER_DAY = 86_400.0
HOURS_PER_DAY = 24.0
DAYS_PER_WEEK = 7.0

CONTEXT_FEATURE_COLUMNS = [
    "hour_sin", "hour_cos", "weekday_sin", "weekday_cos",
    *(f"device_{d}" for d in DEVICES), "device_other",
    "location_known", "user_category_share",
    "item_age_days_at_request", "user_days_since_last_event_at_request",
]


Rows = pd.DataFrame | Mapping[str, np.ndarray]  # columns by name, aligned by position


def column_array(values: pd.Series | np.ndarray) -> np.ndarray:
    """A column as a numpy array; timezone-aware timestamps become naive UTC ``datetime64[ns]`` (pandas would give
    an object array of Timestamps)."""
    if isinstance(values, pd.Series):
        if isinstance(values.dtype, pd.DatetimeTZDtype):
            return utc_ns(values).view("datetime64[ns]")
        return values.to_numpy()
    return np.asarray(values)


def _column(rows: pd.DataFrame | Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """``rows[name]`` as an array (by position), or an all-null column when ``rows`` lacks it."""
    if name in rows:
        return column_array(rows[name])
    return np.full(n, None, dtype=object)


def _all_null(values: np.ndarray) -> bool:
    return values.dtype == object and bool(pd.isna(values).all())


_NAT = np.iinfo(np.int64).min
_DAY_NS = 86_400 * 10**9


def _ns_of(values: np.ndarray) -> np.ndarray:
    """UTC timestamps as int64 nanoseconds (naive = UTC; unparseable or null: the NaT sentinel); strings and
    Timestamps are parsed once per distinct value."""
    if values.dtype.kind == "M":
        return values.astype("datetime64[ns]").view(np.int64)  # NaT is the sentinel already
    if not len(values) or _all_null(values):
        return np.full(len(values), _NAT, dtype=np.int64)
    codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)
    stamps = pd.to_datetime(pd.Series(uniques, dtype=object), utc=True, errors="coerce")
    ns = np.append(stamps.array.as_unit("ns").asi8 if isinstance(stamps.dtype, pd.DatetimeTZDtype)
                   else np.full(len(uniques), _NAT, dtype=np.int64), [_NAT])
    return ns[np.where(codes >= 0, codes, len(uniques))]


def _strings(values: np.ndarray, fn: Any) -> np.ndarray:
    """Each value as a string passed through ``fn`` (None for nulls), computed once per distinct value."""
    if _all_null(values):
        return np.full(len(values), None, dtype=object)
    codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)
    mapped = np.array([fn(str(v)) for v in uniques] + [None], dtype=object)
    return mapped[np.where(codes >= 0, codes, len(uniques))]


def _per_value(values: np.ndarray, fn: Any) -> np.ndarray:
    """``fn`` of each value (None for nulls), computed once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    mapped = np.array([fn(v) for v in uniques] + [fn(None)], dtype=object)
    return mapped[np.where(codes >= 0, codes, len(uniques))]


def _numbers(values: np.ndarray) -> np.ndarray:
    """Values as float64 (unparseable or null: NaN)."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    if _all_null(values):
        return np.full(len(values), np.nan)
    return np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=np.float64)


def _age_at_request(age_days: np.ndarray, row_ts: np.ndarray, request_ns: np.ndarray) -> np.ndarray:
    """A day count of a snapshot row moved forward to the request time (clipped at 0)."""
    row_ns = _ns_of(row_ts)
    midnight = np.floor_divide(request_ns, _DAY_NS) * _DAY_NS
    row_ns = np.where(row_ns == _NAT, midnight, row_ns)
    elapsed = np.where(request_ns == _NAT, np.nan, (request_ns - row_ns) / 1e9) / SECONDS_PER_DAY
    return np.clip(_numbers(age_days) + elapsed, 0.0, None)


def context_features(requests: pd.DataFrame, user_rows: pd.DataFrame, item_rows: pd.DataFrame) -> pd.DataFrame:
    """Context and cross features of (request, user row, item row) triples.

    Args:
        requests: ``request_timestamp`` (UTC or naive UTC), ``device``, ``location`` (optional).
        user_rows: the ``user_features`` row of each request's user, aligned by position (same
            length); columns may be missing or null (an unknown user).
        item_rows: the ``item_features`` row of each request's item, aligned the same way.

    Returns:
        :data:`CONTEXT_FEATURE_COLUMNS` as float64, indexed like ``requests``.

    Raises:
        ValueError: the three frames do not have the same length.
    """
    n = len(requests)
    if len(user_rows) != n or len(item_rows) != n:
        raise ValueError(f"context_features: requests, user_rows and item_rows must be aligned; got lengths "
                         f"{n}, {len(user_rows)}, {len(item_rows)}")
    out = context_feature_arrays(requests, user_rows, item_rows, n)
    return pd.DataFrame(out, index=requests.index, copy=False)


def context_feature_arrays(requests: Rows, user_rows: Rows, item_rows: Rows, n: int,
                           query: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`context_features` as one float64 array per column, from frames or mappings of ``n``-long arrays
    (what a request assembles without building frames).

    With ``query`` (each row's query as a code ``0..q-1``), ``requests`` and ``user_rows`` hold one row per query
    instead: what depends on the request and the user alone is computed once per query, then given to its rows
    (the same values as row by row)."""
    m = n if query is None else (int(query.max()) + 1 if len(query) else 0)

    def rows(values: np.ndarray) -> np.ndarray:
        return values if query is None else values[query]

    out: dict[str, np.ndarray] = {}
    ts_q = _ns_of(_column(requests, REQUEST_TIMESTAMP, m))
    missing_ts = ts_q == _NAT
    day = np.floor_divide(ts_q, _DAY_NS)
    seconds = np.where(missing_ts, np.nan, (ts_q - day * _DAY_NS) / 1e9)
    weekday = np.where(missing_ts, np.nan, ((day + 3) % 7).astype(float))  # 1970-01-01 was a Thursday (3)
    hour_angle = 2 * np.pi * seconds / SECONDS_PER_DAY
    weekday_angle = 2 * np.pi * weekday / DAYS_PER_WEEK
    out["hour_sin"], out["hour_cos"] = rows(np.sin(hour_angle)), rows(np.cos(hour_angle))
    out["weekday_sin"], out["weekday_cos"] = rows(np.sin(weekday_angle)), rows(np.cos(weekday_angle))

    device = _strings(_column(requests, "device", m), lambda v: v.strip().lower())
    known_device = np.zeros(m, dtype=bool)
    for name in DEVICES:
        hit = device == name
        out[f"device_{name}"] = rows(hit.astype(float))
        known_device |= hit
    out["device_other"] = rows((~known_device).astype(float))

    location = _strings(_column(requests, "location", m), lambda v: v.strip())
    out["location_known"] = rows(_per_value(location, lambda v: v is not None and len(v) > 0).astype(float))

    category = _strings(_column(item_rows, "item_category", n), lambda v: v)
    has_category = _per_value(category, lambda v: v is not None).astype(bool)
    share = np.zeros(n, dtype=float)
    for k in range(1, TOP_CATEGORIES + 1):
        top = rows(_strings(_column(user_rows, f"user_top{k}_category", m), lambda v: v))
        match = (top == category) & has_category
        if not match.any():
            continue
        value = rows(_numbers(_column(user_rows, f"user_top{k}_share", m)))
        share = np.where(match, np.where(np.isnan(value), 0.0, value), share)
    out["user_category_share"] = share

    ts = rows(ts_q)
    out["item_age_days_at_request"] = _age_at_request(
        _column(item_rows, "item_age_days", n), _column(item_rows, "event_timestamp", n), ts)
    out["user_days_since_last_event_at_request"] = rows(_age_at_request(
        _column(user_rows, "user_days_since_last_event", m), _column(user_rows, "event_timestamp", m), ts_q))
    return {c: np.asarray(out[c], dtype="float64") for c in CONTEXT_FEATURE_COLUMNS}
