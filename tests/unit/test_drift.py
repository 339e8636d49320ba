"""Drift check behaviour with real Evidently: shifted windows are flagged on the shifted feature,
a clean newest window is not, ``mode="fail"`` raises after writing the report.

Every window comes from the synthetic generator and the time split, as in the training DAG:
reference = train window, current = test window (the newest), with one shift applied to it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core import constants
from pipeline_tasks.data.split import SplitConfig, time_split
from pipeline_tasks.data.synthetic import SyntheticConfig, generate
from pipeline_tasks.evaluation.drift import (
    FEATURES,
    MISSING,
    DriftConfig,
    DriftError,
    drift_check,
    event_features,
    extra_feature_columns,
    item_counts,
    skip_reason,
    user_day_activity,
)

# 8 full weeks; the test window (newest 10 %) holds about 3,000 events, the train window 24,000.
SMALL = SyntheticConfig(n_users=500, n_items=1000, n_days=56, n_events=30_000)
THRESHOLD = DriftConfig().threshold


class Windows:
    """Train (reference) and test (newest) windows of one synthetic run, plus its items."""

    def __init__(self, config: SyntheticConfig) -> None:
        data = generate(config)
        windows = time_split(data.tables.interactions, SplitConfig())
        self.reference, self.current, self.items = windows["train"], windows["test"], data.tables.items


@pytest.fixture(scope="module")
def base() -> Windows:
    return Windows(SMALL)


def run(windows: Windows, current: pd.DataFrame, out_dir: Path, **config: Any) -> tuple[dict, dict]:
    """Run the check; return its result and the JSON report it wrote."""
    out = drift_check(windows.reference, current, windows.items, out_dir, DriftConfig(**config))
    return out, json.loads(Path(out["report_json"]).read_text())


def psi_table(report: dict) -> str:
    """The PSI of every feature, for assertion messages."""
    return ", ".join(f"{name}={f['psi']:.3f}" for name, f in report["features"].items())


def popular_to_tail(reference: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The newest window with item ids remapped by reversed reference popularity: the most popular
    item's events go to the least popular item, and so on."""
    ranked = item_counts(reference).index.to_numpy()
    mapping = dict(zip(ranked, ranked[::-1], strict=True))
    out = current.copy()
    out[constants.ITEM_ID] = out[constants.ITEM_ID].map(mapping).fillna(out[constants.ITEM_ID])
    return out


def shift_by_one_sd(reference: pd.DataFrame, current: pd.DataFrame, feature: str) -> pd.DataFrame:
    """The newest window with ``value`` or the hour of day moved up by one reference standard deviation."""
    out = current.copy()
    if feature == "value":
        out[constants.VALUE] = out[constants.VALUE] + reference[constants.VALUE].std()
    else:
        ts = reference[constants.TIMESTAMP]
        hour_sd = (ts.dt.hour + ts.dt.minute / 60).std()
        out[constants.TIMESTAMP] = out[constants.TIMESTAMP] + pd.Timedelta(hours=float(hour_sd))
    return out


def views_reported_as_clicks(current: pd.DataFrame, share: float = 0.4) -> pd.DataFrame:
    """The newest window with ``share`` of its views relabelled as clicks (a tracking change)."""
    out = current.copy()
    views = np.flatnonzero((out[constants.EVENT_TYPE] == "view").to_numpy())
    relabel = np.random.default_rng(0).choice(views, int(share * len(views)), replace=False)
    out.loc[relabel, constants.EVENT_TYPE] = "click"
    return out


# --- features, without Evidently -------------------------------------------------------------------

def test_event_features_are_derived_per_event():
    interactions = pd.DataFrame({
        "user_id": ["u1", "u1", "u2"],
        "item_id": ["i1", "i9", "i2"],
        "timestamp": pd.to_datetime(["2025-01-01T13:30:00Z", "2025-01-01T00:00:00Z", "2025-01-02T23:45:00Z"]),
        "event_type": ["view", "click", "purchase"],
        "value": [None, None, 9.5],
        "device": ["mobile", None, " "],
    })
    items = pd.DataFrame({"item_id": ["i1", "i2"], "category": ["books", None]})
    popularity = pd.Series({"i1": 9, "i2": 1})
    f = event_features(interactions, items, popularity)
    assert f["event_type"].tolist() == ["view", "click", "purchase"]
    assert f["device"].tolist() == ["mobile", MISSING, MISSING]
    assert f["category"].tolist() == ["books", MISSING, MISSING]  # i9 is not in the items table
    assert f["hour"].tolist() == [13.5, 0.0, 23.75]
    assert f["value"].isna().tolist() == [True, True, False]
    # Popularity is looked up in the reference counts; an item absent there (new) is left out.
    assert f["item_popularity"].iloc[0] == pytest.approx(np.log1p(9))
    assert np.isnan(f["item_popularity"].iloc[1])


