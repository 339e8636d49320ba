"""The ranker's feature rows: one function, :func:`assemble_features`, shared by the ranking set, the offline
evaluation, ``recsys recommend`` and the service.

A row describes one candidate of one query (a user at a request time) from four parts:

- **user state**: the user's Feast ``user_stats_fv`` row valid at the request and their per-category history
  before it (:func:`category_state`);
- **item state**: the item's Feast ``item_stats_fv`` row valid at the request;
- **context**: the request's time, device and location (:func:`context_features`, cross features included);
- **candidate**: each source's rank and score from :mod:`pipeline_tasks.online.candidates`. Raw scores are
  on each fit's own scale, so scores enter as per-query z-scores; ranks and the fused score are comparable.

Columns are :data:`FEATURE_COLUMNS`, float32, in that order; missing values are NaN (LightGBM's missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.online.arrays import utc_ns
from pipeline_tasks.online.candidates import SECONDS_PER_DAY, SOURCES
from pipeline_tasks.online.context_features import (
    CONTEXT_FEATURE_COLUMNS,
    CONTEXT_ITEM_COLUMNS,
    CONTEXT_USER_COLUMNS,
    REQUEST_TIMESTAMP,
    column_array,
    context_feature_arrays,
)

QUERY_ID = "query_id"
PRIOR = "prior_weight"  # the ranker hyper-parameter of prior_scores
USER_NUMERIC = [
    "user_total_interactions", "user_unique_items", "user_n_view", "user_n_click", "user_n_add_to_cart",
    "user_n_purchase", "user_n_favorite", "user_ctr", "user_conversion_rate", "user_mean_session_events",
    "user_mean_session_minutes",
]
ITEM_NUMERIC = [
    "item_n_view", "item_n_click", "item_n_purchase", "item_total_interactions", "item_unique_users",
    "item_interactions_30d", "item_ctr", "item_conversion_rate", "item_popularity", "item_trending_score",
]
CANDIDATE_COLUMNS = [*(f"{s}_rank" for s in SOURCES), *(f"{s}_score_z" for s in SOURCES),
                     "fused_score", "pool_rank", "n_sources"]
HISTORY_COLUMNS = ["category_affinity", "days_since_category", "user_history_events"]
FEATURE_COLUMNS = [*CANDIDATE_COLUMNS, *HISTORY_COLUMNS, *USER_NUMERIC, *ITEM_NUMERIC, *CONTEXT_FEATURE_COLUMNS]


def category_state(history: pd.DataFrame, user_ids: Sequence[str], item_category: pd.Series,
                   at: pd.Timestamp) -> pd.DataFrame:
    """Per (user, category): share of the user's events before ``at`` in it and days since the last one.

    ``item_category`` maps item id -> category. Returns columns ``user_id, category, category_affinity,
    days_since_category, user_history_events``.
    """
    wanted = pd.Index([str(u) for u in user_ids])
    h = history[(history[TIMESTAMP] < at)]
    users = h[USER_ID].astype(str).to_numpy()
    h = h[wanted.get_indexer(users) >= 0]
    if not len(h):
        return pd.DataFrame(columns=[USER_ID, "category", *HISTORY_COLUMNS])
    users = h[USER_ID].astype(str).to_numpy()
    pos = item_category.index.get_indexer(h[ITEM_ID].astype(str).to_numpy())  # the catalog's ids are unique
    category = item_category.to_numpy(dtype=object)[np.where(pos >= 0, pos, 0)] if len(item_category) else \
        np.full(len(pos), None, dtype=object)
    category = np.where((pos >= 0) & pd.notna(category), category, "unknown").astype(object)
    stamps = utc_ns(h[TIMESTAMP])
    # Groups (user, category) in order of first appearance, as a groupby with sort=False gives them.
    u_codes, u_uniques = pd.factorize(users)
    c_codes, c_uniques = pd.factorize(category)
    codes, pairs = pd.factorize(u_codes.astype(np.int64) * len(c_uniques) + c_codes)
    size = np.bincount(codes, minlength=len(pairs))
    latest = np.full(len(pairs), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(latest, codes, stamps)
    g_user_codes = pairs // len(c_uniques)
    totals = np.bincount(g_user_codes, weights=size, minlength=len(u_uniques))[g_user_codes]
    at_ns = pd.Timestamp(at).tz_convert("UTC").value if pd.Timestamp(at).tzinfo else pd.Timestamp(at).value
    return pd.DataFrame({USER_ID: np.asarray(u_uniques, dtype=object)[g_user_codes],
                         "category": np.asarray(c_uniques, dtype=object)[pairs % len(c_uniques)],
                         "category_affinity": size / totals,
                         "days_since_category": ((at_ns - latest) / 1e9) / SECONDS_PER_DAY,
                         "user_history_events": totals.astype(float)})


def _strs(values: pd.Series | np.ndarray) -> np.ndarray:
    """A column as an object array of strings (``astype(str)``, skipped when every value is a string already)."""
    array = np.asarray(values)
    if array.dtype == object and pd.api.types.infer_dtype(array, skipna=False) == "string":
        return array
    return pd.Series(array, dtype=object).astype(str).to_numpy() if array.dtype == object else array.astype(str)


def _rows(table: pd.DataFrame | Mapping[str, np.ndarray]) -> int:
    """How many rows a frame or a mapping of aligned column arrays has."""
    if isinstance(table, pd.DataFrame):
        return len(table)
    return len(next(iter(table.values()))) if len(table) else 0


def _zscore(values: np.ndarray | pd.Series, query: np.ndarray | pd.Series, codes: np.ndarray | None = None
            ) -> np.ndarray:
    """Per-query z-score of ``values`` (NaN skipped; population std; a query with zero spread gets std 1);
    ``codes`` is ``query`` factorized, when the caller has it already."""
    if codes is None:
        codes, _ = pd.factorize(np.asarray(query, dtype=object))
    x = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(x)
    k = int(codes.max()) + 1 if len(codes) else 0
    count = np.bincount(codes[ok], minlength=k).astype(np.float64)
    total = np.bincount(codes[ok], weights=x[ok], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        dev = np.where(ok, x - mean[codes], 0.0)
        var = np.bincount(codes, weights=dev * dev, minlength=k) / count
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)
    return ((x - mean[codes]) / std[codes]).astype(np.float32)


def keyed_rows(rows: pd.DataFrame | None, key: str, keep: str = "last") -> pd.DataFrame | None:
    """Rows indexed by their string ``key`` (one row per key, the ``keep`` one): what :func:`assemble_features`
    aligns candidates to. A serving process keys its rows once; frames already keyed pass through."""
    if rows is None or not len(rows):
        return None
    if rows.index.name == key and rows.index.is_unique:
        return rows
    table = rows.assign(**{key: rows[key].astype(str)}).drop_duplicates(key, keep=keep)
    return table.set_index(table[key].rename(key)).rename_axis(key)


def _missing_where(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """``values`` with the ``missing`` positions null: NaN (numbers, as float64), NaT (timestamps) or NaN in an
    object array."""
    if not missing.any():
        return values
    if values.dtype.kind == "M":
        values = values.copy()
        values[missing] = np.datetime64("NaT")
        return values
    values = values.astype(np.float64 if values.dtype.kind in "biuf" else object)
    values[missing] = np.nan
    return values


@dataclass(frozen=True)
class KeyedRows:
    """Rows by string key as one array per column (:func:`column_array`): what a request aligns its candidates to
    without touching a frame. A serving process builds it once per snapshot."""

    index: pd.Index
    columns: dict[str, np.ndarray]

    @classmethod
    def of(cls, rows: pd.DataFrame | KeyedRows | None, key: str) -> KeyedRows | None:
        """``rows`` keyed by ``key`` (:func:`keyed_rows`, the last row per key); None when there are none."""
        if rows is None or isinstance(rows, KeyedRows):
            return rows
        table = keyed_rows(rows, key)
        if table is None:
            return None
        return cls(pd.Index(table.index, dtype=object), {c: column_array(table[c]) for c in table.columns})

    def aligned(self, keys: np.ndarray, columns: Sequence[str], pos: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
        """``columns`` of each key's row (NaN where the key has none), taken by position (``pos``: the keys'
        positions in :attr:`index`, -1 for none, when the caller knows them)."""
        pos = self.index.get_indexer(keys) if pos is None else pos
        hit = pos >= 0
        take = np.where(hit, pos, 0)
        out = {}
        for col in columns:
            source = self.columns.get(col)
            if source is None:
                continue
            out[col] = _missing_where(source[take], ~hit)
        return out


def assemble_features(candidates: pd.DataFrame | Mapping[str, np.ndarray], user_rows: pd.DataFrame | None,
                      item_rows: pd.DataFrame | None, requests: pd.DataFrame | Mapping[str, np.ndarray],
                      categories: pd.DataFrame | Mapping[str, np.ndarray] | None,
                      item_positions: np.ndarray | None = None) -> pd.DataFrame:
    """Feature rows of ``candidates`` (one per row, same order and index). ``candidates``, ``requests`` and
    ``categories`` are frames or mappings of aligned column arrays (what a request passes, without frames).

    Args:
        candidates: ``query_id``, ``user_id``, ``item_id``, ``category`` (the item's) and the pool columns of
            :func:`pipeline_tasks.online.candidates.fuse` (``{source}_rank``, ``{source}_score``,
            ``fused_score``, ``pool_rank``, ``n_sources``).
        user_rows: Feast user features valid at the request, one row per ``user_id`` (None: unknown), as a frame
            or :class:`KeyedRows`.
        item_rows: Feast item features valid at the request, one row per ``item_id`` (None: unknown).
        requests: one row per ``query_id``: ``request_timestamp``, ``device``, ``location``.
        categories: :func:`category_state` of the queries' users at the request time.
        item_positions: each candidate's row in ``item_rows`` (a :class:`KeyedRows`; -1: none), when the caller
            has them (a server maps its catalog to the rows once per snapshot).

    Returns:
        :data:`FEATURE_COLUMNS` as float32.
    """
    n = _rows(candidates)
    out: dict[str, np.ndarray] = {}
    query = np.asarray(candidates[QUERY_ID])
    codes, _ = pd.factorize(np.asarray(query, dtype=object))
    for s in SOURCES:
        rank = candidates.get(f"{s}_rank")
        out[f"{s}_rank"] = np.asarray(rank, dtype=np.float32) if rank is not None else np.full(n, np.nan, np.float32)
        score = candidates.get(f"{s}_score")
        out[f"{s}_score_z"] = _zscore(np.asarray(score, dtype=np.float64), query, codes) if score is not None \
            else np.full(n, np.nan, np.float32)
    for col in ("fused_score", "pool_rank", "n_sources"):
        out[col] = np.asarray(candidates[col], dtype=np.float32)

    user_keys = _strs(candidates[USER_ID])
    item_keys = _strs(candidates[ITEM_ID])
    if categories is not None and _rows(categories):
        state_users = _strs(categories[USER_ID])
        m = len(state_users)
        # (user, category) pairs as integer keys over the state's and the candidates' values together.
        u_codes, _ = pd.factorize(np.concatenate([state_users, user_keys]))
        c_codes, c_uniques = pd.factorize(np.concatenate([_strs(categories["category"]),
                                                          _strs(candidates["category"])]))
        keys = u_codes.astype(np.int64) * max(len(c_uniques), 1) + c_codes
        pos = pd.Index(keys[:m]).get_indexer(keys[m:])  # the state's pairs are unique
        hit = pos >= 0
        for col in ("category_affinity", "days_since_category"):
            values = np.full(n, np.nan, np.float32)
            values[hit] = np.asarray(categories[col], dtype=np.float32)[pos[hit]]
            out[col] = values
        out["category_affinity"] = np.nan_to_num(out["category_affinity"], nan=0.0)
        first_row = np.full(int(u_codes.max()) + 1 if len(u_codes) else 0, -1, dtype=np.int64)
        users_in_state, first = np.unique(u_codes[:m], return_index=True)  # a user's first row: its total
        first_row[users_in_state] = first
        user_pos = first_row[u_codes[m:]]
        events = np.full(n, np.nan, np.float32)
        events[user_pos >= 0] = np.asarray(categories["user_history_events"], np.float32)[user_pos[user_pos >= 0]]
        out["user_history_events"] = events
    else:
        for col in HISTORY_COLUMNS:
            out[col] = np.full(n, np.float32(0.0) if col != "days_since_category" else np.nan, np.float32)

    # Each query's first row; a query is one user (the pool's), so what is the user's or the request's is looked
    # up once per query and given to its rows (row by row otherwise).
    first = np.full(int(codes.max()) + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(n))
    per_query = bool(n) and bool((user_keys == user_keys[first][codes]).all())
    user_table, item_table = KeyedRows.of(user_rows, USER_ID), KeyedRows.of(item_rows, ITEM_ID)
    user_columns = [*USER_NUMERIC, *CONTEXT_USER_COLUMNS]
    users_of_query = user_table.aligned(user_keys[first], user_columns) if user_table and per_query else {}
    users = {c: v[codes] for c, v in users_of_query.items()} if per_query else \
        user_table.aligned(user_keys, user_columns) if user_table else {}
    items = item_table.aligned(item_keys, [*ITEM_NUMERIC, *CONTEXT_ITEM_COLUMNS], item_positions) if item_table \
        else {}
    for cols, table in ((USER_NUMERIC, users), (ITEM_NUMERIC, items)):
        for col in cols:
            values = table.get(col)
            if values is None:
                out[col] = np.full(n, np.nan, np.float32)
                continue
            out[col] = values.astype(np.float32) if values.dtype.kind in "biuf" else \
                pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float32)
    req_pos = pd.Index(requests[QUERY_ID]).get_indexer(query[first])  # each query's request
    found = req_pos >= 0
    req: dict[str, np.ndarray] = {}
    for col in (REQUEST_TIMESTAMP, "device", "location"):
        if col not in requests:
            continue
        values = _missing_where(column_array(requests[col])[np.where(found, req_pos, 0)], ~found)
        req[col] = values if per_query else values[codes]
    # Rows without their event_timestamp: each is the daily snapshot valid at the request (context_features).
    if per_query:
        out.update(context_feature_arrays(req, users_of_query, items, n, query=codes))
    else:
        out.update(context_feature_arrays(req, users, items, n))
    # One float32 block, column-major so each column is written contiguously (pandas keeps it as is).
    matrix = np.empty((n, len(FEATURE_COLUMNS)), dtype=np.float32, order="F")
    for j, col in enumerate(FEATURE_COLUMNS):
        matrix[:, j] = out[col]
    index = candidates.index if isinstance(candidates, pd.DataFrame) else None
    return pd.DataFrame(matrix, columns=FEATURE_COLUMNS, index=index, copy=False)


def prior_scores(fused_score: np.ndarray, query: np.ndarray, weight: float) -> np.ndarray:
    """The ranker's starting point: ``weight`` x the per-query z-score of the fused pool score.

    The booster learns corrections to the pool's fusion order (LightGBM ``init_score``), so a ranker trained on
    few queries stays close to that order and one trained on many moves as far as its data supports; the
    weight is one of the tuned hyper-parameters (0: a plain ranker).
    """
    if weight == 0:
        return np.zeros(len(fused_score), dtype=np.float64)
    return weight * _zscore(np.asarray(fused_score, dtype=np.float64), query).astype(np.float64)
