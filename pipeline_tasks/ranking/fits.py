"""The three fits of a run and the data each one sees (the ranking scheme; README "Ranking without leakage").

==========  =====================  ====================  ===========================  ========================
fit         two-tower trained on   item graph from       its ranker learns from       used for
==========  =====================  ====================  ===========================  ========================
validation  train (chosen trial)   train                 —                            validation-window pools
protocol    train + validation     train + validation    validation pools, labels     test figures, the gate
                                                         from the validation window
serving     every window           every window          test pools (protocol fit),   ``recsys recommend``,
                                                         labels from the test window  the service
==========  =====================  ====================  ===========================  ========================

A ranker never learns from a label event that the retrieval fit which produced its candidates trained on:
the validation fit stops at ``t_val`` and its labels start there; the protocol fit stops at ``t_test`` and
the serving ranker's labels start there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.evaluation.metrics import targets
from pipeline_tasks.online.candidates import (
    BLOCK_CELLS,
    CandidateConfig,
    ItemTable,
    TwoTowerItems,
    UserHistory,
    build_item_graph,
    fuse,
    item_counts,
    source_lists,
)
from pipeline_tasks.online.two_stage import Fit, Moment
from pipeline_tasks.ranking.dataset import recall_sum, truth_keys

log = logging.getLogger(__name__)

FITS = ("validation", "protocol", "serving")
# Fusion weights tried on the validation window (pool recall@N decides); the first is the default.
WEIGHT_GRID: list[dict[str, float]] = [
    CandidateConfig().weights,
    {"two_tower": 1.0, "i2i": 1.0, "content": 1.0, "trending": 1.0, "popularity": 1.0},
    {"two_tower": 2.0, "i2i": 1.0, "content": 0.25, "trending": 0.25, "popularity": 0.1},
    {"two_tower": 1.0, "i2i": 2.0, "content": 0.5, "trending": 0.5, "popularity": 0.1},
    {"two_tower": 1.0, "i2i": 1.0, "content": 0.5, "trending": 1.5, "popularity": 0.25},
]
TRENDING_DAYS_GRID = (1.0, 7.0, 30.0)
# Item-to-item graphs tried on the validation window (i2i recall@N decides): cosine, and EASE at three
# regularisation strengths (the range ../shared/bench/baselines.py searches) when the catalog is small enough.
GRAPH_GRID: list[dict[str, Any]] = [{"graph": "cosine"}, *({"graph": "ease", "ease_lambda": lam}
                                                            for lam in (100.0, 500.0, 2000.0))]
# How a user's history seeds i2i (and content), tried with every graph: the config's own values first, then the
# user's recent 1,000 items at the same half-life, and at a one-year half-life (long histories of slow tastes).
HISTORY_GRID: list[dict[str, Any]] = [{}, {"recent_items": 1000},
                                      {"recent_items": 1000, "recency_half_life_days": 365.0}]


@dataclass
class RunData:
    """A run's windows (all columns), catalog and users."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    t_val: pd.Timestamp
    t_test: pd.Timestamp

    @property
    def trainval(self) -> pd.DataFrame:
        return pd.concat([self.train, self.validation], ignore_index=True)

    @property
    def everything(self) -> pd.DataFrame:
        return pd.concat([self.train, self.validation, self.test], ignore_index=True)


def load_run_data(split_dir: str | Path, accepted_dir: str | Path) -> RunData:
    """The split's windows and the accepted items and users tables."""
    import json

    d, a = Path(split_dir), Path(accepted_dir)
    info = json.loads((d / "split.json").read_text())
    windows = [pd.read_parquet(d / f"{w}.parquet") for w in ("train", "validation", "test")]
    for w in windows:
        w[TIMESTAMP] = pd.to_datetime(w[TIMESTAMP], utc=True)
    users = pd.read_parquet(a / "users.parquet") if (a / "users.parquet").exists() else None
    return RunData(*windows, pd.read_parquet(a / "items.parquet"), users, pd.Timestamp(info["t_val"]),
                   pd.Timestamp(info["t_test"]))


