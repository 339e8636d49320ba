"""Time-based split (DATA_CONTRACT.md "Default time-based split"): boundaries, ties, errors, and
agreement with the independent ../shared/bench/protocol.py on the real ml-100k."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest

from pipeline_tasks.data.contract import write_contract_dir
from pipeline_tasks.data.movielens import load_movielens
from pipeline_tasks.data.split import SplitConfig, boundaries, split_contract_dir, time_split

BENCH = Path(__file__).resolve().parents[3] / "shared" / "bench"

BASE = pd.Timestamp("2025-01-01T00:00:00Z")
KEY = ["user_id", "item_id", "timestamp"]

# (tag, hour after BASE) in input order. Sorted: hours 0..12 once (positions 0-12), hour 13 four
# times (13-16), hour 14 once (17), hour 15 twice (18-19). n = 20: floor(0.8n) = 16 -> hour 13,
# floor(0.9n) = 18 -> hour 15. Rows at positions 13-15 share the t_val timestamp, so they go to
# validation with it; position 17 < 18 but hour 14 < 15 stays in validation.
TIED = [
    ("r00", 13), ("r01", 5), ("r02", 15), ("r03", 0), ("r04", 13), ("r05", 12), ("r06", 7), ("r07", 14),
    ("r08", 1), ("r09", 13), ("r10", 3), ("r11", 15), ("r12", 2), ("r13", 11), ("r14", 4), ("r15", 13),
    ("r16", 6), ("r17", 8), ("r18", 10), ("r19", 9),
]


def frame(rows: list[tuple[str, int]]) -> pd.DataFrame:
    """Interactions whose item_id is the row's tag, ``hour`` hours after BASE, in the given order."""
    return pd.DataFrame({
        "user_id": [f"u{i % 3}" for i in range(len(rows))],
        "item_id": [tag for tag, _ in rows],
        "timestamp": pd.to_datetime([BASE + pd.Timedelta(hours=h) for _, h in rows], utc=True),
        "event_type": ["view"] * len(rows),
    })


def tags(df: pd.DataFrame) -> list[str]:
    return df["item_id"].tolist()


def hour(h: int) -> pd.Timestamp:
    return BASE + pd.Timedelta(hours=h)


# --- default fractions -------------------------------------------------------------------------


def test_boundaries_are_timestamps_at_floor_positions_with_ties() -> None:
    t_val, t_test = boundaries(frame(TIED), SplitConfig())
    assert (t_val, t_test) == (hour(13), hour(15))


def test_rows_with_the_boundary_timestamp_go_to_the_later_window() -> None:
    w = time_split(frame(TIED), SplitConfig())
    assert {k: len(v) for k, v in w.items()} == {"train": 13, "validation": 5, "test": 2}
    # Each window in timestamp order; equal timestamps keep input order (stable).
    assert tags(w["train"]) == ["r03", "r08", "r12", "r10", "r14", "r01", "r16", "r06", "r17", "r19", "r18", "r13",
                                "r05"]
    assert tags(w["validation"]) == ["r00", "r04", "r09", "r15", "r07"]
    assert tags(w["test"]) == ["r02", "r11"]
    assert w["train"]["timestamp"].max() < hour(13) <= w["validation"]["timestamp"].min()
    assert w["validation"]["timestamp"].max() < hour(15) <= w["test"]["timestamp"].min()


def test_windows_have_a_fresh_index_and_all_columns() -> None:
    df = frame(TIED)
    w = time_split(df, SplitConfig())
    for name, part in w.items():
        assert list(part.columns) == list(df.columns), name
        assert part.index.tolist() == list(range(len(part))), name


def test_split_does_not_modify_its_input() -> None:
    df = frame(TIED)
    before = df.copy()
    time_split(df, SplitConfig())
    pd.testing.assert_frame_equal(df, before)


@pytest.mark.parametrize(
    ("n", "counts"),
    [
        (10, (8, 1, 1)),  # floor(8.0), floor(9.0)
        (7, (5, 1, 1)),  # floor(5.6), floor(6.3)
        (13, (10, 1, 2)),  # floor(10.4), floor(11.7)
        (3, (2, 0, 1)),  # floor(2.4) == floor(2.7): empty validation
        (1, (0, 0, 1)),
    ],
)
def test_positions_floor_08n_and_09n_with_distinct_timestamps(n: int, counts: tuple[int, int, int]) -> None:
    # Reverse input order so the sort does real work.
    rows = [(f"r{i:02d}", h) for i, h in enumerate(range(n - 1, -1, -1))]
    w = time_split(frame(rows), SplitConfig())
    assert (len(w["train"]), len(w["validation"]), len(w["test"])) == counts
    assert sum(counts) == n


def test_custom_fractions() -> None:
    rows = [(f"r{h:02d}", h) for h in range(10)]
    w = time_split(frame(rows), SplitConfig(val_fraction=0.5, test_fraction=0.7))
    assert (len(w["train"]), len(w["validation"]), len(w["test"])) == (5, 2, 3)


