"""The canonical data contract: read, normalise and write the three tables.

Normalisation changes types only (string ids, UTC timestamps, floats); it never drops a row.
Deciding which rows are valid is the job of :mod:`pipeline_tasks.data.validate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import (
    ITEM_COLUMNS,
    ITEM_ID,
    REQUIRED_COLUMNS,
    REQUIRED_TABLES,
    TABLES,
    TIMESTAMP,
    UNKNOWN_CATEGORY,
    USER_COLUMNS,
    USER_ID,
)
from pipeline_tasks.core.errors import PermanentError

log = logging.getLogger(__name__)

RAW_TIMESTAMP = "raw_timestamp"
RAW_VALUE = "raw_value"
EPOCH_SECONDS_LIMIT = 9.2e9  # about year 2261, inside pandas' nanosecond timestamp range


CONTRACT_HINT = "see DATA_CONTRACT.md for the tables and columns"


class ContractError(PermanentError, ValueError):
    """A source does not hold the contract tables (missing file or column)."""


@dataclass
class ContractTables:
    """The three canonical tables, in memory."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in TABLES}


def _ids(s: pd.Series) -> pd.Series:
    """Ids as Python strings; integral floats lose their `.0`; nulls stay None (vectorised)."""
    out = pd.Series(None, index=s.index, dtype=object)
    present = s.notna().to_numpy()
    if pd.api.types.is_float_dtype(s):
        values = s.to_numpy()
        integral = present & (np.mod(np.where(present, values, 0), 1) == 0)
        out[integral] = s[integral].astype("int64").astype(str).to_numpy()
        out[present & ~integral] = s[present & ~integral].astype(str).to_numpy()
    elif present.any():
        out[present] = s[present].astype(str).to_numpy()
    return out


_strings = _ids  # free-text columns follow the same rule: str values, None for nulls


def parse_timestamps(s: pd.Series) -> pd.Series:
    """Parse to ``datetime64[ns, UTC]``: datetimes (naive = UTC), epoch seconds, ISO-8601 strings.

    Unparseable values become NaT (validation then quarantines them with their raw text kept).
    """
    if pd.api.types.is_datetime64_any_dtype(s):
        return s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")
    if pd.api.types.is_numeric_dtype(s):
        seconds = s.astype(float)
        return pd.to_datetime(seconds.where(seconds.abs() < EPOCH_SECONDS_LIMIT), unit="s", utc=True, errors="coerce")
    text = s.astype("string").str.strip()
    numeric = text.str.fullmatch(r"-?\d+(\.\d+)?").fillna(False).astype(bool)
    out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns, UTC]")
    if numeric.any():
        seconds = text[numeric].astype(float)
        # Outside datetime64[ns]'s range pandas raises instead of coercing: such values are unparseable.
        seconds = seconds.where(seconds.abs() < EPOCH_SECONDS_LIMIT)
        out[numeric] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    rest = ~numeric & text.notna()
    if rest.any():
        out[rest] = pd.to_datetime(text[rest], utc=True, errors="coerce", format="ISO8601")
    return out


def normalise_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical column types; keeps the raw timestamp/value text where parsing failed."""
    missing = [c for c in ("user_id", "item_id", "timestamp", "event_type") if c not in df.columns]
    if missing:
        raise ContractError(f"interactions: missing required column(s) {missing}; have {list(df.columns)}")
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    src = df.reset_index(drop=True)
    out["user_id"] = _ids(src["user_id"])
    out["item_id"] = _ids(src["item_id"])
    out[TIMESTAMP] = parse_timestamps(src[TIMESTAMP])
    out["event_type"] = _strings(src["event_type"])
    raw_value = src["value"] if "value" in src else pd.Series([None] * len(src))
    out["value"] = pd.to_numeric(raw_value, errors="coerce").astype("float64")
    out["device"] = _strings(src["device"]) if "device" in src else None
    out["location"] = _strings(src["location"]) if "location" in src else None
    # Raw text of values that did not parse, so a quarantined row loses nothing.
    # A contract dir written by ingest carries them already (the parsed column is null there).
    out[RAW_TIMESTAMP] = _raw_text(src, TIMESTAMP, out[TIMESTAMP].isna(), RAW_TIMESTAMP)
    out[RAW_VALUE] = _raw_text(src, "value", out["value"].isna(), RAW_VALUE)
    return out


def _raw_text(src: pd.DataFrame, col: str, failed: pd.Series, raw_col: str) -> pd.Series:
    """The original text where parsing ``col`` failed (None elsewhere), keeping an existing raw column."""
    text = pd.Series(None, index=src.index, dtype=object)
    if col in src:
        bad = (failed & src[col].notna()).to_numpy()
        if bad.any():  # only the failed rows are turned into text (a 1M-row column would cost seconds)
            text[bad] = src.loc[bad, col].astype(str).to_numpy()
    if raw_col in src:
        text = text.where(text.notna(), _strings(src[raw_col]))
    return text


def normalise_items(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical item columns; absent optional columns are added as nulls/defaults."""
    if ITEM_ID not in df.columns:
        raise ContractError(f"items: missing required column 'item_id'; have {list(df.columns)}")
    src = df.reset_index(drop=True)
    out = pd.DataFrame(index=pd.RangeIndex(len(src)))
    out[ITEM_ID] = _ids(src[ITEM_ID])
    out["title"] = _strings(src["title"]).fillna("") if "title" in src else ""
    out["category"] = _strings(src["category"]).fillna(UNKNOWN_CATEGORY) if "category" in src else UNKNOWN_CATEGORY
    for col in ("genres", "description", "regions"):
        out[col] = _strings(src[col]) if col in src else None
    out["created_at"] = (
        parse_timestamps(src["created_at"]) if "created_at" in src else pd.Series(pd.NaT, index=out.index,
                                                                                  dtype="datetime64[ns, UTC]")
    )
    out["price"] = pd.to_numeric(src["price"], errors="coerce").astype("float64") if "price" in src else np.nan
    if "available" in src:
        avail = src["available"].map(
            lambda v: True if v is None or (not isinstance(v, str) and pd.isna(v))
            else (str(v).strip().lower() not in ("false", "0", "no", "n", "f"))
        )
        out["available"] = avail.astype(bool)
    else:
        out["available"] = True
    return out[ITEM_COLUMNS]