def test_user_activity_is_one_row_per_user_day():
    interactions = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2"],
        "timestamp": pd.to_datetime(["2025-01-01T01:00Z", "2025-01-01T23:59Z", "2025-01-02T00:00Z",
                                     "2025-01-01T12:00Z"]),
    })
    counts = np.expm1(user_day_activity(interactions)["user_activity"]).round().astype(int)
    assert sorted(counts.tolist()) == [1, 1, 2]  # u1 on Jan 1, u1 on Jan 2, u2 on Jan 1


def test_features_without_values_are_not_monitored():
    """MovieLens has no device; a window may have no values: such features are reported as skipped."""
    nulls = pd.Series([MISSING, np.nan], dtype=object)
    assert skip_reason(nulls, nulls, "categorical") == "null in both windows"
    assert skip_reason(nulls, pd.Series(["mobile"]), "categorical") is None  # appearing is drift
    assert skip_reason(pd.Series([1.0]), pd.Series([np.nan]), "numeric") == "no values in the current window"
    assert skip_reason(pd.Series([1.0]), pd.Series([2.0]), "numeric") is None


@pytest.mark.parametrize("kwargs", [{"mode": "raise"}, {"threshold": 0}, {"max_rows": 0}])
def test_config_rejects_bad_values(kwargs: dict):
    with pytest.raises(ValueError, match="DriftConfig"):
        DriftConfig(**kwargs)


def test_empty_window_is_an_error(base: Windows, tmp_path: Path):
    with pytest.raises(ValueError, match="current window has no interactions"):
        drift_check(base.reference, base.current.iloc[:0], base.items, tmp_path, DriftConfig())


# --- drift, with Evidently -------------------------------------------------------------------------

