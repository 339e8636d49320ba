"""Small array helpers of the request path: per-group positions and UTC nanoseconds without pandas frames."""

from __future__ import annotations

import numpy as np
import pandas as pd


def utc_ns(values: pd.Series) -> np.ndarray:
    """UTC timestamps (naive = UTC) as int64 nanoseconds."""
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values.dtype):
        return np.asarray(values.array.as_unit("ns").asi8)  # epoch ns are UTC whatever the zone; no parsing
    return pd.to_datetime(values, utc=True).dt.as_unit("ns").astype(np.int64).to_numpy()


def moment_ns(at: pd.Timestamp | str) -> int:
    """One moment (naive = UTC) as int64 UTC nanoseconds."""
    ts = pd.Timestamp(at)
    return int((ts.tz_convert("UTC") if ts.tzinfo is not None else ts).as_unit("ns").value)


def last_of(keys: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each key, in increasing position order."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    return np.sort(len(keys) - 1 - first_from_end)


def first_of(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each key, in increasing position order."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.unique(keys, return_index=True)[1])


def count_before(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same group (a cumcount)."""
    if not len(groups):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, len(groups)])
    out = np.empty(len(groups), dtype=np.int64)
    out[order] = np.arange(len(groups)) - np.repeat(starts, sizes)
    return out


def count_after(groups: np.ndarray) -> np.ndarray:
    """For each position, how many later positions hold the same group (a descending cumcount)."""
    if not len(groups):
        return np.zeros(0, dtype=np.int64)
    inverse = np.unique(groups, return_inverse=True)[1].ravel()
    return np.bincount(inverse)[inverse] - 1 - count_before(groups)
