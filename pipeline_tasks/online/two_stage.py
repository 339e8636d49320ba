"""Two-stage recommendations from a fit (two-tower, item graph, candidate config, ranker): the one request path.

The ranking set, the offline evaluation, ``recsys recommend`` and the service all go through
:func:`candidate_blocks` (candidates + feature rows for a block of users at a moment) and :func:`rank_block`
(ranker scores, optional business rules, top k), so they cannot drift apart.

A fit directory holds ``two_tower/`` (:mod:`pipeline_tasks.online.two_tower`), ``item_graph/``
(:class:`ItemGraph`), ``candidates.json`` (:class:`CandidateConfig`), ``ranker.txt`` (LightGBM) and
``fit.json`` (windows, features, params).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.online.arrays import utc_ns
from pipeline_tasks.online.candidates import (
    BLOCK_CELLS,
    SOURCES,
    CandidateConfig,
    ItemGraph,
    ItemTable,
    TwoTowerItems,
    UserHistory,
    context_trending,
    demographic_context,
    fuse_arrays,
    item_counts,
    ranked_order,
    source_lists,
    top_k,
    trending_rows,
)
from pipeline_tasks.online.context_features import column_array
from pipeline_tasks.online.ranking_features import (
    FEATURE_COLUMNS,
    PRIOR,
    QUERY_ID,
    KeyedRows,
    assemble_features,
    category_state,
    keyed_rows,
    prior_scores,
)
from pipeline_tasks.online.rules import apply_rules

log = logging.getLogger(__name__)

FIT_FILE = "fit.json"
POOL_ROWS_PER_BLOCK = 1_000_000
RANKER_FILE = "ranker.txt"


@dataclass
class Fit:
    """A loaded fit: everything to turn (history, features at a moment) into ranked lists."""

    model: Any  # TwoTowerModel | None
    graph: ItemGraph
    config: CandidateConfig
    ranker: Any = None  # lightgbm.Booster | None
    info: dict[str, Any] | None = None
    new_item_vectors: np.ndarray | None = None  # two-tower vectors of items added after the fit (with_new_items)

    @property
    def item_ids(self) -> list[str]:
        return self.graph.item_ids

    def save(self, out_dir: str | Path, info: dict[str, Any]) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            self.model.save(out / "two_tower")
        self.graph.save(out / "item_graph")
        (out / "candidates.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        if self.ranker is not None:
            self.ranker.save_model(str(out / RANKER_FILE))
        (out / FIT_FILE).write_text(json.dumps({**info, "features": FEATURE_COLUMNS}, indent=2, default=str))
        return out


def load_fit(fit_dir: str | Path) -> Fit:
    """Load a fit written by :meth:`Fit.save`."""
    from pipeline_tasks.online.two_tower import load_model

    d = Path(fit_dir)
    model = load_model(d / "two_tower") if (d / "two_tower").exists() else None
    ranker = None
    if (d / RANKER_FILE).exists():
        import lightgbm as lgb

        ranker = lgb.Booster(model_file=str(d / RANKER_FILE))
    info = json.loads((d / FIT_FILE).read_text()) if (d / FIT_FILE).exists() else {}
    config = CandidateConfig.from_params(json.loads((d / "candidates.json").read_text()))
    return Fit(model, ItemGraph.load(d / "item_graph"), config, ranker, info)


def with_new_items(fit: Fit, item_ids: Sequence[str], vectors: np.ndarray) -> Fit:
    """``fit`` with items added after it (the hourly refresh's index extensions) appended to its catalog.

    The new items keep the two-tower vectors the refresh computed from their content, category and genres, so the
    two-tower source retrieves them; they have no co-occurrence or content edges, no events (trending and
    popularity 0) and no Feast rows until a run's materialisation (NaN features). Whether one is served follows
    the snapshot's catalog like any item's. Items the fit knows already are skipped.
    """
    known = fit.graph.index
    ids = [str(i) for i in item_ids]
    fresh = np.flatnonzero(known.get_indexer(ids) < 0).tolist() if ids else []
    if not fresh or fit.model is None:
        return fit
    import scipy.sparse as sp

    n, m = len(fit.item_ids), len(fresh)

    def padded(matrix: sp.csr_matrix) -> sp.csr_matrix:
        out = matrix.tocsr().copy()
        out.resize((n + m, n + m))
        return out

    graph = ItemGraph([*fit.item_ids, *(ids[j] for j in fresh)], padded(fit.graph.cooccurrence),
                      padded(fit.graph.content))
    vectors = np.asarray(vectors, np.float32)[fresh]
    if fit.new_item_vectors is not None:
        vectors = np.vstack([fit.new_item_vectors, vectors])
    return dataclasses.replace(fit, graph=graph, new_item_vectors=vectors)


def load_serving_fit(bundle: Any, name: str = "serving", settings: Any = None) -> Fit:
    """The bundle's fit ``name`` with the items of its newest index extension (:func:`with_extension_items`): what
    ``recsys recommend``, snapshots and the service answer from."""
    return with_extension_items(load_fit(bundle.fit_dir(name)), bundle, settings)


def with_extension_items(fit: Fit, bundle: Any, settings: Any = None) -> Fit:
    """``fit`` (as loaded, without added items) plus the items of the bundle's newest index extension
    (:func:`with_new_items`). A broken extension chain is logged (with what to do) and the fit's own catalog is
    served."""
    from pipeline_tasks.online.index import IndexChecksumError, extension_items

    if fit.model is None or not bundle.version:
        return fit
    try:
        ids, vectors = extension_items(bundle, fit.item_ids, settings)
    except IndexChecksumError as exc:
        log.error("serving %s version %s without its index extensions: %s", bundle.name, bundle.version, exc)
        return fit
    if ids:
        log.info("%d items added by index extensions after the fit are served through their two-tower vectors",
                 len(ids))
    return with_new_items(fit, ids, vectors) if ids else fit


@dataclass
class Moment:
    """What is known at a request time: events before it, the catalog, and Feast rows valid at it."""

    at: pd.Timestamp
    history: pd.DataFrame  # interactions before `at` (later rows are ignored)
    items: pd.DataFrame  # contract items table (servability, categories)
    users: pd.DataFrame | None = None  # contract users table (demographics, location)
    user_rows: pd.DataFrame | None = None  # Feast ranker_v1 user rows at `at`
    item_rows: pd.DataFrame | None = None  # Feast ranker_v1 item rows at `at`
    requests: pd.DataFrame | None = None  # optional per-user device / location of the request


class FillLists(Mapping[str, list[str]]):
    """Each user's popularity fill as item ids, converted from the catalog indices only for the users whose list
    is read (a ranked list rarely needs filling)."""

    def __init__(self, users: Sequence[str], idx: np.ndarray, item_array: np.ndarray) -> None:
        self._row = {u: r for r, u in enumerate(users)}
        self._idx, self._items = idx, item_array

    def __getitem__(self, user: str) -> list[str]:
        row = self._idx[self._row[user]]
        return self._items[row[row >= 0]].tolist()

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


@dataclass
class Block:
    """One block of users: their pool with feature rows, and what ranking needs to fill and filter."""

    user_ids: list[str]
    columns: dict[str, np.ndarray]  # the pool: query_id, user_id, item_id, category and the fused pool columns
    features: pd.DataFrame  # FEATURE_COLUMNS aligned to the pool
    popularity_fill: Mapping[str, list[str]]  # per user: popular allowed unseen items, best first (FillLists)
    cold: set[str]  # users without history before the moment
    source_lists: dict[str, tuple[np.ndarray, np.ndarray]]  # each source's own top lists (catalog indices)

    @functools.cached_property
    def pool(self) -> pd.DataFrame:
        """The pool as a frame (built on first use: a request reads its arrays, :meth:`column`)."""
        return pd.DataFrame(self.columns, copy=False)

    def column(self, name: str) -> np.ndarray:
        """A pool column as an array."""
        return self.columns[name]


@dataclass
class Prepared:
    """What every request at one moment shares, computed once: the catalog's servability, trending and
    popularity counts, item embeddings and categories, and an index of each user's history rows.

    ``recsys recommend`` builds it once per call and the service once per load; both then answer blocks of
    users through :func:`user_blocks`, which never changes it.
    """

    fit: Fit
    moment: Moment
    catalog: ItemTable
    history: pd.DataFrame  # interactions before the moment
    trending: np.ndarray
    popularity: np.ndarray
    item_vectors: np.ndarray | None
    category: pd.Series  # item id -> category
    rows_of: dict[str, np.ndarray]  # user id -> positions in `history`
    user_table: pd.DataFrame | None = None  # the moment's Feast user rows keyed by user id (keyed_rows)
    item_table: pd.DataFrame | None = None  # the same for items
    users_table: pd.DataFrame | None = None  # the contract users table keyed by user id (first row per id)
    context_trending: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)  # cold start
    user_keyed: KeyedRows | None = None  # user_table / item_table as arrays: what feature assembly reads
    item_keyed: KeyedRows | None = None
    user_state: UserState | None = None  # every user's history-only part, precomputed (with_user_state)

    @functools.cached_property
    def two_tower_items(self) -> TwoTowerItems | None:
        """The item vectors as the two-tower source scores them (its pruning set-up computed once)."""
        return None if self.item_vectors is None else TwoTowerItems(self.item_vectors)

    @functools.cached_property
    def orders(self) -> dict[str, np.ndarray]:
        """The global trending and popularity counts' items best first (:func:`ranked_order`): what those sources'
        lists walk instead of scoring the whole catalog per request."""
        return {"trending": ranked_order(self.trending), "popularity": ranked_order(self.popularity)}

    @functools.cached_property
    def item_rows_of(self) -> np.ndarray | None:
        """Each catalog item's row in :attr:`item_keyed` (-1: none), for feature assembly."""
        return self.item_keyed.index.get_indexer(self.item_array) if self.item_keyed is not None else None

    @functools.cached_property
    def item_array(self) -> np.ndarray:
        """The fit's item ids as an object array (catalog index -> id)."""
        return np.asarray(self.fit.item_ids, dtype=object)

    def history_of(self, user_ids: Sequence[str], fresh: pd.DataFrame | None = None) -> pd.DataFrame:
        """The history rows of these users in time order per user, then their rows of ``fresh`` (events that
        arrived after the state was built, e.g. the service's feedback) as their newest."""
        parts = [self.rows_of[u] for u in user_ids if u in self.rows_of]
        base = self.history.iloc[np.concatenate(parts)] if parts else self.history.iloc[:0]
        if fresh is not None and len(fresh):
            fresh = fresh[fresh[USER_ID].astype(str).isin(set(user_ids))]
        if fresh is None or not len(fresh):
            return base
        return pd.concat([base, fresh.astype(base.dtypes.to_dict(), errors="ignore")], ignore_index=True)


class VectorCache(Protocol):
    """Where user embeddings are kept between requests (in process, or Redis in the production profile)."""

    def get_many(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def set_many(self, vectors: Mapping[str, np.ndarray]) -> None: ...


def _user_vectors(fit: Fit, user_ids: list[str], hist: pd.DataFrame, user_rows: Callable[[], pd.DataFrame | None],
                  users: pd.DataFrame | None, cache: VectorCache | None) -> np.ndarray:
    """The users' two-tower embeddings, from ``cache`` where it has them (``user_rows`` gives their Feast rows,
    read only when one is computed)."""
    have = cache.get_many(user_ids) if cache is not None else {}
    missing = [u for u in user_ids if u not in have]
    if missing:
        fresh = fit.model.user_embeddings(missing, hist, user_rows(), users)
        computed = dict(zip(missing, fresh, strict=True))
        if cache is not None:
            cache.set_many(computed)
        have = {**have, **computed}
    return np.stack([np.asarray(have[u], np.float32) for u in user_ids])


def prepare(fit: Fit, moment: Moment) -> Prepared:
    """The shared state of requests at ``moment`` (see :class:`Prepared`)."""
    cfg = fit.config
    catalog = ItemTable.build(moment.items, fit.item_ids, moment.at)
    hist = moment.history[moment.history[TIMESTAMP] < moment.at]
    trending = item_counts(hist, fit.item_ids, moment.at, days=cfg.trending_days)
    popularity = item_counts(hist, fit.item_ids, moment.at)
    item_vectors = fit.model.item_embeddings(moment.item_rows) if fit.model is not None else None
    if item_vectors is not None and fit.new_item_vectors is not None:  # items added after the fit (with_new_items)
        item_vectors = np.vstack([item_vectors, fit.new_item_vectors]).astype(np.float32)
    category = pd.Series(catalog.category, index=fit.item_ids)
    rows_of = pd.Series(np.arange(len(hist))).groupby(hist[USER_ID].astype(str).to_numpy()).indices
    user_table, item_table = keyed_rows(moment.user_rows, USER_ID), keyed_rows(moment.item_rows, ITEM_ID)
    return Prepared(fit, moment, catalog, hist, trending, popularity, item_vectors, category,
                    {str(u): np.asarray(r) for u, r in rows_of.items()}, user_table, item_table,
                    keyed_rows(moment.users, USER_ID, keep="first"),  # the encoder and histories read the first
                    context_trending(hist, fit.item_ids, moment.at, cfg.trending_days, users=moment.users),
                    KeyedRows.of(user_table, USER_ID), KeyedRows.of(item_table, ITEM_ID))


@dataclass
class UserState:
    """Each user's part of a block that depends only on the prepared history, for every user at once: the
    history matrices and region (:class:`UserHistory`), the request context of their latest event
    (:func:`_requests`), their per-category state (:func:`category_state`) and their two-tower embedding.

    A server builds it once per snapshot (:func:`with_user_state`) with the same functions a block calls, so a
    request of a user without fresh events takes their rows instead of recomputing them (the answers are the
    same); a user with fresh events, or one it does not know, goes through the full path.
    """

    index: pd.Index  # user id -> row
    history: UserHistory
    requests: dict[str, np.ndarray]  # _requests' columns (column_array), one row per user in index order
    categories: dict[str, np.ndarray]  # category_state of every user, by column
    category_rows: dict[str, np.ndarray]  # user id -> its rows in `categories`
    vectors: np.ndarray | None  # two-tower embeddings, in index order (None: the fit has no two-tower)

    def rows(self, user_ids: Sequence[str]) -> np.ndarray | None:
        """The users' rows, or None when any of them is unknown."""
        pos = self.index.get_indexer(user_ids)
        return None if (pos < 0).any() else pos

    def history_of(self, rows: np.ndarray) -> UserHistory:
        h = self.history
        take = slice(int(rows[0]), int(rows[0]) + 1) if len(rows) == 1 else rows  # a row slice is cheaper
        return UserHistory([h.user_ids[r] for r in rows], h.seen[take], h.recent[take], [h.region[r] for r in rows])

    def requests_of(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {col: values[rows] for col, values in self.requests.items()}

    def categories_of(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        parts = [self.category_rows[u] for u in user_ids if u in self.category_rows]
        take = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return {col: values[take] for col, values in self.categories.items()}


USER_STATE_CHUNK = 50_000  # users per embedding batch while building a UserState (bounds the encoder's inputs)


def with_user_state(state: Prepared) -> Prepared:
    """``state`` with every known user's :class:`UserState` (users with history and users of the users table)."""
    fit, moment = state.fit, state.moment
    ids = list(dict.fromkeys([*state.rows_of, *(state.users_table.index.astype(str) if state.users_table is not None
                                                   else [])]))
    users = state.users_table.reset_index(drop=True) if state.users_table is not None and moment.users is not None \
        else None
    history = UserHistory.build(state.history, ids, fit.graph.index, moment.at, fit.config, users)
    requests = _requests(dataclasses.replace(moment, requests=None), ids, state.history)
    categories = category_state(state.history, ids, state.category, moment.at).reset_index(drop=True)
    category_rows = {str(u): np.asarray(r) for u, r in
                     pd.Series(np.arange(len(categories))).groupby(categories[USER_ID].to_numpy()).indices.items()}
    requests = {col: column_array(requests[col]) for col in requests.columns}
    categories = {col: categories[col].to_numpy() for col in categories.columns}
    vectors = None
    if fit.model is not None:
        parts = []
        for start in range(0, len(ids), USER_STATE_CHUNK):
            chunk = ids[start:start + USER_STATE_CHUNK]
            users_of = _rows_of(state.users_table, chunk) if moment.users is not None else None
            parts.append(_user_vectors(fit, chunk, state.history_of(chunk),
                                       lambda c=chunk: _rows_of(state.user_table, c), users_of, None))
        vectors = np.concatenate(parts) if parts else None
    log.info("user state of %d users precomputed", len(ids))
    user_state = UserState(pd.Index(ids, dtype=object), history, requests, categories, category_rows, vectors)
    return dataclasses.replace(state, user_state=user_state)


def _rows_of(table: pd.DataFrame | None, user_ids: Sequence[str]) -> pd.DataFrame | None:
    """The rows of these users in a keyed table (a request reads its users' rows, not the whole table)."""
    if table is None:
        return None
    pos = table.index.get_indexer(pd.Index(user_ids, dtype=object).unique())
    return table.iloc[np.sort(pos[pos >= 0])].reset_index(drop=True)  # in the table's order


def _requests(moment: Moment, user_ids: Sequence[str], hist: pd.DataFrame) -> pd.DataFrame:
    """One request per user at the moment: device and location of their latest event (or the given ones)."""
    req = pd.DataFrame({QUERY_ID: list(user_ids), "request_timestamp": moment.at})
    if moment.requests is not None:
        given = moment.requests.assign(**{USER_ID: moment.requests[USER_ID].astype(str)})
        given = given.drop_duplicates(USER_ID, keep="last").set_index(USER_ID)
        for col in ("device", "location"):
            req[col] = given[col].reindex(req[QUERY_ID]).to_numpy() if col in given else None
        return req
    users = hist[USER_ID].astype(str).to_numpy()
    mine = np.flatnonzero(pd.Index(users, dtype=object).isin(list(user_ids)))
    order = mine[np.argsort(utc_ns(hist[TIMESTAMP].iloc[mine]), kind="stable")]  # time order, ties as stored
    latest = dict(zip(users[order], order.tolist(), strict=True))  # each user's last row in that order
    rows = np.array([latest.get(u, -1) for u in req[QUERY_ID]], dtype=np.int64)
    for col in ("device", "location"):
        if col not in hist:
            req[col] = None
            continue
        values = hist[col].to_numpy()[np.where(rows >= 0, rows, 0)] if len(hist) else np.full(len(rows), np.nan)
        values = values.astype(np.float64 if values.dtype.kind in "biuf" else object)
        values[rows < 0] = np.nan
        req[col] = values
    return req


def _cold_contexts(chunk: list[str], regions: list[str | None], context: pd.DataFrame, users: pd.DataFrame | None,
                   demographics: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, str | None]]:
    """Each user's context for a cold-start trending list: location and device of the request, and demographics
    the request states, else the users table's."""
    devices = context["device"].tolist() if "device" in context else [None] * len(chunk)
    rows: dict[str, dict[str, Any]] = {}
    if users is not None and len(users):
        for row in users.to_dict("records"):
            rows.setdefault(str(row[USER_ID]), row)  # a user's first row, as the encoder reads it
    out = []
    for user, region, device in zip(chunk, regions, devices, strict=True):
        demo = demographic_context(rows.get(user))
        stated = demographic_context((demographics or {}).get(user))
        demo.update({k: v for k, v in stated.items() if v is not None})
        out.append({"location": region, "device": device, **demo})
    return out


def block_size(fit: Fit) -> int:
    """Users per block: bounded by the dense users x items score matrices and by the pool rows a block assembles
    features for (memory stays flat however many users a call asks for)."""
    return max(1, min(BLOCK_CELLS // max(len(fit.item_ids), 1), POOL_ROWS_PER_BLOCK // fit.config.ranked))


def candidate_blocks(fit: Fit, moment: Moment, user_ids: Sequence[str], fill_k: int = 0,
                     block_users: int | None = None, prepared: Prepared | None = None) -> Iterator[Block]:
    """The pool and feature rows of each block of ``user_ids`` at ``moment`` (one query per user)."""
    state = prepared if prepared is not None else prepare(fit, moment)
    yield from user_blocks(state, user_ids, fill_k, block_users)


def user_blocks(state: Prepared, user_ids: Sequence[str], fill_k: int = 0,
                block_users: int | None = None, requests: pd.DataFrame | None = None,
                vectors: VectorCache | None = None, fresh: pd.DataFrame | None = None,
                demographics: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[Block]:
    """The pool and feature rows of each block of ``user_ids`` from a prepared moment.

    ``requests`` (``user_id``, ``device``, ``location``) is each user's request context (default: the moment's,
    else their latest event's); a given location is also the region servability is checked for. ``vectors``
    caches user embeddings between calls (the service's cache; invalidated when a user's history changes).
    ``fresh`` holds events newer than the prepared history (:meth:`Prepared.history_of`). ``demographics`` gives
    per user the ``occupation`` / ``age`` / ``gender`` a request states (a cold user's trending list follows them;
    default: the users table's).
    """
    ids = [str(u) for u in user_ids]
    fit, moment, catalog = state.fit, state.moment, state.catalog
    if requests is not None:
        moment = dataclasses.replace(moment, requests=requests)
    cfg = fit.config
    step = block_users or block_size(fit)
    fresh_users = set(fresh[USER_ID].astype(str)) if fresh is not None and len(fresh) else set()
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        # Users without fresh events that the precomputed state knows: their rows of it (the same values).
        known = state.user_state.rows(chunk) if state.user_state is not None and not fresh_users & set(chunk) \
            else None
        hist = state.history_of(chunk, fresh) if known is None else None
        users = _rows_of(state.users_table, chunk) if moment.users is not None and known is None else None
        history = UserHistory.build(hist, chunk, fit.graph.index, moment.at, cfg, users) if known is None else \
            state.user_state.history_of(known)
        if requests is not None and "location" in requests:
            given = requests.assign(**{USER_ID: requests[USER_ID].astype(str)}).drop_duplicates(USER_ID, keep="last")
            where = dict(zip(given[USER_ID], given["location"], strict=True))
            history.region = [str(where[u]) if isinstance(where.get(u), str) and where[u] else r
                              for u, r in zip(chunk, history.region, strict=True)]
        user_vectors = None
        if fit.model is not None and known is not None and state.user_state.vectors is not None:
            user_vectors = state.user_state.vectors[known]
        elif fit.model is not None:
            user_vectors = _user_vectors(fit, chunk, hist, lambda chunk=chunk: _rows_of(state.user_table, chunk),
                                         users, vectors)
        cold_rows = np.diff(history.seen.indptr) == 0
        trending = state.trending
        # Each user's request: time, device, location.
        context = _requests(moment, chunk, hist) if known is None or moment.requests is not None else \
            state.user_state.requests_of(known)
        if cold_rows.any() and state.context_trending:  # a cold user gets the trending list of its context
            if known is not None and moment.users is not None:
                users = _rows_of(state.users_table, chunk)
            contexts = _cold_contexts(chunk, history.region, context, users, demographics)
            trending = trending_rows(state.trending, state.context_trending, cold_rows, contexts)
        lists = source_lists(user_vectors, state.two_tower_items, history, slice(0, len(chunk)), fit.graph, catalog,
                             trending, state.popularity, cfg, orders=state.orders)
        fused = fuse_arrays(lists, cfg)
        query = np.asarray(chunk, dtype=object)[fused["row"].astype(np.int64)]
        item_index = fused["item"].astype(np.int64)
        columns = {QUERY_ID: query, USER_ID: query, ITEM_ID: state.item_array[item_index], **fused,
                   "category": catalog.category[item_index]}
        fill: Mapping[str, list[str]] = {}
        if fill_k > cfg.pool_size or (lists.lists.get("popularity") is None and fill_k):
            allowed = catalog.allowed_for(history.region) & (history.seen.toarray() == 0)
            idx, _ = top_k(np.broadcast_to(state.popularity, allowed.shape), allowed, fill_k, positive_only=False)
            fill = FillLists(chunk, idx, state.item_array)
        elif "popularity" in lists.lists:
            fill = FillLists(chunk, lists.lists["popularity"][0], state.item_array)
        cold = {u for u, is_cold in zip(chunk, cold_rows, strict=True) if is_cold}
        features = assemble_features(columns, state.user_keyed, state.item_keyed, context,
                                     category_state(hist, chunk, state.category, moment.at) if known is None
                                     else state.user_state.categories_of(chunk),
                                     None if state.item_rows_of is None else state.item_rows_of[item_index])
        yield Block(chunk, columns, features, fill, cold, lists.lists)


def rank_block(fit: Fit, block: Block, k: int, rules: bool = True, order: str = "ranker",
               age_days: pd.Series | np.ndarray | None = None, exclude: Mapping[str, Collection[str]] | None = None
               ) -> dict[str, list[tuple[str, float]]]:
    """Each user's top ``k`` ``(item_id, score)`` of a block.

    ``order`` is ``ranker`` (the fit's LightGBM scores), ``pool`` (fused pool order) or a source name
    (that source's score). With ``rules`` the business rules reorder the ranker's list (category cap,
    freshness, dedup; :mod:`pipeline_tasks.online.rules`). A list shorter than ``k`` is filled from
    popularity; cold users get the trending order. ``exclude`` names items per user never to return (a
    request's ``exclude``, the recently-shown filter); they are dropped before ranking and filling. ``age_days``
    is the freshness rule's item age by item id (:func:`item_age_days`), or as an array by catalog index.
    """
    n = len(block.column(ITEM_ID))
    if order == "ranker":
        if fit.ranker is None:
            raise ValueError("this fit has no ranker; use order='pool'")
        weight = float(((fit.info or {}).get("ranker") or {}).get("params", {}).get(PRIOR, 0.0))
        features = block.features if list(block.features.columns) == FEATURE_COLUMNS else \
            block.features[FEATURE_COLUMNS]
        score = fit.ranker.predict(features.to_numpy(np.float32), num_threads=1) + \
            prior_scores(block.column("fused_score"), block.column(QUERY_ID), weight)
    elif order == "pool":
        score = block.column("fused_score")
    elif order in SOURCES:
        rank = np.asarray(block.column(f"{order}_rank"), dtype=float)
        score = np.where(~np.isnan(rank), -rank, -np.inf)
    else:
        raise ValueError(f"order={order!r}: use 'ranker', 'pool' or one of {SOURCES}")
    users = np.asarray(block.column(USER_ID), dtype=object)
    items = np.asarray(block.column(ITEM_ID), dtype=object)
    trend = np.asarray(block.column("trending_rank"), dtype=float)
    category = np.asarray(block.column("category"), dtype=object)
    keep = np.isfinite(score) if order in SOURCES else np.ones(n, dtype=bool)
    if exclude:
        pairs = {(u, i) for u, listed in exclude.items() for i in listed}
        keep &= np.fromiter(((u, i) not in pairs for u, i in zip(users, items, strict=True)), bool, n)
    rows = np.flatnonzero(keep)
    # Per user (by id), best score first; ties keep the pool's order (a stable sort, as the lists always were).
    codes, names = pd.factorize(users[rows], sort=True)
    rows = rows[np.lexsort((-np.asarray(score, dtype=float)[rows], codes))]
    codes = np.sort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, int)
    # No candidate left in the block (empty pools, or all excluded): no runs; every list comes from the fill.
    ends = np.r_[starts[1:], len(codes)].astype(int) if len(codes) else np.zeros(0, int)
    if rules and age_days is not None and len(rows):
        ages = age_days[block.column("item")[rows]] if isinstance(age_days, np.ndarray) else \
            age_days.reindex(items[rows]).to_numpy(dtype=float)
    else:
        ages = np.full(len(rows), np.nan)
    out: dict[str, list[tuple[str, float]]] = {}
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        at = rows[start:end]
        user = str(users[at[0]])
        if user in block.cold:
            at = at[~np.isnan(trend[at])]
            at = at[np.argsort(trend[at], kind="stable")]
            chosen, scores = items[at].tolist(), (-trend[at]).tolist()
        elif rules:
            chosen, boosted = apply_rules(items[at], np.asarray(score, dtype=float)[at], category[at],
                                          ages[start:end])
            scores = boosted.tolist()
        else:
            chosen, scores = items[at].tolist(), np.asarray(score, dtype=float)[at].tolist()
        out[user] = list(zip(chosen[:k], scores[:k], strict=True))
    for user in block.user_ids:
        have = out.setdefault(user, [])
        if len(have) < k:
            taken = {i for i, _ in have} | set((exclude or {}).get(user, ()))
            low = min((s for _, s in have), default=0.0)
            extra = [i for i in block.popularity_fill.get(user, []) if i not in taken][:k - len(have)]
            have.extend((i, float(low) - 1.0 - j) for j, i in enumerate(extra))
    return out


def item_age_days(items: pd.DataFrame, at: pd.Timestamp) -> pd.Series:
    """Days from each item's ``created_at`` to ``at`` (NaN when unknown), by item id: the freshness rule's age."""
    created = pd.to_datetime(items["created_at"], utc=True) if "created_at" in items else \
        pd.Series(pd.NaT, index=items.index)
    age = (at - created).dt.total_seconds() / 86_400.0
    return pd.Series(age.to_numpy(), index=items[ITEM_ID].astype(str).to_numpy())


RULES_ORDER = "ranker+rules"


def with_blocked_items(state: Prepared, item_ids: Collection[str]) -> Prepared:
    """``state`` with ``item_ids`` not servable in its catalog (the safety flags: every source, the popularity fill
    and the trending lists skip them, as they skip unavailable items); everything else, computed parts included,
    is shared with ``state``."""
    if not item_ids:
        return state
    out = copy.copy(state)  # a shallow copy keeps the cached properties
    out.catalog = state.catalog.without(item_ids)
    return out


def ranked_lists(fit: Fit, moment: Moment, user_ids: Sequence[str], k: int, orders: Sequence[str] = ("ranker",),
                 prepared: Prepared | None = None, workers: int = 1, blocked: Collection[str] = (),
                 ) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Each order's top ``k`` per user at ``moment``: ``ranker``, ``ranker+rules``, ``pool`` or a source name
    (that source's own list, before fusion), all from the same blocks.

    ``blocked`` items (the safety flags) are not servable (:func:`with_blocked_items`, as in a service), so no
    order returns them.

    With ``workers`` > 1, that many blocks are built and ranked at once in threads over the shared state (the
    numeric work releases the GIL); the lists and their order are the same as with one.
    """
    state = with_blocked_items(prepared if prepared is not None else prepare(fit, moment), blocked)
    ages = item_age_days(moment.items, moment.at)
    ids = [str(u) for u in user_ids]
    step = block_size(fit)

    def one_block(chunk: list[str]) -> dict[str, dict[str, list[tuple[str, float]]]]:
        part: dict[str, dict[str, list[tuple[str, float]]]] = {o: {} for o in orders}
        for block in user_blocks(state, chunk, fill_k=k, block_users=step):
            for order in orders:
                if order in SOURCES:
                    idx, scores = block.source_lists.get(order, (np.full((len(block.user_ids), 0), -1), None))
                    for row, user in enumerate(block.user_ids):
                        ok = idx[row] >= 0
                        items = [fit.item_ids[i] for i in idx[row][ok]][:k]
                        part[order][user] = list(zip(items, np.asarray(scores[row][ok], float).tolist(),
                                                     strict=True)) if scores is not None else []
                    continue
                rules = order == RULES_ORDER
                part[order].update(rank_block(fit, block, k, rules=rules, order="ranker" if rules else order,
                                              age_days=ages))
        return part

    chunks = [ids[start:start + step] for start in range(0, len(ids), step)]
    out: dict[str, dict[str, list[tuple[str, float]]]] = {o: {} for o in orders}
    if workers > 1 and len(chunks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recsys-block") as pool:
            parts = list(pool.map(one_block, chunks))  # in block order
    else:
        parts = [one_block(chunk) for chunk in chunks]
    for part in parts:
        for order in orders:
            out[order].update(part[order])
    return out