def normalise_users(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical user columns; absent optional columns are added as nulls."""
    if USER_ID not in df.columns:
        raise ContractError(f"users: missing required column 'user_id'; have {list(df.columns)}")
    src = df.reset_index(drop=True)
    out = pd.DataFrame(index=pd.RangeIndex(len(src)))
    out[USER_ID] = _ids(src[USER_ID])
    out["age"] = pd.to_numeric(src["age"], errors="coerce").astype("Int64") if "age" in src else pd.NA
    out["age"] = out["age"].astype("Int64")
    for col in ("gender", "occupation", "zip", "location"):
        out[col] = _ids(src[col]) if col in src else None
    return out[USER_COLUMNS]


def empty_users() -> pd.DataFrame:
    return normalise_users(pd.DataFrame({USER_ID: pd.Series([], dtype=object)}))


def find_table(directory: Path, name: str) -> Path | None:
    """The contract table ``name`` in ``directory`` (parquet, else csv), or None."""
    for ext in (".parquet", ".csv"):
        p = directory / f"{name}{ext}"
        if p.exists():
            return p
    return None


def read_table(path: Path, nrows: int | None = None) -> pd.DataFrame:
    """Read a contract table file (parquet or csv) like ingest does, the first ``nrows`` rows only if given.

    Raises :class:`ContractError` naming the file and what is wrong with it.
    """
    if path.suffix == ".parquet":
        return _read_parquet(path, nrows)
    if path.stat().st_size == 0:
        raise ContractError(f"{path}: the file is empty (0 bytes); export the table with a header row "
                            f"({', '.join(REQUIRED_COLUMNS.get(path.stem, ()))} ...) and its rows")
    try:
        # Strings only (ids such as "007" keep their zeros), as contract.read_contract_dir reads them.
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], nrows=nrows)
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8 CSV, or as parquet") from None
    except pd.errors.EmptyDataError:
        raise ContractError(f"{path}: no header row; the first line must name the columns ({CONTRACT_HINT})") from None
    except pd.errors.ParserError as exc:
        raise ContractError(f"{path}: not a readable CSV: {str(exc).strip()}; check that row's quoting and "
                            "number of fields") from None


def _read_parquet(path: Path, nrows: int | None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if nrows is None:
            return pd.read_parquet(path)
        parquet = pq.ParquetFile(path)
        batch = next(parquet.iter_batches(batch_size=nrows), None)
        return (batch.to_pandas() if batch is not None else parquet.schema_arrow.empty_table().to_pandas())
    except (pa.ArrowException, OSError) as exc:
        raise ContractError(f"{path}: not a readable parquet file ({exc}); export the table again") from None


def _read(path: Path) -> pd.DataFrame:
    return read_table(path)


def newest_event(directory: str | Path) -> pd.Timestamp | None:
    """The newest interaction time of a contract directory, reading only the timestamp column (None: no events)."""
    path = find_table(Path(directory), "interactions")
    if path is None:
        raise ContractError(f"{directory}: no interactions.parquet (or .csv); see DATA_CONTRACT.md")
    column = pd.read_parquet(path, columns=[TIMESTAMP]) if path.suffix == ".parquet" else \
        pd.read_csv(path, usecols=[TIMESTAMP], dtype=str, keep_default_na=False, na_values=[""])
    newest = parse_timestamps(column[TIMESTAMP]).max()
    return None if pd.isna(newest) else newest


def read_contract_dir(directory: str | Path) -> ContractTables:
    """Read a directory holding the contract tables as parquet or csv and normalise them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ContractError(f"{directory}: not a directory; give a folder holding interactions.parquet|csv, "
                            "items.parquet|csv and optionally users.parquet|csv")
    paths = {name: find_table(directory, name) for name in TABLES}
    missing = [name for name in REQUIRED_TABLES if paths[name] is None]
    if missing:
        raise ContractError(
            f"{directory}: missing {', '.join(m + '.parquet (or .csv)' for m in missing)}; "
            "see DATA_CONTRACT.md for the columns"
        )
    interactions = normalise_interactions(_read(paths["interactions"]))
    items = normalise_items(_read(paths["items"]))
    users = normalise_users(_read(paths["users"])) if paths["users"] else empty_users()
    log.info("read %s: %s", directory, {k: str(v.name) if v else None for k, v in paths.items()})
    return ContractTables(interactions, items, users)


def write_contract_dir(tables: ContractTables, directory: str | Path) -> dict[str, str]:
    """Write the tables as a contract directory (parquet, UTC timestamps, string ids)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in TABLES:
        df = getattr(tables, name)
        path = directory / f"{name}.parquet"
        df.to_parquet(path, index=False)
        out[name] = str(path)
    return out
