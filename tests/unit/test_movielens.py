"""MovieLens importer: the DATA_CONTRACT.md mapping on the real ml-100k and on a hand-made 1M-format fixture.

ml-100k is read from ../shared/data/ml-100k (never copied); the expected values below were read off
u.data / u.item / u.user with awk, independently of the importer.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core.constants import USER_COLUMNS
from pipeline_tasks.data.contract import ContractError, ContractTables
from pipeline_tasks.data.movielens import detect_format, load_movielens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

ML1M = FIXTURES / "ml-1m"
UTC_NS = "datetime64[ns, UTC]"


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def item_row(tables: ContractTables, item_id: str) -> pd.Series:
    rows = tables.items[tables.items["item_id"] == item_id]
    assert len(rows) == 1, f"item {item_id!r}: {len(rows)} rows"
    return rows.iloc[0]


def user_row(tables: ContractTables, user_id: str) -> pd.Series:
    rows = tables.users[tables.users["user_id"] == user_id]
    assert len(rows) == 1, f"user {user_id!r}: {len(rows)} rows"
    return rows.iloc[0]


def assert_string_ids(s: pd.Series) -> None:
    assert s.dtype == object
    assert all(isinstance(v, str) for v in s), f"{s.name}: non-string ids {s[~s.map(type).eq(str)].head()}"


@pytest.fixture(scope="module")
def ml100k_tables(ml100k: Path) -> ContractTables:
    return load_movielens(ml100k)


@pytest.fixture(scope="module")
def raw_u_data(ml100k: Path) -> pd.DataFrame:
    """u.data as plain text columns, in file order (the reference the importer is checked against)."""
    return pd.read_csv(ml100k / "u.data", sep="\t", header=None, names=["user", "movie", "rating", "ts"], dtype=str)


@pytest.fixture(scope="module")
def ml1m_tables() -> ContractTables:
    return load_movielens(ML1M)


# --- ml-100k (real data) -------------------------------------------------------------------------


def test_100k_row_counts(ml100k_tables: ContractTables) -> None:
    assert ml100k_tables.counts() == {"interactions": 100_000, "items": 1_682, "users": 943}
    assert ml100k_tables.interactions["user_id"].nunique() == 943
    assert ml100k_tables.interactions["item_id"].nunique() == 1_682


def test_100k_ids_are_strings(ml100k_tables: ContractTables) -> None:
    assert_string_ids(ml100k_tables.interactions["user_id"])
    assert_string_ids(ml100k_tables.interactions["item_id"])
    assert_string_ids(ml100k_tables.items["item_id"])
    assert_string_ids(ml100k_tables.users["user_id"])
    assert ml100k_tables.interactions.loc[0, ["user_id", "item_id"]].tolist() == ["196", "242"]
    assert ml100k_tables.items["item_id"].is_unique and ml100k_tables.users["user_id"].is_unique


def test_100k_keeps_u_data_input_order(ml100k_tables: ContractTables, raw_u_data: pd.DataFrame) -> None:
    inter = ml100k_tables.interactions
    assert inter["user_id"].tolist() == raw_u_data["user"].tolist()
    assert inter["item_id"].tolist() == raw_u_data["movie"].tolist()
    # last line of u.data: "12\t203\t3\t879959583"
    assert inter.iloc[-1][["user_id", "item_id", "value"]].tolist() == ["12", "203", 3.0]


def test_100k_value_is_rating_and_favorite_iff_at_least_4(
    ml100k_tables: ContractTables, raw_u_data: pd.DataFrame
) -> None:
    inter = ml100k_tables.interactions
    rating = raw_u_data["rating"].astype(float).to_numpy()
    assert inter["value"].dtype == np.float64
    np.testing.assert_array_equal(inter["value"].to_numpy(), rating)
    expected = np.where(rating >= 4, "favorite", "view")
    assert inter["event_type"].tolist() == expected.tolist()
    assert (inter["event_type"] == "favorite").sum() == 55_375  # awk '$3>=4' u.data | wc -l
    assert set(inter["event_type"]) == {"favorite", "view"}


def test_100k_timestamps_are_utc(ml100k_tables: ContractTables, raw_u_data: pd.DataFrame) -> None:
    ts = ml100k_tables.interactions["timestamp"]
    assert str(ts.dtype) == UTC_NS
    assert ts.iloc[0] == utc("1997-12-04T15:55:49Z")  # 881250949
    assert ts.min() == utc("1997-09-20T03:05:10Z")
    assert ts.max() == utc("1998-04-22T23:10:38Z")
    epoch = (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    assert epoch.tolist() == raw_u_data["ts"].astype(int).tolist()


@pytest.mark.parametrize(
    ("item_id", "title", "category", "genres", "created_at"),
    [
        ("1", "Toy Story (1995)", "Animation", "Animation|Children's|Comedy", "1997-09-20T19:43:35Z"),
        ("2", "GoldenEye (1995)", "Action", "Action|Adventure|Thriller", "1997-09-20T18:02:48Z"),
        ("50", "Star Wars (1977)", "Action", "Action|Adventure|Romance|Sci-Fi|War", "1997-09-20T04:29:10Z"),
        # u.item's placeholder movie: no release date, only the "unknown" genre flag.
        ("267", "unknown", "unknown", "unknown", "1997-09-28T01:12:19Z"),
        # the last movie has a single rating (880845755).
        ("1682", "Scream of Stone (Schrei aus Stein) (1991)", "Drama", "Drama", "1997-11-29T23:22:35Z"),
    ],
)
def test_100k_known_movies(
    ml100k_tables: ContractTables, item_id: str, title: str, category: str, genres: str, created_at: str
) -> None:
    row = item_row(ml100k_tables, item_id)
    assert row["title"] == title
    assert row["category"] == category
    assert row["genres"] == genres
    assert row["created_at"] == utc(created_at)
    assert bool(row["available"]) is True


def test_100k_created_at_is_each_movies_first_rating(
    ml100k_tables: ContractTables, raw_u_data: pd.DataFrame
) -> None:
    items = ml100k_tables.items
    assert str(items["created_at"].dtype) == UTC_NS
    first = raw_u_data.assign(ts=raw_u_data["ts"].astype(int)).groupby("movie")["ts"].min()
    expected = pd.to_datetime(items["item_id"].map(first), unit="s", utc=True)
    assert items["created_at"].notna().all()
    pd.testing.assert_series_equal(items["created_at"], expected, check_names=False)


def test_100k_category_is_first_of_genres(ml100k_tables: ContractTables) -> None:
    items = ml100k_tables.items
    assert items["genres"].notna().all()
    assert (items["genres"].str.split("|").str[0] == items["category"]).all()


@pytest.mark.parametrize(
    ("user_id", "age", "gender", "occupation", "zip_code"),
    [
        ("1", 24, "M", "technician", "85711"),
        ("9", 29, "M", "student", "01002"),  # leading zero kept
        ("74", 39, "M", "scientist", "T8H1N"),  # Canadian postal code
        ("943", 22, "M", "student", "77841"),
    ],
)
def test_100k_user_demographics(
    ml100k_tables: ContractTables, user_id: str, age: int, gender: str, occupation: str, zip_code: str
) -> None:
    assert list(ml100k_tables.users.columns) == USER_COLUMNS
    row = user_row(ml100k_tables, user_id)
    assert (row["age"], row["gender"], row["occupation"], row["zip"]) == (age, gender, occupation, zip_code)


# --- 1M format (hand-made fixture, tests/fixtures/ml-1m) -----------------------------------------

ML1M_RATINGS = [  # ratings.dat, in file order: (user, movie, rating, epoch seconds)
    ("1", "1", 5, 978824268), ("1", "73", 4, 978300760), ("1", "260", 3, 978302109),
    ("2", "1", 3, 978298413), ("2", "260", 5, 978299026), ("2", "2", 2, 978300174),
    ("3", "260", 4, 978297867), ("3", "1", 1, 978298709), ("3", "73", 5, 978297039),
    ("4", "2", 4, 978294008), ("4", "1", 4, 978294260), ("4", "260", 5, 978294199),
    ("1", "2", 3, 978301968), ("2", "73", 2, 978300275), ("3", "2", 4, 978298147),
]


def test_1m_row_counts_and_string_ids(ml1m_tables: ContractTables) -> None:
    assert ml1m_tables.counts() == {"interactions": 15, "items": 5, "users": 4}
    assert_string_ids(ml1m_tables.interactions["user_id"])
    assert_string_ids(ml1m_tables.interactions["item_id"])
    assert_string_ids(ml1m_tables.items["item_id"])
    assert_string_ids(ml1m_tables.users["user_id"])


def test_1m_interactions_mapping_in_input_order(ml1m_tables: ContractTables) -> None:
    inter = ml1m_tables.interactions
    assert inter["user_id"].tolist() == [u for u, _, _, _ in ML1M_RATINGS]
    assert inter["item_id"].tolist() == [m for _, m, _, _ in ML1M_RATINGS]
    assert inter["value"].tolist() == [float(r) for _, _, r, _ in ML1M_RATINGS]
    assert inter["event_type"].tolist() == [
        "favorite", "favorite", "view", "view", "favorite", "view", "favorite", "view",
        "favorite", "favorite", "favorite", "favorite", "view", "view", "favorite",
    ]
    assert str(inter["timestamp"].dtype) == UTC_NS
    assert inter["timestamp"].tolist() == [pd.Timestamp(t, unit="s", tz="UTC") for *_, t in ML1M_RATINGS]
    assert inter["timestamp"].iloc[0] == utc("2001-01-06T23:37:48Z")


@pytest.mark.parametrize(
    ("item_id", "title", "category", "genres", "created_at"),
    [
        ("1", "Toy Story (1995)", "Animation", "Animation|Children's|Comedy", "2000-12-31T20:24:20Z"),
        ("2", "Jumanji (1995)", "Adventure", "Adventure|Children's|Fantasy", "2000-12-31T20:20:08Z"),
        ("73", "Mis\u00e9rables, Les (1995)", "Drama", "Drama|Musical", "2000-12-31T21:10:39Z"),
        ("260", "Star Wars: Episode IV - A New Hope (1977)", "Action", "Action|Adventure|Fantasy|Sci-Fi",
         "2000-12-31T20:23:19Z"),
    ],
)
def test_1m_movies_mapping(
    ml1m_tables: ContractTables, item_id: str, title: str, category: str, genres: str, created_at: str
) -> None:
    row = item_row(ml1m_tables, item_id)
    assert (row["title"], row["category"], row["genres"]) == (title, category, genres)
    assert row["created_at"] == utc(created_at)


def test_1m_latin1_title_is_decoded() -> None:
    # The fixture really holds the single Latin-1 byte 0xE9, not UTF-8 (which would be C3 A9).
    raw = (ML1M / "movies.dat").read_bytes()
    assert b"Mis\xe9rables" in raw and b"\xc3\xa9" not in raw
    title = item_row(load_movielens(ML1M), "73")["title"]
    assert title == "Misérables, Les (1995)"
    assert "\ufffd" not in title and "Ã" not in title


def test_1m_unrated_movie_is_kept_with_null_created_at(ml1m_tables: ContractTables) -> None:
    # 3952 has no rating and the 1M format has no release date: nothing to fall back on.
    assert "3952" not in set(ml1m_tables.interactions["item_id"])
    row = item_row(ml1m_tables, "3952")
    assert (row["title"], row["category"], row["genres"]) == ("Contender, The (2000)", "Drama", "Drama|Thriller")
    assert pd.isna(row["created_at"])
    assert str(ml1m_tables.items["created_at"].dtype) == UTC_NS
    assert ml1m_tables.items["created_at"].isna().sum() == 1


def test_1m_user_demographics(ml1m_tables: ContractTables) -> None:
    users = ml1m_tables.users
    assert list(users.columns) == USER_COLUMNS
    assert users["user_id"].tolist() == ["1", "2", "3", "4"]
    assert str(users["age"].dtype) == "Int64"
    assert users["age"].tolist() == [1, 56, 25, 45]  # the 1M age-group codes
    assert users["gender"].tolist() == ["F", "M", "M", "M"]
    assert users["occupation"].tolist() == ["10", "16", "15", "7"]  # the 1M occupation codes, as text
    assert users["zip"].tolist() == ["48067", "70072", "55117", "02460"]


def test_1m_without_users_dat_gives_an_empty_users_table(tmp_path: Path) -> None:
    for name in ("ratings.dat", "movies.dat"):
        shutil.copy(ML1M / name, tmp_path / name)
    tables = load_movielens(tmp_path)
    assert len(tables.users) == 0
    assert list(tables.users.columns) == USER_COLUMNS
    assert len(tables.interactions) == 15


# --- format detection and errors -----------------------------------------------------------------


def test_detect_format(ml100k: Path) -> None:
    assert detect_format(ml100k) == "100k"
    assert detect_format(ML1M) == "1m"


def test_folder_without_ratings_names_both_expected_files(tmp_path: Path) -> None:
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n", encoding="latin-1")
    with pytest.raises(ContractError) as err:
        load_movielens(tmp_path)
    assert "u.data" in str(err.value)
    assert "ratings.dat" in str(err.value)
    assert str(tmp_path) in str(err.value)


GOOD = "1::1::5::978824268\n2::1::3::978298413\n"


@pytest.mark.parametrize(
    ("content", "line"),
    [
        pytest.param(GOOD + "3::1::4\n", 3, id="missing-field"),
        pytest.param(GOOD + "3::1::4::978298709::x\n", 3, id="extra-field"),
        pytest.param("1::1::5::978824268\n3\t1\t4\t978298709\n" + GOOD, 2, id="tab-separated"),
        # Right field count but not numbers: still named by line.
        pytest.param(GOOD + "3::1::five::978298709\n", 3, id="non-numeric-rating"),
        pytest.param(GOOD + "3::1::4::yesterday\n", 3, id="non-numeric-timestamp"),
        # Blank lines count when numbering lines.
        pytest.param("1::1::5::978824268\n\n2::1::3::978298413\n3::1::4\n", 4, id="after-blank-line"),
    ],
)
def test_malformed_ratings_line_names_the_line(tmp_path: Path, content: str, line: int) -> None:
    (tmp_path / "ratings.dat").write_text(content, encoding="latin-1")
    shutil.copy(ML1M / "movies.dat", tmp_path / "movies.dat")
    with pytest.raises(ContractError) as err:
        load_movielens(tmp_path)
    message = str(err.value)
    assert "ratings.dat" in message
    assert re.search(rf"\bline {line}\b", message), message
