"""The canonical contract: normalisation (types only, never drops a row) and reading/writing contract dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core.constants import ITEM_COLUMNS, USER_COLUMNS
from pipeline_tasks.data.contract import (
    RAW_TIMESTAMP,
    RAW_VALUE,
    ContractError,
    ContractTables,
    normalise_interactions,
    normalise_items,
    normalise_users,
    parse_timestamps,
    read_contract_dir,
    write_contract_dir,
)

UTC_NS = "datetime64[ns, UTC]"
ITEMS_CSV = "item_id\ni1\n"
INTERACTIONS_CSV = "user_id,item_id,timestamp,event_type\nu1,i1,1709294400,view\n"


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def write(directory: Path, files: dict[str, str]) -> Path:
    """Write text files (name -> content) into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def is_null(v: object) -> bool:
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


# --- CSV reading -------------------------------------------------------------------------------


def test_csv_ids_keep_leading_zeros(tmp_path: Path) -> None:
    d = write(tmp_path, {
        "interactions.csv": "user_id,item_id,timestamp,event_type\n007,0042,1709294400,view\n10,1,1709294400,view\n",
        "items.csv": "item_id\n0042\n1\n",
        "users.csv": "user_id,zip\n007,02460\n10,90210\n",
    })
    t = read_contract_dir(d)
    assert t.interactions["user_id"].tolist() == ["007", "10"]
    assert t.interactions["item_id"].tolist() == ["0042", "1"]
    assert t.items["item_id"].tolist() == ["0042", "1"]
    assert t.users["user_id"].tolist() == ["007", "10"]
    assert t.users["zip"].tolist() == ["02460", "90210"]


def test_csv_timestamps_iso_with_offsets_and_epoch_seconds_mixed(tmp_path: Path) -> None:
    d = write(tmp_path, {
        "interactions.csv": (
            "user_id,item_id,timestamp,event_type\n"
            "u1,i1,2024-03-01T12:00:00+02:00,view\n"
            "u1,i1,1709294400,click\n"
            "u1,i1,2024-03-01T07:00:00-05:00,purchase\n"
            "u1,i1,2024-03-01T12:00:00Z,view\n"
            "u1,i1,2024-03-01T12:00:00.250+00:00,view\n"
            "u1,i1,0,view\n"
        ),
        "items.csv": ITEMS_CSV,
    })
    ts = read_contract_dir(d).interactions["timestamp"]
    assert str(ts.dtype) == UTC_NS
    assert ts.tolist() == [
        utc("2024-03-01T10:00:00Z"),  # +02:00 converted to UTC
        utc("2024-03-01T12:00:00Z"),  # 1709294400 epoch seconds
        utc("2024-03-01T12:00:00Z"),  # -05:00 converted to UTC
        utc("2024-03-01T12:00:00Z"),
        utc("2024-03-01T12:00:00.250Z"),
        utc("1970-01-01T00:00:00Z"),
    ]
    assert read_contract_dir(d).interactions[RAW_TIMESTAMP].map(is_null).all()


@pytest.mark.parametrize(
    "bad",
    [
        "yesterday",
        "2024-13-01T00:00:00Z",  # month 13
        "2024-03-01 noon",
        # Epoch seconds beyond datetime64[ns] (and beyond int64): NaT, not an OverflowError.
        "99999999999999999999",
    ],
)
def test_unparseable_timestamp_becomes_nat_with_raw_text(tmp_path: Path, bad: str) -> None:
    d = write(tmp_path, {
        "interactions.csv": f"user_id,item_id,timestamp,event_type\nu1,i1,1709294400,view\nu1,i1,{bad},view\n",
        "items.csv": ITEMS_CSV,
    })
    inter = read_contract_dir(d).interactions
    assert len(inter) == 2  # normalisation never drops a row
    assert inter["timestamp"].iloc[0] == utc("2024-03-01T12:00:00Z")
    assert pd.isna(inter["timestamp"].iloc[1])
    assert is_null(inter[RAW_TIMESTAMP].iloc[0])
    assert inter[RAW_TIMESTAMP].iloc[1] == bad