def test_popularity_moving_to_other_items_is_flagged(base: Windows, tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline_tasks.evaluation.drift"):
        out, report = run(base, popular_to_tail(base.reference, base.current), tmp_path)
    assert "item_popularity" in out["flagged"], psi_table(report)
    assert report["features"]["item_popularity"]["flagged"]
    assert report["features"]["item_popularity"]["kind"] == "numeric"
    # The remap moves only items: when, who and what kind of event stay as they were.
    for name in ("event_type", "device", "hour", "value", "user_activity"):
        assert not report["features"][name]["flagged"], psi_table(report)
    # mode="warn": the result comes back and the warning names the feature with its PSI.
    assert report["mode"] == "warn"
    assert f"item_popularity (PSI {out['psi']['item_popularity']:.3f})" in caplog.text


def feature_snapshots(n: int, seed: int, ctr_shift: float = 0.0) -> pd.DataFrame:
    """Daily feature rows as the feature store would give them (an id, counts, a rate, a flag)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": [f"u{i}" for i in range(n)],  # an id: not monitored
        "user_total_interactions": rng.poisson(20, n).astype("int64"),
        "item_ctr": rng.beta(2, 20, n) + ctr_shift,
        "is_new": rng.random(n) < 0.1,  # boolean: not monitored
    })


def test_numeric_shift_of_one_sd_is_flagged(base: Windows, tmp_path: Path):
    """``value``, the hour of day and an extra feature (``item_ctr``) each moved by one SD.

    PSI is computed column by column, so the three shifts in one run do not mix.
    """
    current = shift_by_one_sd(base.reference, shift_by_one_sd(base.reference, base.current, "value"), "hour")
    extra_reference = feature_snapshots(4000, seed=1)
    extra_current = feature_snapshots(1000, seed=2, ctr_shift=float(extra_reference["item_ctr"].std()))
    out = drift_check(base.reference, current, base.items, tmp_path, DriftConfig(),
                      extra_reference=extra_reference, extra_current=extra_current)
    report = json.loads(Path(out["report_json"]).read_text())
    assert out["flagged"] == ["hour", "value", "item_ctr"], psi_table(report)
    assert set(report["features"]) == set(FEATURES) | {"user_total_interactions", "item_ctr"}
    assert {report["features"][f]["kind"] for f in out["flagged"]} == {"numeric"}
    assert report["sampled_rows"]["current"]["extra"] == 1000


def test_extra_columns_are_the_shared_numeric_ones():
    ref = feature_snapshots(10, seed=1).assign(only_in_reference=1.0, label="x")
    assert extra_feature_columns(ref, feature_snapshots(10, seed=2)) == {
        "user_total_interactions": "user_total_interactions", "item_ctr": "item_ctr"}
    # The feature store's item_popularity is not the drift check's own item_popularity.
    both = ref[["item_ctr"]].assign(item_popularity=0.5)
    assert extra_feature_columns(both, both) == {"item_ctr": "item_ctr", "item_popularity": "extra_item_popularity"}


@pytest.fixture(scope="module")
def event_mix_fail(base: Windows, tmp_path_factory: pytest.TempPathFactory) -> tuple[DriftError, Path]:
    """40 % of the newest window's views reported as clicks, checked with ``mode="fail"``."""
    out_dir = tmp_path_factory.mktemp("event_mix")
    with pytest.raises(DriftError) as caught:
        run(base, views_reported_as_clicks(base.current), out_dir, mode="fail")
    return caught.value, out_dir


def test_event_mix_shift_is_flagged(event_mix_fail: tuple[DriftError, Path]):
    _, out_dir = event_mix_fail
    report = json.loads((out_dir / "drift_report.json").read_text())
    assert report["flagged"] == ["event_type"], psi_table(report)
    assert report["features"]["event_type"]["kind"] == "categorical"


def test_fail_mode_raises_after_writing_the_report(event_mix_fail: tuple[DriftError, Path]):
    error, out_dir = event_mix_fail
    message = str(error)
    assert isinstance(error, RuntimeError)
    assert "event_type (PSI " in message and str(out_dir / "drift_report.html") in message
    assert "mode='warn'" in message  # says what to do
    assert json.loads((out_dir / "drift_report.json").read_text())["mode"] == "fail"
    assert (out_dir / "drift_report.html").stat().st_size > 100_000


@pytest.fixture(scope="module")
def clean(base: Windows, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The training DAG's own case: the newest window of unshifted data against the train window."""
    return run(base, base.current, tmp_path_factory.mktemp("clean"))


def test_clean_newest_window_is_not_flagged(base: Windows, clean: tuple[dict, dict]):
    """The training DAG's own case: the newest window of unshifted data against the train window."""
    out, report = clean
    assert out["flagged"] == [], psi_table(report)
    assert set(report["features"]) == set(FEATURES)
    assert report["reference_rows"] == len(base.reference) and report["current_rows"] == len(base.current)


def test_resample_with_another_seed_is_not_flagged(tmp_path: Path):
    """Another seed draws another catalogue, users and tastes from the same distributions; the
    reference and the newest window both come from that seed's run.

    (Seed 42's reference against seed 7's window would compare two catalogues whose popular items
    differ: item_popularity PSI above 3, rightly flagged.) Items do not arrive during the period
    here (``new_item_share=0``): with arrivals, a new item can become one of the most popular in
    the newest window and take over 10 % of its events, a real shift of category, value and
    popularity that the check is right to flag.
    """
    windows = Windows(replace(SMALL, seed=7, new_item_share=0.0))
    out, report = run(windows, windows.current, tmp_path)
    assert out["flagged"] == [], psi_table(report)
    assert max(out["psi"].values()) <= THRESHOLD, psi_table(report)


# --- the saved HTML report states the per-feature PSI threshold ------------------------------------

def banner(html: str) -> str:
    """The text of the banner the drift check puts right after ``<body>`` of Evidently's report."""
    match = re.search(r'<body[^>]*>\s*<div id="recsys-drift-banner"[^>]*>(.*?)</div></div>', html, flags=re.S)
    assert match, "no drift banner at the top of the report's body"
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", match.group(1))).split())


def counters(node: object) -> Iterator[dict]:
    """Every counter of Evidently's embedded dashboard data, depth first."""
    if isinstance(node, dict):
        yield from node.get("counters", []) if isinstance(node.get("counters"), list) else []
        for value in node.values():
            yield from counters(value)
    elif isinstance(node, list):
        for value in node:
            yield from counters(value)


def headline(html: str) -> str:
    """The label of Evidently's "Dataset Drift" headline counter."""
    match = re.search(r"var metric_[0-9a-f]+ = (\{.*?\});\n", html)
    assert match, "no embedded dashboard data in the HTML report"
    return next(c["label"] for c in counters(json.loads(match.group(1))) if c["value"] == "Dataset Drift")


def test_report_states_the_per_feature_threshold_and_the_drifted_feature(event_mix_fail: tuple[DriftError, Path]):
    _, out_dir = event_mix_fail
    html = (out_dir / "drift_report.html").read_text(encoding="utf-8")
    report = json.loads((out_dir / "drift_report.json").read_text())
    n, psi = len(report["features"]), report["features"]["event_type"]["psi"]
    assert banner(html).startswith(f"Per-feature PSI threshold {THRESHOLD}: 1 of {n} features drifted: "
                                   f"event_type (PSI {psi:.3f}).")
    # Evidently's headline: the share of features that must drift, labelled as such, not as a threshold.
    label = headline(html)
    assert label.startswith(f"Dataset Drift is detected: 1 of {n} features have PSI above {THRESHOLD}."), label
    assert f"drifted-column share {report['dataset_drift_share']}, i.e. 1 of {n}" in label
    assert "detection threshold is" not in html


def test_report_of_a_clean_window_says_none_drifted(clean: tuple[dict, dict]):
    out, report = clean
    html = Path(out["report_html"]).read_text(encoding="utf-8")
    n = len(report["features"])
    assert banner(html).startswith(f"Per-feature PSI threshold {THRESHOLD}: 0 of {n} features drifted.")
    assert headline(html).startswith(f"Dataset Drift is NOT detected: 0 of {n} features have PSI above {THRESHOLD}")
