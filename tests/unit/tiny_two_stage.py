"""A ten-item catalog, its history and small two-stage fits (no two-tower model) for unit tests.

Distinct users per item before :data:`AT` (what the popularity source counts) are :data:`POPULAR`; i8 and i9 are
the most popular but not servable (i8 unavailable, i9 created after AT), and i5 is allowed in DE only. u1 saw i0;
u2 and u3 saw i0 too, then i1 and i2 respectively, so u1's item-to-item neighbours (its whole pool) are i1 (i2i
rank 1) and i2 (rank 2).
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd

from pipeline_tasks.online.candidates import CandidateConfig, build_item_graph
from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS
from pipeline_tasks.online.two_stage import Fit

AT = pd.Timestamp("2025-02-01", tz="UTC")
ITEMS = [f"i{n}" for n in range(10)]
POPULAR = {"i3": 6, "i4": 5, "i5": 4, "i6": 3, "i7": 2, "i8": 7, "i9": 8}


def ts(day: float) -> pd.Timestamp:
    """Day ``day`` of January 2025 (0: Jan 1st), UTC."""
    return pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=day)


def items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": ITEMS, "category": list("aabbccddee"),
                         "created_at": [ts(0)] * 9 + [ts(40)],
                         "available": [True] * 8 + [False, True],
                         "regions": [None] * 5 + ["DE"] + [None] * 4})


def history() -> pd.DataFrame:
    rows = [(f"p{j}", item, 5) for item, n in POPULAR.items() for j in range(n)]
    rows += [("u1", "i0", 10), ("u2", "i0", 3), ("u2", "i1", 4), ("u3", "i0", 3), ("u3", "i2", 4)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "day"])
    return df.assign(timestamp=df["day"].map(ts), event_type="view").drop(columns="day")


def ranker(prefer_later_pool_ranks: bool = True) -> lgb.Booster:
    """A lambdarank booster whose score rises (or, with False, falls) with ``i2i_rank``: rising, it reverses the
    pool's own order, so a test sees the ranker's order, not the pool's."""
    rng = np.random.default_rng(0)
    x = np.full((400, len(FEATURE_COLUMNS)), np.nan)
    col = FEATURE_COLUMNS.index("i2i_rank")
    x[:, col] = rng.integers(1, 6, size=400)
    label = x[:, col] - 1 if prefer_later_pool_ranks else 5 - x[:, col]
    data = lgb.Dataset(x, label.astype(int), group=[20] * 20, feature_name=FEATURE_COLUMNS,
                       params={"verbosity": -1, "min_data_in_bin": 1})
    return lgb.train({"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 5, "num_leaves": 7,
                      "seed": 0, "deterministic": True, "num_threads": 1}, data, num_boost_round=20)


def fit(events: pd.DataFrame, prefer_later_pool_ranks: bool = True) -> Fit:
    """A fit whose pool is the item-to-item neighbours only (N = 2), with :func:`ranker`."""
    # Every other source weighted 0 explicitly: a saved config's missing weights load as the defaults.
    cfg = CandidateConfig(pool_size=2, weights={"two_tower": 0.0, "i2i": 1.0, "content": 0.0, "trending": 0.0,
                                                "popularity": 0.0})
    return Fit(None, build_item_graph(events, ITEMS, None, cfg), cfg, ranker(prefer_later_pool_ranks), {})
