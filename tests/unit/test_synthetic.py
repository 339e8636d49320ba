"""Behaviour of the synthetic generator: contract shape, realism claims, exact fault injection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core import constants
from pipeline_tasks.data.synthetic import (
    DEVICES,
    FAULT_CLASSES,
    FaultConfig,
    SyntheticConfig,
    SyntheticData,
    generate,
)

# 8 full weeks from a Monday: every weekday occurs equally often.
SMALL = SyntheticConfig(n_users=400, n_items=1000, n_days=56, n_events=30_000, n_categories=10)
DAY = pd.Timedelta(days=1)
KEY = [constants.USER_ID, constants.ITEM_ID, constants.TIMESTAMP, constants.EVENT_TYPE]


@pytest.fixture(scope="module")
def clean() -> SyntheticData:
    return generate(SMALL)


@pytest.fixture(scope="module")
def faulty() -> SyntheticData:
    return generate(replace(SMALL, faults=FaultConfig.all(rate=0.01)))


def _clean_rows(data: SyntheticData) -> pd.DataFrame:
    """Interactions without any injected fault row."""
    bad = np.concatenate([data.injected[name] for name in FAULT_CLASSES])
    df = data.tables.interactions
    return df.drop(index=df.index[bad]).reset_index(drop=True)


def _day(ts: pd.Series, start: str) -> pd.Series:
    return (ts - pd.Timestamp(start, tz="UTC")) // DAY


def _daily_counts(df: pd.DataFrame, cfg: SyntheticConfig) -> np.ndarray:
    day = _day(df[constants.TIMESTAMP], cfg.start)
    return np.bincount(day[(day >= 0) & (day < cfg.n_days)].astype(int), minlength=cfg.n_days)


def _spike_days(counts: np.ndarray) -> list[int]:
    """Days more than 3 sigma above the mean of their trailing 28 days (the contract rule)."""
    w = constants.DEFAULT_SPIKE_WINDOW_DAYS
    return [
        d for d in range(w, len(counts))
        if counts[d] > counts[d - w:d].mean() + constants.DEFAULT_SPIKE_SIGMA * counts[d - w:d].std()
    ]


def _rule_violations(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A small reference implementation of the contract's row rules (DATA_CONTRACT.md)."""
    user, item, ts = df[constants.USER_ID], df[constants.ITEM_ID], df[constants.TIMESTAMP]
    now = pd.Timestamp.now(tz="UTC")

    def bad_id(s: pd.Series) -> pd.Series:
        text = s.astype("string")
        broken = (text.str.strip() == "") | (text.str.len() > constants.ID_MAX_LEN) | text.str.contains(
            r"[\x00-\x1f\x7f]", regex=True
        )
        return s.notna() & broken.fillna(False).astype(bool)

    as_of = ts[ts <= now].max()
    day = ts.dt.floor("D")
    per_user_day = df.assign(_day=day).groupby([constants.USER_ID, "_day"])[constants.USER_ID].transform("size")
    rules = {
        "null": user.isna() | item.isna() | ts.isna(),
        "duplicate": df.duplicated(subset=KEY, keep="first"),
        "future": ts > now,
        "too_old": ts < as_of - pd.Timedelta(days=constants.DEFAULT_HORIZON_DAYS),
        "unknown_event": ~df[constants.EVENT_TYPE].isin(constants.EVENT_TYPES),
        "bad_id": bad_id(user) | bad_id(item),
        "bot": per_user_day.fillna(0) > constants.DEFAULT_BOT_EVENTS_PER_DAY,
    }
    return {name: np.flatnonzero(mask.to_numpy()) for name, mask in rules.items()}


# --- contract shape -------------------------------------------------------------------------


def test_tables_have_contract_columns_and_types(clean: SyntheticData) -> None:
    t = clean.tables
    assert list(t.interactions.columns[:7]) == constants.INTERACTION_COLUMNS
    assert list(t.items.columns) == constants.ITEM_COLUMNS
    assert list(t.users.columns) == constants.USER_COLUMNS
    assert str(t.interactions[constants.TIMESTAMP].dtype) == "datetime64[ns, UTC]"
    assert str(t.items["created_at"].dtype) == "datetime64[ns, UTC]"
    assert t.interactions[constants.VALUE].dtype == np.float64
    assert t.interactions[KEY].notna().all().all()
    assert set(t.interactions[constants.EVENT_TYPE]) == set(constants.EVENT_TYPES)