def test_unparseable_value_becomes_nan_with_raw_text(tmp_path: Path) -> None:
    d = write(tmp_path, {
        "interactions.csv": (
            "user_id,item_id,timestamp,event_type,value\n"
            "u1,i1,1709294400,view,4.5\n"
            "u1,i2,1709294400,view,abc\n"
            "u1,i3,1709294400,view,\n"
            "u1,i4,1709294400,view,-2\n"
        ),
        "items.csv": ITEMS_CSV,
    })
    inter = read_contract_dir(d).interactions
    assert inter["value"].dtype == np.float64
    v = inter["value"].tolist()
    assert v[0] == 4.5 and np.isnan(v[1]) and np.isnan(v[2]) and v[3] == -2.0
    raw = inter[RAW_VALUE].tolist()
    assert raw[1] == "abc"
    # A missing value is allowed (null), not a parse failure: nothing to keep.
    assert is_null(raw[0]) and is_null(raw[2]) and is_null(raw[3])


def test_optional_interaction_columns_are_added_as_nulls(tmp_path: Path) -> None:
    d = write(tmp_path, {"interactions.csv": INTERACTIONS_CSV, "items.csv": ITEMS_CSV})
    inter = read_contract_dir(d).interactions
    for col in ("value", "device", "location"):
        assert col in inter.columns
        assert inter[col].map(is_null).all(), col


def test_missing_required_column_raises_naming_it(tmp_path: Path) -> None:
    d = write(tmp_path, {"interactions.csv": "user_id,item_id,event_type\nu1,i1,view\n", "items.csv": ITEMS_CSV})
    with pytest.raises(ContractError, match=r"interactions: missing required column\(s\) \['timestamp'\]"):
        read_contract_dir(d)


# --- parquet -----------------------------------------------------------------------------------


def test_parquet_tz_naive_datetimes_are_taken_as_utc(tmp_path: Path) -> None:
    naive = pd.to_datetime(["2024-03-01 12:00:00", "2024-03-02 08:30:00"])
    assert naive.tz is None
    pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i1"], "timestamp": naive,
                  "event_type": ["view", "view"]}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["i1"], "created_at": pd.to_datetime(["2023-01-01 00:00:00"])}).to_parquet(
        tmp_path / "items.parquet")
    t = read_contract_dir(tmp_path)
    assert str(t.interactions["timestamp"].dtype) == UTC_NS
    assert t.interactions["timestamp"].tolist() == [utc("2024-03-01T12:00:00Z"), utc("2024-03-02T08:30:00Z")]
    assert str(t.items["created_at"].dtype) == UTC_NS
    assert t.items["created_at"].iloc[0] == utc("2023-01-01T00:00:00Z")


def test_parquet_tz_aware_datetimes_are_converted_to_utc(tmp_path: Path) -> None:
    paris = pd.to_datetime(["2024-07-01 12:00:00"]).tz_localize("Europe/Paris")
    pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": paris, "event_type": ["view"]}).to_parquet(
        tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["i1"]}).to_parquet(tmp_path / "items.parquet")
    ts = read_contract_dir(tmp_path).interactions["timestamp"]
    assert str(ts.dtype) == UTC_NS
    assert ts.iloc[0] == utc("2024-07-01T10:00:00Z")  # CEST = UTC+2


