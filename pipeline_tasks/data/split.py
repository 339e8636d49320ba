"""Time-based split of accepted interactions (DATA_CONTRACT.md): never random.

Sort by timestamp (stable: input order breaks ties); ``t_val`` = timestamp at position
floor(0.8 n), ``t_test`` = at floor(0.9 n); train < t_val <= validation < t_test <= test.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypedDict

import pandas as pd

from pipeline_tasks.core.constants import DEFAULT_SPLIT, TIMESTAMP, USER_ID
from pipeline_tasks.data.contract import read_contract_dir
from pipeline_tasks.data.validate import to_utc

log = logging.getLogger(__name__)

WINDOWS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Either fractions (positions floor(f·n)) or explicit boundary timestamps."""

    val_fraction: float = DEFAULT_SPLIT[0]
    test_fraction: float = DEFAULT_SPLIT[1]
    t_val: datetime | str | None = None
    t_test: datetime | str | None = None

    def __post_init__(self) -> None:
        if (self.t_val is None) != (self.t_test is None):
            raise ValueError("give both t_val and t_test, or neither (then the fractions are used)")
        if not 0 < self.val_fraction < self.test_fraction < 1:
            raise ValueError(f"need 0 < val_fraction < test_fraction < 1, got {self.val_fraction}, "
                             f"{self.test_fraction}")


def boundaries(interactions: pd.DataFrame, config: SplitConfig) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The two boundary timestamps for these interactions."""
    if config.t_val is not None:
        t_val, t_test = to_utc(config.t_val), to_utc(config.t_test)
        if not t_val < t_test:
            raise ValueError(f"t_val ({t_val}) must be before t_test ({t_test})")
        return t_val, t_test
    n = len(interactions)
    if n == 0:
        raise ValueError("cannot split: no accepted interactions")
    ordered = interactions[TIMESTAMP].sort_values(kind="stable").reset_index(drop=True)
    return ordered.iloc[math.floor(config.val_fraction * n)], ordered.iloc[math.floor(config.test_fraction * n)]


def time_split(interactions: pd.DataFrame, config: SplitConfig) -> dict[str, pd.DataFrame]:
    """Split into train / validation / test windows (each in timestamp order, ties in input order)."""
    t_val, t_test = boundaries(interactions, config)
    ordered = interactions.sort_values(TIMESTAMP, kind="stable")
    ts = ordered[TIMESTAMP]
    return {
        "train": ordered[ts < t_val].reset_index(drop=True),
        "validation": ordered[(ts >= t_val) & (ts < t_test)].reset_index(drop=True),
        "test": ordered[ts >= t_test].reset_index(drop=True),
    }


class SplitResult(TypedDict):
    """The three windows' parquet files, ``split.json`` and the boundaries."""

    train: str
    validation: str
    test: str
    split_info: str
    t_val: str
    t_test: str
    counts: dict[str, int]


def split_contract_dir(accepted_dir: str | Path, out_dir: str | Path, config: SplitConfig) -> SplitResult:
    """The ``split`` stage: write ``<window>.parquet`` and ``split.json`` (boundaries and counts)."""
    tables = read_contract_dir(accepted_dir)
    t_val, t_test = boundaries(tables.interactions, config)
    windows = time_split(tables.interactions, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in WINDOWS:
        paths[name] = str(out / f"{name}.parquet")
        windows[name].to_parquet(paths[name], index=False)
    info = {
        "t_val": t_val.isoformat(),
        "t_test": t_test.isoformat(),
        "explicit_boundaries": config.t_val is not None,
        "fractions": [config.val_fraction, config.test_fraction],
        "counts": {name: len(windows[name]) for name in WINDOWS},
        "users": {name: int(windows[name][USER_ID].nunique()) for name in WINDOWS},
        "ranges": {
            name: [str(w[TIMESTAMP].min()), str(w[TIMESTAMP].max())] if len(w) else [None, None]
            for name, w in windows.items()
        },
    }
    (out / "split.json").write_text(json.dumps(info, indent=2))
    log.info("split %s at t_val=%s t_test=%s: %s", accepted_dir, info["t_val"], info["t_test"], info["counts"])
    return SplitResult(train=paths["train"], validation=paths["validation"], test=paths["test"],
                       split_info=str(out / "split.json"), t_val=info["t_val"], t_test=info["t_test"],
                       counts=info["counts"])