def content_vectors(model: Any) -> np.ndarray:
    """The two-tower model's content embeddings of its catalog (row i = encoder.item_ids[i])."""
    return np.asarray(model.catalog.content[1:], np.float32)


def choose_candidates(fit: Fit, moment: Moment, truth: dict[str, set[str]], base: CandidateConfig,
                      weight_grid: Sequence[dict[str, float]] = WEIGHT_GRID,
                      trending_grid: Sequence[float] = TRENDING_DAYS_GRID) -> tuple[CandidateConfig, list[dict]]:
    """The fusion weights and trending window with the best pool recall@N on the validation window.

    Every source is computed once per block of users; only the cheap fusion is repeated per combination.
    """
    users = choice_users(truth)
    index = pd.Index(fit.item_ids)
    n_items = len(index)
    catalog = ItemTable.build(moment.items, fit.item_ids, moment.at)
    hist = moment.history[moment.history[TIMESTAMP] < moment.at]
    popularity = item_counts(hist, fit.item_ids, moment.at)
    trending = {d: item_counts(hist, fit.item_ids, moment.at, days=d) for d in trending_grid}
    item_vectors = TwoTowerItems(fit.model.item_embeddings(moment.item_rows)) if fit.model is not None else None
    combos = [(d, w) for d in trending_grid for w in weight_grid]
    hits = np.zeros(len(combos))
    step = max(1, BLOCK_CELLS // max(n_items, 1))
    everything = replace(base, weights={s: 1.0 for s in base.weights})
    only_trending = replace(everything, weights={"trending": 1.0})
    for start in range(0, len(users), step):
        chunk = users[start:start + step]
        history = UserHistory.build(hist, chunk, fit.item_ids, moment.at, base, moment.users)
        user_vectors = fit.model.user_embeddings(chunk, hist, moment.user_rows, moment.users) \
            if fit.model is not None else None
        lists = source_lists(user_vectors, item_vectors, history, slice(0, len(chunk)), fit.graph, catalog,
                             trending[trending_grid[0]], popularity, everything)
        # Each trending window's list once (the other sources do not depend on it).
        trend_lists = {d: source_lists(None, None, history, slice(0, len(chunk)), fit.graph, catalog, trending[d],
                                       popularity, only_trending) for d in trending_grid}
        wanted, counts = truth_keys(chunk, truth, index)
        for c, (days, weights) in enumerate(combos):
            cfg = replace(base, weights=dict(weights), trending_days=days)
            lists.lists["trending"] = trend_lists[days].lists["trending"]
            lists.dense["trending"] = trend_lists[days].dense["trending"]
            pool = fuse(lists, cfg)
            pool = pool[pool["pool_rank"] <= cfg.pool_size]  # pool recall@N: the fused order's first N
            keys = pool["row"].to_numpy(np.int64) * n_items + pool["item"].to_numpy(np.int64)
            hits[c] += recall_sum(keys, wanted, counts, n_items)
    recall = hits / max(len(users), 1)
    table = [{"trending_days": d, "weights": w, "pool_recall": round(float(r), 4)}
             for (d, w), r in zip(combos, recall, strict=True)]
    best = int(np.argmax(recall))  # first best: the default wins ties
    chosen = replace(base, weights=dict(combos[best][1]), trending_days=combos[best][0])
    log.info("candidate fusion chosen on validation: trending %s days, weights %s (pool recall@%d %.4f; "
             "default %.4f)", chosen.trending_days, chosen.weights, base.pool_size, recall[best], recall[0])
    return chosen, table


# Users the validation choices (graph, fusion) are scored on at most: recall over a few thousand users
# separates the options as well as over all of them, and the choice stays minutes at any data size.
CHOICE_USERS = 3000


def choice_users(truth: dict[str, set[str]], seed: int = 0) -> list[str]:
    """A seeded sample of at most :data:`CHOICE_USERS` validation users (all of them when fewer)."""
    users = sorted(truth)
    if len(users) <= CHOICE_USERS:
        return users
    rng = np.random.default_rng(seed)
    return sorted(users[i] for i in rng.choice(len(users), size=CHOICE_USERS, replace=False))


def choose_graph(fit: Fit, moment: Moment, truth: dict[str, set[str]], base: CandidateConfig,
                 content: np.ndarray | None, grid: Sequence[dict[str, Any]] = GRAPH_GRID,
                 history_grid: Sequence[dict[str, Any]] = HISTORY_GRID
                 ) -> tuple[CandidateConfig, Any, list[dict[str, Any]]]:
    """The item-to-item graph and history seeding (``recent_items``, ``recency_half_life_days``) with the best
    i2i recall@N on the validation window: (config, graph, table). Each graph is built once."""
    from pipeline_tasks.online.candidates import EASE_MAX_ITEMS, ItemTable, UserHistory, source_lists

    users = choice_users(truth)
    index = pd.Index(fit.item_ids)
    n_items = len(index)
    catalog = ItemTable.build(moment.items, fit.item_ids, moment.at)
    hist = moment.history[moment.history[TIMESTAMP] < moment.at]
    zeros = np.zeros(len(fit.item_ids), np.float32)
    only_i2i = replace(base, weights={"i2i": 1.0})
    histories = [replace(base, **option) for option in history_grid]
    built = [UserHistory.build(hist, users, fit.item_ids, moment.at, cfg, moment.users) for cfg in histories]
    step = max(1, BLOCK_CELLS // max(len(fit.item_ids), 1))
    table, best = [], None
    for option in grid:
        if option.get("graph") == "ease" and len(fit.item_ids) > EASE_MAX_ITEMS:
            continue
        graph = build_item_graph(hist, fit.item_ids, content, replace(base, **option))
        for seeding, history in zip(history_grid, built, strict=True):
            cfg = replace(base, **option, **seeding)
            hits = 0.0
            for start in range(0, len(users), step):
                rows = slice(start, min(start + step, len(users)))
                idx = source_lists(None, None, history, rows, graph, catalog, zeros, zeros, only_i2i).lists["i2i"][0]
                wanted, counts = truth_keys(users[rows], truth, index)
                r, c = np.nonzero(idx >= 0)
                hits += recall_sum(r.astype(np.int64) * n_items + idx[r, c], wanted, counts, n_items)
            recall = hits / max(len(users), 1)
            table.append({**option, "recent_items": cfg.recent_items,
                          "recency_half_life_days": cfg.recency_half_life_days, "i2i_recall": round(recall, 4)})
            if best is None or recall > best[0]:
                best = (recall, cfg, graph)
    assert best is not None
    log.info("item graph chosen on validation: %s, lambda %s, recent %d items, half-life %s days (i2i recall@%d "
             "%.4f); tried %s", best[1].graph, best[1].ease_lambda, best[1].recent_items,
             best[1].recency_half_life_days, base.pool_size, best[0], table)
    return best[1], best[2], table


def validation_truth(data: RunData) -> dict[str, set[str]]:
    """The protocol's validation users and their new items (``targets`` of train -> validation)."""
    return targets(data.train, data.validation)[0]


def test_truth(data: RunData) -> dict[str, set[str]]:
    """The protocol's test users and their new items."""
    return targets(data.trainval, data.test)[0]


def cold_truth(history: pd.DataFrame, future: pd.DataFrame) -> dict[str, set[str]]:
    """Users of the future window with no history before it (cold start) and their items."""
    known = set(history[USER_ID].astype(str))
    f = future[~future[USER_ID].astype(str).isin(known)]
    return {str(u): set(g[ITEM_ID].astype(str)) for u, g in f.groupby(f[USER_ID].astype(str))}


def build_graphs(data: RunData, models: dict[str, Any], config: CandidateConfig,
                 known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The item graph of each fit, from the history that fit may see (``known``: graphs already built)."""
    histories = {"validation": data.train, "protocol": data.trainval, "serving": data.everything}
    out = dict(known or {})
    for name in FITS:
        if name in out:
            continue
        model = models[name]
        out[name] = build_item_graph(histories[name], model.encoder.item_ids, content_vectors(model), config)
    return out