def test_float_ids_lose_their_point_zero(tmp_path: Path) -> None:
    # What a pandas int column with a gap becomes: floats. 12.0 is the id "12", not "12.0".
    pd.DataFrame({"user_id": [12.0, 7.0], "item_id": [3.0, 12.5], "timestamp": [1709294400, 1709294401],
                  "event_type": ["view", "view"]}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": [3.0, 12.5, np.nan]}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame({"user_id": [12.0, 7.0]}).to_parquet(tmp_path / "users.parquet")
    t = read_contract_dir(tmp_path)
    assert t.interactions["user_id"].tolist() == ["12", "7"]
    assert t.interactions["item_id"].tolist() == ["3", "12.5"]
    assert t.items["item_id"].tolist()[:2] == ["3", "12.5"]
    assert is_null(t.items["item_id"].iloc[2])  # a null id stays null (validation quarantines it)
    assert t.users["user_id"].tolist() == ["12", "7"]
    assert t.interactions["timestamp"].iloc[1] == utc("2024-03-01T12:00:01Z")  # int epoch seconds


def test_normalise_float_and_int_ids() -> None:
    out = normalise_interactions(pd.DataFrame({
        "user_id": pd.Series([12.0, 1e3], dtype="float64"),
        "item_id": pd.Series([5, 40], dtype="int64"),
        "timestamp": ["1709294400", "1709294400"],
        "event_type": ["view", "view"],
    }))
    assert out["user_id"].tolist() == ["12", "1000"]
    assert out["item_id"].tolist() == ["5", "40"]


# --- items and users ---------------------------------------------------------------------------


def test_items_defaults(tmp_path: Path) -> None:
    d = write(tmp_path, {"interactions.csv": INTERACTIONS_CSV, "items.csv": "item_id\ni1\ni2\n"})
    items = read_contract_dir(d).items
    assert list(items.columns) == ITEM_COLUMNS
    assert items["title"].tolist() == ["", ""]
    assert items["category"].tolist() == ["unknown", "unknown"]
    assert items["available"].tolist() == [True, True]
    assert items["available"].dtype == bool
    assert items["created_at"].isna().all() and str(items["created_at"].dtype) == UTC_NS
    assert items["price"].isna().all()
    for col in ("genres", "description", "regions"):
        assert items[col].map(is_null).all(), col


def test_items_null_title_and_category_get_defaults_and_available_strings_parse(tmp_path: Path) -> None:
    d = write(tmp_path, {
        "interactions.csv": INTERACTIONS_CSV,
        "items.csv": (
            "item_id,title,category,available,price\n"
            "i1,Foo,books,false,9.5\n"
            "i2,,,0,\n"
            "i3,Bar,games,true,x\n"
            "i4,Baz,,,1\n"
            "i5,Qux,toys,FALSE,2\n"
            "i6,Quux,toys,1,3\n"
            "i7,Corge,toys, no ,4\n"
        ),
    })
    items = read_contract_dir(d).items
    assert items["title"].tolist() == ["Foo", "", "Bar", "Baz", "Qux", "Quux", "Corge"]
    assert items["category"].tolist() == ["books", "unknown", "games", "unknown", "toys", "toys", "toys"]
    # "false"/"0"/"no" (any case, trimmed) are False; an empty cell means the default, True.
    assert items["available"].tolist() == [False, False, True, True, False, True, False]
    assert items["available"].dtype == bool
    p = items["price"].tolist()
    assert p[0] == 9.5 and np.isnan(p[1]) and np.isnan(p[2]) and p[3] == 1.0


def test_items_available_from_parquet_booleans() -> None:
    items = normalise_items(pd.DataFrame({"item_id": ["a", "b", "c"], "available": [True, False, None]}))
    assert items["available"].tolist() == [True, False, True]


def test_users_are_optional(tmp_path: Path) -> None:
    d = write(tmp_path, {"interactions.csv": INTERACTIONS_CSV, "items.csv": ITEMS_CSV})
    users = read_contract_dir(d).users
    assert len(users) == 0
    assert list(users.columns) == USER_COLUMNS


def test_users_columns_and_types(tmp_path: Path) -> None:
    d = write(tmp_path, {
        "interactions.csv": INTERACTIONS_CSV,
        "items.csv": ITEMS_CSV,
        "users.csv": "user_id,age,gender\nu1,34,F\nu2,,M\nu3,n/a,\n",
    })
    users = read_contract_dir(d).users
    assert list(users.columns) == USER_COLUMNS
    assert str(users["age"].dtype) == "Int64"
    assert users["age"].iloc[0] == 34 and pd.isna(users["age"].iloc[1]) and pd.isna(users["age"].iloc[2])
    assert users["gender"].iloc[0] == "F" and is_null(users["gender"].iloc[2])
    assert users["zip"].map(is_null).all() and users["location"].map(is_null).all()


# --- directory errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ({"interactions.csv": INTERACTIONS_CSV}, "items.parquet"),
        ({"items.csv": ITEMS_CSV, "users.csv": "user_id\nu1\n"}, "interactions.parquet"),
    ],
)
def test_directory_missing_a_required_table_names_it(tmp_path: Path, present: dict[str, str], missing: str) -> None:
    d = write(tmp_path, present)
    with pytest.raises(ContractError) as err:
        read_contract_dir(d)
    assert missing in str(err.value)
    assert str(d) in str(err.value)


