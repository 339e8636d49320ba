"""context_features: the request-time features shared by training and serving (pure pandas)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.online.context_features import CONTEXT_FEATURE_COLUMNS, context_features


def _requests(times: list, device: list | None = None, location: list | None = None, **kw) -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame({"request_timestamp": times, "device": device or ["mobile"] * n,
                         "location": location or ["US"] * n}, **kw)


def _empty_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(index=range(n))


def _features(times: list, **kw) -> pd.DataFrame:
    return context_features(_requests(times, **kw), _empty_rows(len(times)), _empty_rows(len(times)))


def _point(row: pd.Series, prefix: str) -> np.ndarray:
    return np.array([row[f"{prefix}_sin"], row[f"{prefix}_cos"]])


def test_columns_dtypes_and_index() -> None:
    req = _requests(["2025-01-06T08:00:00Z", "2025-01-07T20:30:00Z"], index=[10, 42])
    out = context_features(req, _empty_rows(2), _empty_rows(2))
    assert list(out.columns) == CONTEXT_FEATURE_COLUMNS
    assert (out.dtypes == "float64").all()
    assert list(out.index) == [10, 42]


def test_hour_is_cyclical() -> None:
    out = _features(["2025-01-06T00:00:00Z", "2025-01-06T23:00:00Z", "2025-01-06T12:00:00Z",
                     "2025-01-06T23:59:00Z", "2025-01-07T00:01:00Z", "2025-01-06T06:00:00Z"])
    midnight, eleven_pm, noon, before, after, six = (_point(out.iloc[i], "hour") for i in range(6))
    np.testing.assert_allclose(midnight, [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(six, [1.0, 0.0], atol=1e-12)
    # 23:00 is one hour from midnight on the circle, noon is twelve.
    assert np.linalg.norm(midnight - eleven_pm) == pytest.approx(2 * np.sin(np.pi / 24))
    assert np.linalg.norm(midnight - eleven_pm) < np.linalg.norm(midnight - noon) / 3
    assert np.linalg.norm(before - after) < 0.01  # 23:59 and 00:01 are neighbours


def test_weekday_is_cyclical_and_utc() -> None:
    # Sunday 23:30 in New York is Monday 04:30 UTC: the features use UTC.
    ny = pd.Timestamp("2025-01-05T23:30:00", tz="America/New_York")
    out = _features([pd.Timestamp("2025-01-06T04:30:00Z"), ny, pd.Timestamp("2025-01-12T12:00:00Z")])
    monday, ny_row, sunday = (out.iloc[i] for i in range(3))
    np.testing.assert_allclose(_point(monday, "weekday"), [0.0, 1.0], atol=1e-12)
    pd.testing.assert_series_equal(monday, ny_row, check_names=False)
    assert np.linalg.norm(_point(monday, "weekday") - _point(sunday, "weekday")) == pytest.approx(
        2 * np.sin(np.pi / 7))


def test_naive_timestamps_are_utc() -> None:
    out = _features([pd.Timestamp("2025-01-06T06:00:00"), pd.Timestamp("2025-01-06T06:00:00Z")])
    pd.testing.assert_series_equal(out.iloc[0], out.iloc[1], check_names=False)


def test_device_one_hot() -> None:
    out = _features(["2025-01-06T08:00:00Z"] * 6, device=["mobile", " Desktop ", "TABLET", "tv", "", None])
    hot = out[["device_mobile", "device_desktop", "device_tablet", "device_other"]].to_numpy()
    np.testing.assert_array_equal(hot, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1],
                                        [0, 0, 0, 1]])


def test_location_known() -> None:
    out = _features(["2025-01-06T08:00:00Z"] * 4, location=["US", "", "  ", None])
    assert out["location_known"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_missing_request_columns() -> None:
    out = context_features(pd.DataFrame({"request_timestamp": [pd.Timestamp("2025-01-06T08:00:00Z")]}),
                           _empty_rows(1), _empty_rows(1))
    assert out.loc[0, "device_other"] == 1.0 and out.loc[0, "location_known"] == 0.0


def test_user_category_share() -> None:
    users = pd.DataFrame({
        "user_top1_category": ["a", "a", "a", None, "a"],
        "user_top2_category": ["b", "b", None, None, "b"],
        "user_top3_category": ["c", None, None, None, None],
        "user_top1_share": [0.5, 0.7, 1.0, np.nan, 0.6],
        "user_top2_share": [0.3, 0.3, np.nan, np.nan, 0.4],
        "user_top3_share": [0.2, np.nan, np.nan, np.nan, np.nan],
    })
    items = pd.DataFrame({"item_category": ["c", "b", "z", "a", None]})
    out = context_features(_requests(["2025-01-06T08:00:00Z"] * 5), users, items)
    assert out["user_category_share"].tolist() == [0.2, 0.3, 0.0, 0.0, 0.0]


def test_ages_move_forward_to_the_request() -> None:
    req = _requests(["2025-01-06T12:00:00Z", "2025-01-06T18:00:00Z"])
    items = pd.DataFrame({"item_age_days": [10.0, 3.0],
                          "event_timestamp": [pd.Timestamp("2025-01-06T00:00:00Z"), pd.NaT]})
    users = pd.DataFrame({"user_days_since_last_event": [0.25, 1.0],
                          "event_timestamp": pd.to_datetime(["2025-01-05T00:00:00Z", "2025-01-06T00:00:00Z"])})
    out = context_features(req, users, items)
    # Row 0: snapshot at midnight, request at noon. Row 1: no event_timestamp -> the request's midnight.
    assert out["item_age_days_at_request"].tolist() == [10.5, 3.75]
    assert out["user_days_since_last_event_at_request"].tolist() == [1.75, 1.75]


def test_ages_without_event_timestamp_column() -> None:
    items = pd.DataFrame({"item_age_days": [2.0]})
    out = context_features(_requests(["2025-01-06T06:00:00Z"]), _empty_rows(1), items)
    assert out.loc[0, "item_age_days_at_request"] == 2.25


def test_null_rows() -> None:
    """An unknown user / item (all-null feature rows) and a null request time: no error, defined values."""
    users = pd.DataFrame({"user_top1_category": [None, None], "user_top1_share": [np.nan, np.nan],
                          "user_days_since_last_event": [np.nan, np.nan], "event_timestamp": [pd.NaT, pd.NaT]})
    items = pd.DataFrame({"item_category": [None, None], "item_age_days": [None, np.nan],
                          "event_timestamp": [pd.NaT, pd.NaT]})
    out = context_features(_requests([pd.Timestamp("2025-01-06T08:00:00Z"), None], device=[None, None],
                                     location=[None, None]), users, items)
    assert out["user_category_share"].tolist() == [0.0, 0.0]
    assert out[["item_age_days_at_request", "user_days_since_last_event_at_request"]].isna().all().all()
    assert out.loc[1, ["hour_sin", "hour_cos", "weekday_sin", "weekday_cos"]].isna().all()
    assert out.loc[0, ["hour_sin", "hour_cos"]].notna().all()
    assert out["device_other"].tolist() == [1.0, 1.0]


def test_aligned_by_position_not_index() -> None:
    req = _requests(["2025-01-06T08:00:00Z", "2025-01-06T09:00:00Z"], index=["r1", "r2"])
    users = pd.DataFrame({"user_top1_category": ["a", "b"], "user_top1_share": [0.4, 0.9]}, index=[7, 3])
    items = pd.DataFrame({"item_category": ["a", "b"]}, index=[5, 1])
    out = context_features(req, users, items)
    assert out["user_category_share"].tolist() == [0.4, 0.9]


def test_empty_and_misaligned() -> None:
    out = context_features(_requests([]), _empty_rows(0), _empty_rows(0))
    assert out.empty and list(out.columns) == CONTEXT_FEATURE_COLUMNS
    with pytest.raises(ValueError, match="aligned"):
        context_features(_requests(["2025-01-06T08:00:00Z"]), _empty_rows(2), _empty_rows(1))
