"""MovieLens importer (100K ``u.data`` and 1M ``ratings.dat`` formats) -> contract tables.

Mapping (DATA_CONTRACT.md): rating r -> one interaction, ``value = r``, ``event_type = favorite``
when r >= 4 else ``view``; first genre = ``category``, all genres = ``genres``;
``created_at`` = the movie's first rating (fallback: release date).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_tasks.data.contract import (
    ContractError,
    ContractTables,
    normalise_interactions,
    normalise_items,
    normalise_users,
)

log = logging.getLogger(__name__)

FAVORITE_MIN_RATING = 4
ENCODING = "latin-1"  # both releases ship Latin-1 titles



def detect_format(path: Path) -> str:
    """Return ``"100k"`` or ``"1m"`` for a MovieLens folder, or raise with what was expected."""
    if (path / "u.data").exists():
        return "100k"
    if (path / "ratings.dat").exists():
        return "1m"
    raise ContractError(
        f"{path}: not a MovieLens folder; expected u.data (100K format) or ratings.dat (1M format)"
    )


def _interactions(ratings: pd.DataFrame) -> pd.DataFrame:
    """Ratings (user, movie, rating, epoch seconds), input order kept -> canonical interactions."""
    return normalise_interactions(
        pd.DataFrame(
            {
                "user_id": ratings["user"].astype(str),
                "item_id": ratings["movie"].astype(str),
                "timestamp": pd.to_datetime(ratings["ts"].astype("int64"), unit="s", utc=True),
                "event_type": np.where(ratings["rating"] >= FAVORITE_MIN_RATING, "favorite", "view"),
                "value": ratings["rating"].astype(float),
            }
        )
    )


def _items(movies: pd.DataFrame, genre_lists: pd.Series, inter: pd.DataFrame) -> pd.DataFrame:
    """Movies with their genre lists -> canonical items; created_at = first rating, else release."""
    first = inter.groupby("item_id")["timestamp"].min()
    ids = movies["movie"].astype(str)
    release = pd.to_datetime(movies.get("release"), format="%d-%b-%Y", errors="coerce", utc=True) \
        if "release" in movies else pd.Series(pd.NaT, index=movies.index, dtype="datetime64[ns, UTC]")
    created = ids.map(first).astype("datetime64[ns, UTC]").fillna(release)
    genres = genre_lists.map(lambda g: "|".join(g) if g else None)
    category = genre_lists.map(lambda g: g[0] if g else None)
    return normalise_items(
        pd.DataFrame(
            {
                "item_id": ids,
                "title": movies["title"].fillna(""),
                "category": category,
                "genres": genres,
                "created_at": created,
            }
        )
    )


def _load_100k(path: Path) -> ContractTables:
    ratings = pd.read_csv(path / "u.data", sep="\t", header=None, names=["user", "movie", "rating", "ts"])
    genre_names = pd.read_csv(path / "u.genre", sep="|", header=None, names=["name", "idx"],
                              encoding=ENCODING).dropna()
    names = genre_names.sort_values("idx")["name"].tolist()
    cols = ["movie", "title", "release", "video_release", "url", *names]
    movies = pd.read_csv(path / "u.item", sep="|", header=None, names=cols, encoding=ENCODING)
    flags = movies[names].to_numpy(dtype=bool)
    genre_lists = pd.Series([[n for n, f in zip(names, row, strict=True) if f] for row in flags])
    inter = _interactions(ratings)
    users = pd.read_csv(path / "u.user", sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"],
                        dtype=str, encoding=ENCODING)
    return ContractTables(inter, _items(movies, genre_lists, inter), normalise_users(users))


def _read_dat(path: Path, names: list[str], numeric: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a "::"-separated file; a malformed line raises a ContractError naming its line number."""
    # Split by hand: pandas' python engine with a regex separator is slow.
    numbered = [(i + 1, line.split("::")) for i, line in enumerate(path.read_text(encoding=ENCODING).splitlines())
                if line.strip()]
    bad = [n for n, fields in numbered if len(fields) != len(names)]
    if bad:
        raise ContractError(f"{path}: line {bad[0]} does not have {len(names)} '::'-separated fields "
                            f"({len(bad)} such lines)")
    df = pd.DataFrame([fields for _, fields in numbered], columns=names)
    for col in numeric:
        parsed = pd.to_numeric(df[col], errors="coerce")
        if parsed.isna().any():
            first = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            raise ContractError(f"{path}: line {numbered[first][0]}: {col} {df[col].iloc[first]!r} is not a number")
        df[col] = parsed
    return df


def _load_1m(path: Path) -> ContractTables:
    ratings = _read_dat(path / "ratings.dat", ["user", "movie", "rating", "ts"], numeric=("rating", "ts"))
    inter = _interactions(ratings)
    movies = _read_dat(path / "movies.dat", ["movie", "title", "genres"])
    genre_lists = movies["genres"].map(lambda g: [x for x in g.split("|") if x and x != "(no genres listed)"])
    users_path = path / "users.dat"
    if users_path.exists():
        users = _read_dat(users_path, ["user_id", "gender", "age", "occupation", "zip"])
    else:
        users = pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    return ContractTables(inter, _items(movies, genre_lists, inter), normalise_users(users))


def load_movielens(path: str | Path) -> ContractTables:
    """Import a MovieLens folder (100K or 1M format, detected from its files)."""
    path = Path(path)
    fmt = detect_format(path)
    tables = _load_100k(path) if fmt == "100k" else _load_1m(path)
    log.info("MovieLens %s from %s: %s", fmt, path, tables.counts())
    return tables