def test_directory_missing_both_tables_names_both(tmp_path: Path) -> None:
    with pytest.raises(ContractError) as err:
        read_contract_dir(tmp_path)
    assert "interactions.parquet" in str(err.value) and "items.parquet" in str(err.value)


@pytest.mark.parametrize("kind", ["file", "nonexistent"])
def test_path_that_is_not_a_directory_raises(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "interactions.csv"
    if kind == "file":
        path.write_text(INTERACTIONS_CSV)
    with pytest.raises(ContractError, match="not a directory"):
        read_contract_dir(path)


# --- write -> read round trip ------------------------------------------------------------------


def sample_tables() -> ContractTables:
    inter = normalise_interactions(pd.DataFrame({
        "user_id": ["007", "u2", "u2"],
        "item_id": ["0042", "i2", "i3"],
        "timestamp": ["2024-03-01T12:00:00+02:00", "1709294400", "not a time"],
        "event_type": ["view", "purchase", "favorite"],
        "value": ["4.5", "oops", None],
        "device": ["mobile", None, "desktop"],
        "location": ["FR", "DE", None],
    }))
    items = normalise_items(pd.DataFrame({
        "item_id": ["0042", "i2", "i3"],
        "title": ["Caf\u00e9 cr\u00e8me", None, "T"],
        "category": ["food", None, "books"],
        "genres": ["a|b", None, "c"],
        "created_at": ["2023-05-01T00:00:00Z", None, "1700000000"],
        "description": ["d", None, None],
        "price": [1.5, None, 3.0],
        "available": ["true", "false", None],
        "regions": ["FR|DE", None, ""],
    }))
    users = normalise_users(pd.DataFrame({
        "user_id": ["007", "u2"], "age": ["31", None], "gender": ["F", None],
        "occupation": ["writer", None], "zip": ["02460", None], "location": ["US", None],
    }))
    return ContractTables(inter, items, users)


def test_write_then_read_round_trip_keeps_values(tmp_path: Path) -> None:
    tables = sample_tables()
    paths = write_contract_dir(tables, tmp_path / "contract")
    assert {k: Path(v).name for k, v in paths.items()} == {
        "interactions": "interactions.parquet", "items": "items.parquet", "users": "users.parquet"}
    back = read_contract_dir(tmp_path / "contract")
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(tables, name), obj=name)
    # Spot checks in case both sides were wrong the same way.
    assert back.interactions["user_id"].tolist() == ["007", "u2", "u2"]
    assert back.interactions["timestamp"].iloc[0] == utc("2024-03-01T10:00:00Z")
    assert pd.isna(back.interactions["timestamp"].iloc[2])
    assert back.interactions[RAW_TIMESTAMP].iloc[2] == "not a time"  # the raw text survives the round trip
    assert back.interactions[RAW_VALUE].iloc[1] == "oops"
    assert back.items["title"].tolist() == ["Caf\u00e9 cr\u00e8me", "", "T"]
    assert back.items["available"].tolist() == [True, False, True]
    assert back.items["created_at"].iloc[2] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    assert back.users["zip"].iloc[0] == "02460" and back.users["age"].iloc[0] == 31


def test_write_twice_overwrites(tmp_path: Path) -> None:
    tables = sample_tables()
    write_contract_dir(tables, tmp_path)
    write_contract_dir(tables, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.parquet", "items.parquet", "users.parquet"]
    assert read_contract_dir(tmp_path).counts() == {"interactions": 3, "items": 3, "users": 2}


def test_parse_timestamps_numeric_series_is_epoch_seconds() -> None:
    ts = parse_timestamps(pd.Series([1709294400, 0], dtype="int64"))
    assert str(ts.dtype) == UTC_NS
    assert ts.tolist() == [utc("2024-03-01T12:00:00Z"), utc("1970-01-01T00:00:00Z")]
