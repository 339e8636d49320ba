"""Ranking sets: one query per user at a cut, the pool of a fit that never saw the label window, feature rows
by the shared assembly (:mod:`pipeline_tasks.online.two_stage`) and graded labels from the window after the cut.

Grades (:data:`GRADES`): the best event type of the user's new items in the label window, purchase 4 >
add_to_cart 3 > click / favorite 2 > view 1 > none 0. Items the user had interacted with before the cut are never
candidates (seen items are excluded), so labels are new items only, as in the offline protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_tasks.core.constants import EVENT_TYPE, ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS, QUERY_ID
from pipeline_tasks.online.two_stage import Fit, Moment, candidate_blocks

log = logging.getLogger(__name__)

GRADES = {"purchase": 4, "add_to_cart": 3, "click": 2, "favorite": 2, "view": 1}
LABEL = "label"
SOURCE_KEYS = ("two_tower", "i2i", "content", "trending", "popularity")


def truth_keys(users: Sequence[str], truth: dict[str, set[str]], index: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``row * n_items + item`` keys of each block user's relevant items, and each row's count."""
    n = len(index)
    rows, cols = [], []
    for r, user in enumerate(users):
        idx = index.get_indexer(list(truth[user]))
        rows.append(np.full(len(idx), r, dtype=np.int64))
        cols.append(idx)
    r, c = np.concatenate(rows), np.concatenate(cols)
    counts = np.array([len(truth[u]) for u in users], dtype=np.float64)
    return np.sort(r[c >= 0] * n + c[c >= 0]), counts


def recall_sum(keys: np.ndarray, truth_keys: np.ndarray, counts: np.ndarray, n_items: int) -> float:
    """Sum over rows of (retrieved relevant items / relevant items), from ``row * n_items + item`` keys."""
    unique = np.unique(keys)
    rows = unique[np.isin(unique, truth_keys)] // n_items
    return float((np.bincount(rows, minlength=len(counts)) / counts).sum())


def label_grades(history: pd.DataFrame, future: pd.DataFrame) -> pd.DataFrame:
    """``user_id, item_id, label``: each user's new items in ``future`` (not in ``history``) with their best grade."""
    seen = pd.MultiIndex.from_frame(history[[USER_ID, ITEM_ID]].astype(str).drop_duplicates())
    f = future[[USER_ID, ITEM_ID, EVENT_TYPE]].astype({USER_ID: str, ITEM_ID: str})
    f = f[~pd.MultiIndex.from_frame(f[[USER_ID, ITEM_ID]]).isin(seen)]
    grade = f[EVENT_TYPE].map(GRADES).fillna(1).astype(np.int8)
    out = f.assign(**{LABEL: grade}).groupby([USER_ID, ITEM_ID], sort=False)[LABEL].max().reset_index()
    return out


class RankingSetStats(TypedDict):
    """What a ranking-set build wrote and how fast."""

    path: str
    rows: int
    queries: int
    queries_with_positive: int
    positives_in_pool: int
    label_items: int
    pool_recall: float  # mean over labelled users of (label items in the pool / label items)
    source_recall: dict[str, float]  # the same for each source's own top pool_size list
    seconds: float
    rows_per_second: float


def build_ranking_set(fit: Fit, moment: Moment, labels: pd.DataFrame, out_path: str | Path,
                      user_ids: Sequence[str] | None = None) -> RankingSetStats:
    """Write the ranking set of ``user_ids`` (default: the labelled users) at ``moment`` to ``out_path``.

    Rows: ``query_id, user_id, item_id, label`` and :data:`FEATURE_COLUMNS`, block by block (bounded memory).
    """
    started = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    users = list(dict.fromkeys(str(u) for u in (user_ids if user_ids is not None else labels[USER_ID])))
    by_user = labels.groupby(labels[USER_ID].astype(str))
    label_sets = {u: set(g[ITEM_ID].astype(str)) for u, g in by_user}
    label_key = pd.Series(labels[LABEL].to_numpy(),
                          index=pd.MultiIndex.from_arrays([labels[USER_ID].astype(str), labels[ITEM_ID].astype(str)]))
    label_key = label_key[~label_key.index.duplicated()]
    writer: pq.ParquetWriter | None = None
    rows = queries = with_positive = positives = 0
    recall_total = 0.0
    item_index = pd.Index(fit.item_ids)
    source_sum = {s: 0.0 for s in SOURCE_KEYS}
    labelled = 0
    try:
        for block in candidate_blocks(fit, moment, users):
            pool = block.pool
            key = pd.MultiIndex.from_arrays([pool[USER_ID].astype(str), pool[ITEM_ID].astype(str)])
            grade = label_key.reindex(key).fillna(0).to_numpy(dtype=np.int8)
            frame = pd.concat([pool[[QUERY_ID, USER_ID, ITEM_ID]].reset_index(drop=True),
                               pd.DataFrame({LABEL: grade}), block.features.reset_index(drop=True)], axis=1)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(out_path, table.schema)
            writer.write_table(table)
            rows += len(frame)
            queries += frame[QUERY_ID].nunique()
            hits = frame[frame[LABEL] > 0].groupby(USER_ID).size()
            with_positive += len(hits)
            positives += int(hits.sum())
            labelled_users = [u for u in block.user_ids if label_sets.get(u)]
            if labelled_users:
                labelled += len(labelled_users)
                recall_total += float(sum(hits.get(u, 0) / len(label_sets[u]) for u in labelled_users))
                rows_of = {u: r for r, u in enumerate(block.user_ids)}
                wanted, counts = truth_keys(labelled_users, label_sets, item_index)
                picked = np.array([rows_of[u] for u in labelled_users])
                for s, (idx, _) in block.source_lists.items():
                    sub = idx[picked]
                    r, c = np.nonzero(sub >= 0)
                    source_sum[s] += recall_sum(r.astype(np.int64) * len(item_index) + sub[r, c], wanted, counts,
                                                len(item_index))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no users: an empty file with the schema
        empty = pd.DataFrame({QUERY_ID: [], USER_ID: [], ITEM_ID: [], LABEL: pd.Series([], dtype=np.int8)})
        for col in FEATURE_COLUMNS:
            empty[col] = pd.Series([], dtype=np.float32)
        empty.to_parquet(out_path, index=False)
    seconds = time.perf_counter() - started
    stats = RankingSetStats(
        path=str(out_path), rows=rows, queries=queries, queries_with_positive=with_positive,
        positives_in_pool=positives, label_items=int(len(labels)),
        pool_recall=round(recall_total / labelled, 4) if labelled else 0.0,
        source_recall={s: round(v / labelled, 4) if labelled else 0.0 for s, v in source_sum.items()},
        seconds=round(seconds, 2), rows_per_second=round(rows / seconds, 1) if seconds > 0 else 0.0)
    log.info("ranking set %s: %d rows, %d queries (%d with a positive), pool recall %.3f, %.0f rows/s", out_path,
             rows, queries, with_positive, stats["pool_recall"], stats["rows_per_second"])
    return stats


def window_labels(history: pd.DataFrame, future: pd.DataFrame, at: pd.Timestamp) -> pd.DataFrame:
    """Labels of the window starting at ``at``: ``future`` events at or after it, graded, new items only."""
    return label_grades(history[history[TIMESTAMP] < at], future[future[TIMESTAMP] >= at])