def test_ids_are_formatted_strings_and_all_referenced_ids_exist(clean: SyntheticData) -> None:
    t = clean.tables
    assert t.interactions[constants.USER_ID].str.fullmatch(r"u\d{6}").all()
    assert t.interactions[constants.ITEM_ID].str.fullmatch(r"i\d{6}").all()
    assert t.users[constants.USER_ID].is_unique and t.items[constants.ITEM_ID].is_unique
    assert set(t.interactions[constants.USER_ID]) <= set(t.users[constants.USER_ID])
    assert set(t.interactions[constants.ITEM_ID]) <= set(t.items[constants.ITEM_ID])
    assert (len(t.users), len(t.items)) == (SMALL.n_users, SMALL.n_items)


def test_clean_event_count_close_to_config(clean: SyntheticData) -> None:
    assert len(clean.tables.interactions) == pytest.approx(SMALL.n_events, rel=0.03)
    assert all(len(clean.injected[name]) == 0 for name in FAULT_CLASSES)
    assert len(clean.injected["spike_day"]) == 0


def test_users_table(clean: SyntheticData) -> None:
    users = clean.tables.users
    assert users["age"].between(16, 80).all()
    assert set(users["gender"]) <= {"F", "M", "X"}
    assert users["occupation"].notna().all()
    assert users["zip"].str.fullmatch(r"\d{5}").all()
    assert users[constants.LOCATION].str.fullmatch(r"[A-Z]{2}").all()


def test_items_table(clean: SyntheticData) -> None:
    items = clean.tables.items
    assert items["category"].str.fullmatch(r"cat_\d{2}").all()
    assert items["category"].nunique() == SMALL.n_categories
    assert (items["genres"].str.split("|").str[0] == items["category"]).all()
    assert (items["genres"].str.count(r"\|") > 0).any()
    assert (items["price"] > 0).all()
    assert items["available"].dtype == bool and items["available"].mean() > 0.9
    assert items["title"].str.len().gt(0).all()


