"""A quick check of a data source before a run: the header and first rows of each table, read as ingest reads them.

A bad source fails here in seconds with one :class:`ContractError` (permanent: no retry) naming the
file, the column or row, and what to do, instead of a raw pandas error deep inside the run.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pipeline_tasks.core.constants import REQUIRED_COLUMNS, REQUIRED_TABLES, TABLES
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.data.contract import (
    CONTRACT_HINT,
    ContractError,
    normalise_interactions,
    normalise_items,
    normalise_users,
    read_table,
)

log = logging.getLogger(__name__)

SAMPLE_ROWS = 1000
SOURCE_HINT = ("give --data synthetic, movielens:PATH or a directory holding interactions.parquet|csv and "
               "items.parquet|csv (users optional)")
_NORMALISE = {"interactions": normalise_interactions, "items": normalise_items, "users": normalise_users}


def check_table(name: str, path: Path, nrows: int = SAMPLE_ROWS) -> int:
    """Check one table file: readable, the required columns present, its first rows normalise; returns the rows read."""
    sample = read_table(path, nrows)
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in sample.columns]
    if missing:
        raise ContractError(f"{path}: missing required column(s) {', '.join(missing)} (the file has "
                            f"{', '.join(map(str, sample.columns)) or 'no columns'}); add them or rename the "
                            f"matching columns ({CONTRACT_HINT})")
    if name in REQUIRED_TABLES and sample.empty:
        raise ContractError(f"{path}: has a header but no rows; export the {name} table with its rows")
    try:
        _NORMALISE[name](sample)
    except (ValueError, TypeError) as exc:
        raise ContractError(f"{path}: rows 1-{len(sample)}: {exc}") from None
    return len(sample)


def check_contract_dir(directory: Path) -> dict[str, Path]:
    """Check a contract directory's tables (header and first rows); returns the table files found."""
    if not directory.exists():
        raise ContractError(f"{directory}: no such directory; {SOURCE_HINT}")
    if not directory.is_dir():
        raise ContractError(f"{directory}: a file, not a directory; give the directory that holds the tables "
                            f"({SOURCE_HINT})")
    found = {}
    for name in TABLES:
        for ext in (".parquet", ".csv"):  # the order contract.read_contract_dir looks in
            if (directory / f"{name}{ext}").exists():
                found[name] = directory / f"{name}{ext}"
                break
    missing = [name for name in REQUIRED_TABLES if name not in found]
    if missing:
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise ContractError(f"{directory}: missing {' and '.join(m + '.parquet (or .csv)' for m in missing)} "
                            f"(the directory holds {', '.join(present) or 'nothing'}); {CONTRACT_HINT}")
    for name, path in found.items():
        check_table(name, path)
    return found


def check_movielens(path: Path) -> str:
    """Check a MovieLens folder: its format's files exist and the ratings' first lines parse; returns the format."""
    from pipeline_tasks.data.movielens import detect_format

    if not path.is_dir():
        raise ContractError(f"{path}: no such directory; give movielens:PATH with the folder holding u.data "
                            "(100K) or ratings.dat (1M)")
    fmt = detect_format(path)
    needed = ("u.data", "u.item", "u.genre", "u.user") if fmt == "100k" else ("ratings.dat", "movies.dat")
    absent = [f for f in needed if not (path / f).exists()]
    if absent:
        raise ContractError(f"{path}: MovieLens {fmt} folder without {', '.join(absent)}; unpack the whole archive")
    ratings, sep, fields = (path / "u.data", "\t", 4) if fmt == "100k" else (path / "ratings.dat", "::", 4)
    with ratings.open(encoding="latin-1") as fh:
        for number, line in enumerate(fh, start=1):
            if number > SAMPLE_ROWS:
                break
            parts = line.rstrip("\n").split(sep)
            if line.strip() and (len(parts) != fields or not all(p.strip().lstrip("-").isdigit() for p in parts)):
                raise ContractError(f"{ratings}: line {number} is not 'user{sep}movie{sep}rating{sep}timestamp' "
                                    f"numbers: {line.strip()[:80]!r}")
    return fmt


def check_source(source: str, synthetic: dict[str, Any] | None = None) -> None:
    """Check a run's source before it starts: ``synthetic`` settings, a MovieLens folder or a contract directory.

    Raises :class:`ContractError` (a bad source) or :class:`InvalidParamsError` (bad generator settings).
    """
    if source == "synthetic":
        from pipeline_tasks.data.ingest import synthetic_config

        try:
            synthetic_config(copy.deepcopy(synthetic or {}))  # it pops keys of what it is given
        except (ValueError, TypeError) as exc:
            raise InvalidParamsError(f"synthetic: {exc}") from None
        return
    if source.startswith("movielens:"):
        check_movielens(Path(source.removeprefix("movielens:")).expanduser())
        return
    check_contract_dir(Path(source).expanduser())
    log.info("source %s: headers and first rows read", source)