# --- explicit boundaries -----------------------------------------------------------------------


def test_explicit_boundaries_strings_with_offset_and_naive_as_utc() -> None:
    # 12:00+02:00 is 10:00 UTC; the naive 14:00 is taken as UTC.
    config = SplitConfig(t_val="2025-01-01T12:00:00+02:00", t_test="2025-01-01T14:00:00")
    assert boundaries(frame(TIED), config) == (hour(10), hour(14))
    w = time_split(frame(TIED), config)
    assert tags(w["train"]) == ["r03", "r08", "r12", "r10", "r14", "r01", "r16", "r06", "r17", "r19"]
    assert tags(w["validation"]) == ["r18", "r13", "r05", "r00", "r04", "r09", "r15"]
    assert tags(w["test"]) == ["r07", "r02", "r11"]


def test_explicit_boundaries_as_datetimes() -> None:
    config = SplitConfig(t_val=datetime(2025, 1, 1, 13, tzinfo=UTC), t_test=datetime(2025, 1, 1, 15, tzinfo=UTC))
    w = time_split(frame(TIED), config)
    assert {k: len(v) for k, v in w.items()} == {"train": 13, "validation": 5, "test": 2}


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["t_val", "t_test"])
def test_only_one_boundary_is_an_error(given: str) -> None:
    with pytest.raises(ValueError, match="both t_val and t_test"):
        SplitConfig(**{given: "2025-01-01T10:00:00Z"})


@pytest.mark.parametrize(
    ("t_val", "t_test"),
    [
        ("2025-01-01T10:00:00Z", "2025-01-01T10:00:00Z"),  # equal
        ("2025-01-01T11:00:00Z", "2025-01-01T10:00:00Z"),  # reversed
        ("2025-01-01T11:00:00Z", "2025-01-01T12:00:00+02:00"),  # 10:00 UTC: reversed once converted
    ],
)
def test_t_val_not_before_t_test_is_an_error(t_val: str, t_test: str) -> None:
    config = SplitConfig(t_val=t_val, t_test=t_test)
    with pytest.raises(ValueError, match="must be before"):
        time_split(frame(TIED), config)


def test_empty_interactions_is_an_error() -> None:
    with pytest.raises(ValueError, match="no accepted interactions"):
        time_split(frame([]), SplitConfig())


@pytest.mark.parametrize(("val", "test"), [(0.9, 0.8), (0.0, 0.9), (0.8, 1.0), (0.5, 0.5)])
def test_bad_fractions_are_an_error(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=val, test_fraction=test)


# --- real ml-100k against the independent protocol.py ------------------------------------------


@pytest.fixture(scope="module")
def protocol() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("protocol")


@pytest.fixture(scope="module")
def ml100k_contract_dir(ml100k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml100k_contract")
    write_contract_dir(load_movielens(ml100k), out)
    return out


@pytest.fixture(scope="module")
def ml100k_split(ml100k_contract_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return split_contract_dir(ml100k_contract_dir, tmp_path_factory.mktemp("ml100k_split"), SplitConfig())


def test_ml100k_split_counts(ml100k_split: dict[str, Any]) -> None:
    assert ml100k_split["counts"] == {"train": 79_999, "validation": 10_001, "test": 10_000}
    assert {name: len(pd.read_parquet(ml100k_split[name])) for name in ("train", "validation", "test")} == {
        "train": 79_999, "validation": 10_001, "test": 10_000}


def test_ml100k_split_json(ml100k_split: dict[str, Any]) -> None:
    info = json.loads(Path(ml100k_split["split_info"]).read_text())
    assert info["counts"] == {"train": 79_999, "validation": 10_001, "test": 10_000}
    assert info["explicit_boundaries"] is False
    assert info["t_val"] == ml100k_split["t_val"] and info["t_test"] == ml100k_split["t_test"]


def test_ml100k_split_matches_protocol(
    protocol: ModuleType, ml100k_contract_dir: Path, ml100k_split: dict[str, Any]
) -> None:
    train, val, test, t_val, t_test = protocol.split(ml100k_contract_dir)
    assert (len(train), len(val), len(test)) == (79_999, 10_001, 10_000)
    assert pd.Timestamp(ml100k_split["t_val"]) == t_val
    assert pd.Timestamp(ml100k_split["t_test"]) == t_test
    for name, theirs in (("train", train), ("validation", val), ("test", test)):
        ours = pd.read_parquet(ml100k_split[name])
        assert str(ours["timestamp"].dtype) == "datetime64[ns, UTC]", name
        # Same rows in the same (stable, timestamp) order, not merely the same counts.
        pd.testing.assert_frame_equal(
            ours[KEY].reset_index(drop=True), theirs[KEY].reset_index(drop=True), obj=name)
        assert set(ours[KEY].itertuples(index=False)) == set(theirs[KEY].itertuples(index=False)), name