# --- realism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2])
def test_item_popularity_is_zipf_like(alpha: float) -> None:
    data = SMALL if alpha == SMALL.zipf_alpha else replace(SMALL, zipf_alpha=alpha)
    df = generate(data).tables.interactions
    counts = np.sort(df[constants.ITEM_ID].value_counts().to_numpy())[::-1]
    head = SMALL.n_items // 10
    ranks = np.arange(1, head + 1)
    slope = np.polyfit(np.log(ranks), np.log(counts[:head]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.25)


def test_users_view_mostly_their_favourite_categories(clean: SyntheticData) -> None:
    df = clean.tables.interactions
    views = df[df[constants.EVENT_TYPE] == "view"].merge(clean.tables.items[[constants.ITEM_ID, "category"]])
    views = views[views.groupby(constants.USER_ID)[constants.USER_ID].transform("size") >= 20]

    def mean_top_share(v: pd.DataFrame) -> float:
        shares = v.groupby(constants.USER_ID)["category"].value_counts(normalize=True)
        return float(shares.groupby(level=0).max().mean())

    rng = np.random.default_rng(0)
    shuffled = views.assign(category=rng.permutation(views["category"].to_numpy()))
    assert mean_top_share(views) > 3.0 / SMALL.n_categories
    assert mean_top_share(views) > mean_top_share(shuffled) + 0.15


def test_funnel_order_and_counts(clean: SyntheticData) -> None:
    df = clean.tables.interactions
    counts = df[constants.EVENT_TYPE].value_counts()
    funnel = [counts[e] for e in constants.FUNNEL]
    assert all(a > b for a, b in zip(funnel, funnel[1:], strict=False))
    parents = {"click": "view", "add_to_cart": "click", "purchase": "add_to_cart", "favorite": "view"}
    pair = [constants.USER_ID, constants.ITEM_ID]
    for child, parent in parents.items():
        first_parent = df[df[constants.EVENT_TYPE] == parent].groupby(pair)[constants.TIMESTAMP].min()
        kids = df[df[constants.EVENT_TYPE] == child].join(first_parent.rename("parent_ts"), on=pair)
        assert kids["parent_ts"].notna().all(), f"{child} without a {parent}"
        assert (kids["parent_ts"] <= kids[constants.TIMESTAMP]).all(), f"{child} before its {parent}"
    assert 0 < counts["favorite"] < 0.1 * counts["view"]


def test_value_device_and_location(clean: SyntheticData) -> None:
    df = clean.tables.interactions.merge(clean.tables.items[[constants.ITEM_ID, "price"]])
    priced = df[constants.EVENT_TYPE].isin(["add_to_cart", "purchase"])
    assert (df.loc[priced, constants.VALUE] == df.loc[priced, "price"]).all()
    assert df.loc[~priced, constants.VALUE].isna().all()
    assert set(df[constants.DEVICE]) <= set(DEVICES)
    assert (df.groupby(constants.USER_ID)[constants.DEVICE].nunique() == 1).all()
    home = clean.tables.users.set_index(constants.USER_ID)[constants.LOCATION]
    assert (df[constants.LOCATION] == df[constants.USER_ID].map(home)).all()


def test_hour_of_day_peaks_in_the_evening(clean: SyntheticData) -> None:
    hours = np.bincount(clean.tables.interactions[constants.TIMESTAMP].dt.hour, minlength=24)
    assert 18 <= int(np.argmax(hours)) <= 22
    assert hours[2:6].max() < 0.3 * hours.max()


@pytest.mark.parametrize("boost", [1.3, 1.7])
def test_weekend_volume_ratio(clean: SyntheticData, boost: float) -> None:
    cfg = replace(SMALL, weekend_boost=boost)
    df = clean.tables.interactions if cfg == SMALL else generate(cfg).tables.interactions
    counts = _daily_counts(df, cfg)
    weekend = pd.date_range(cfg.start, periods=cfg.n_days).dayofweek >= 5
    assert counts[weekend].mean() / counts[~weekend].mean() == pytest.approx(boost, abs=0.1)


def test_new_items_arrive_over_time_and_never_before_their_events(clean: SyntheticData) -> None:
    items = clean.tables.items
    start = pd.Timestamp(SMALL.start, tz="UTC")
    end = start + SMALL.n_days * DAY
    new = items[items["created_at"] > start]
    assert len(new) == round(SMALL.new_item_share * SMALL.n_items)
    assert new["created_at"].min() < start + 0.25 * (end - start)
    assert new["created_at"].max() > start + 0.75 * (end - start)
    df = clean.tables.interactions.merge(items[[constants.ITEM_ID, "created_at"]])
    assert (df[constants.TIMESTAMP] >= df["created_at"]).all()
    assert df[constants.ITEM_ID].isin(new[constants.ITEM_ID]).sum() > 0
    assert df[constants.TIMESTAMP].between(start, end, inclusive="left").all()


def test_no_natural_volume_spike(clean: SyntheticData) -> None:
    assert _spike_days(_daily_counts(clean.tables.interactions, SMALL)) == []


# --- determinism ------------------------------------------------------------------------------


def test_same_config_gives_identical_frames(clean: SyntheticData) -> None:
    again = generate(SMALL)
    for name in constants.TABLES:
        pd.testing.assert_frame_equal(getattr(clean.tables, name), getattr(again.tables, name))


def test_different_seed_gives_different_data(clean: SyntheticData) -> None:
    other = generate(replace(SMALL, seed=SMALL.seed + 1))
    assert not clean.tables.interactions.head(1000).equals(other.tables.interactions.head(1000))
    assert not clean.tables.items.equals(other.tables.items)


# --- faults -----------------------------------------------------------------------------------


def test_fault_config_all_turns_every_fault_on() -> None:
    f = FaultConfig.all(rate=0.02)
    assert all(getattr(f, x.name) == 0.02 for x in fields(f) if x.name.endswith("_rate"))
    assert f.bot and f.spike


def test_each_fault_is_found_by_its_contract_rule_exactly(faulty: SyntheticData) -> None:
    found = _rule_violations(faulty.tables.interactions)
    for name in FAULT_CLASSES:
        assert len(faulty.injected[name]) > 0, name
        np.testing.assert_array_equal(found[name], faulty.injected[name], err_msg=name)


def test_fault_rows_are_extra_rows(faulty: SyntheticData) -> None:
    n_faults = sum(len(faulty.injected[name]) for name in FAULT_CLASSES)
    n_clean = len(faulty.tables.interactions) - n_faults
    assert n_faults == len(np.unique(np.concatenate([faulty.injected[n] for n in FAULT_CLASSES])))
    for name in ("null", "future", "too_old", "unknown_event", "bad_id"):
        assert len(faulty.injected[name]) == pytest.approx(0.01 * n_clean, rel=0.1), name


def test_null_faults_cycle_over_the_three_columns(faulty: SyntheticData) -> None:
    rows = faulty.tables.interactions.iloc[faulty.injected["null"]]
    assert all(rows[c].isna().sum() > 0 for c in (constants.USER_ID, constants.ITEM_ID, constants.TIMESTAMP))
    assert (rows[[constants.USER_ID, constants.ITEM_ID, constants.TIMESTAMP]].isna().sum(axis=1) == 1).all()


def test_duplicates_follow_their_original(faulty: SyntheticData) -> None:
    df = faulty.tables.interactions
    pos = faulty.injected["duplicate"]
    pd.testing.assert_frame_equal(
        df.iloc[pos].reset_index(drop=True), df.iloc[pos - 1].reset_index(drop=True)
    )


def test_future_and_too_old_do_not_depend_on_the_wall_clock(faulty: SyntheticData) -> None:
    df = faulty.tables.interactions
    start = pd.Timestamp(SMALL.start, tz="UTC")
    assert (df[constants.TIMESTAMP].iloc[faulty.injected["future"]].dt.year >= 2100).all()
    cutoff = start - pd.Timedelta(days=constants.DEFAULT_HORIZON_DAYS + 30)
    assert (df[constants.TIMESTAMP].iloc[faulty.injected["too_old"]] < cutoff).all()


def test_bad_ids_cover_every_kind(faulty: SyntheticData) -> None:
    rows = faulty.tables.interactions.iloc[faulty.injected["bad_id"]]
    values = set(rows[constants.USER_ID]) | set(rows[constants.ITEM_ID])
    assert {"", "   ", "u\x07x"} <= values
    assert any(isinstance(v, str) and len(v) > constants.ID_MAX_LEN for v in values)


def test_bot_is_one_user_on_one_day_with_normal_days_kept(faulty: SyntheticData) -> None:
    df = faulty.tables.interactions
    bot = df.iloc[faulty.injected["bot"]]
    assert len(bot) == FaultConfig().bot_events > constants.DEFAULT_BOT_EVENTS_PER_DAY
    assert bot[constants.USER_ID].nunique() == 1
    assert bot[constants.TIMESTAMP].dt.floor("D").nunique() == 1
    bot_user = bot[constants.USER_ID].iloc[0]
    assert bot_user in set(faulty.tables.users[constants.USER_ID])
    others = _clean_rows(faulty).query(f"{constants.USER_ID} == @bot_user")
    assert len(others) > 0
    assert not others[constants.TIMESTAMP].dt.floor("D").isin(bot[constants.TIMESTAMP].dt.floor("D")).any()


def test_spike_day_stands_out_and_multiplies_volume(faulty: SyntheticData, clean: SyntheticData) -> None:
    (day,) = faulty.injected["spike_day"]
    assert constants.DEFAULT_SPIKE_WINDOW_DAYS <= day < SMALL.n_days
    with_spike = _daily_counts(_clean_rows(faulty), SMALL)
    without = _daily_counts(clean.tables.interactions, SMALL)
    assert _spike_days(with_spike) == [day]
    assert with_spike[day] / without[day] == pytest.approx(FaultConfig().spike_factor, rel=0.1)


def test_faults_leave_the_clean_rows_unchanged(clean: SyntheticData) -> None:
    rates = {x.name: 0.02 for x in fields(FaultConfig) if x.name.endswith("_rate")}
    data = generate(replace(SMALL, faults=FaultConfig(**rates)))
    pd.testing.assert_frame_equal(_clean_rows(data), clean.tables.interactions)


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: FaultConfig(null_rate=1.5),
        lambda: FaultConfig(spike=True, spike_factor=0.5),
        lambda: SyntheticConfig(n_days=20, faults=FaultConfig(spike=True)),
        lambda: SyntheticConfig(new_item_share=1.0),
        lambda: SyntheticConfig(n_users=0),
    ],
)
def test_invalid_config_is_rejected(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def test_too_many_faults_are_rejected() -> None:
    rates = {x.name: 0.3 for x in fields(FaultConfig) if x.name.endswith("_rate")}
    with pytest.raises(ValueError, match="fault rows"):
        generate(replace(SMALL, n_events=1000, faults=FaultConfig(**rates)))
