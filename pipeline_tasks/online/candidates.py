"""Candidate generation from several sources, merged into one pool: the first stage of a recommendation.

One implementation for the offline ranking set, the evaluation, ``recsys recommend`` and the service.
Every source scores the whole catalog for a block of users at once (dense ``users x items``), so a
request is the same code with a block of one user.

Sources (:data:`SOURCES`):

- ``two_tower``: inner product of the user's and the items' two-tower embeddings, exact, with one definition
  everywhere (:class:`TwoTowerItems`: the float64 inner product rounded to float32); on large catalogs its
  top-k reads a low-dimensional projection of the catalog and scores exactly only the items it cannot rule out.
- ``i2i``: item-to-item neighbours of the user's recent items. Neighbours are items co-occurring in
  users' histories: the cosine of the user-item incidence columns, or (``graph="ease"``, catalogs up
  to :data:`EASE_MAX_ITEMS`) EASE's closed-form item-item weights, which discount items that co-occur
  only because both are popular; top ``neighbours`` per item. Each of the user's ``recent_items``
  most recent items seeds its neighbours with weight ``0.5 ** (age_days / recency_half_life_days)``.
- ``content``: items with fewer than ``cold_item_events`` events, by content-embedding cosine to the
  user's recent items (same recency weights): new items have no co-occurrence yet.
- ``trending``: distinct users per item over the last ``trending_days`` before the request.
- ``popularity``: distinct users per item over the whole history; it is last in the fusion and
  fills a pool that the others leave short.

Every source returns its ``pool_size`` (N) best items, skipping the user's seen items and items not
servable at the request time (unavailable, not allowed in the user's region, created after the
request). The merged pool orders the union by weighted reciprocal rank fusion,
``sum_s w_s / (rrf_k + rank_s)``, and keeps its first ``rank_size`` items (default 2N) for the ranker:
sources overlap, and their union holds more of a user's future items than any N of them (pool
recall@N is reported on the first N). Each candidate keeps every source's score and rank (NaN where a
source did not return it), the fused score and its pool rank.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.params import known_params
from pipeline_tasks.online.arrays import count_after, count_before, last_of, moment_ns, utc_ns

log = logging.getLogger(__name__)

SOURCES = ("two_tower", "i2i", "content", "trending", "popularity")
# Dense score cells per block of users (users x catalog items, float32): bounds memory at ~200 MB a matrix.
BLOCK_CELLS = 50_000_000
# EASE's Gram matrix and its inverse are dense items x items float64: 10k items ~ 0.8 GB each.
EASE_MAX_ITEMS = 10_000
GRAPHS = ("cosine", "ease")
SECONDS_PER_DAY = 86_400.0
NO_REGION = ""


@dataclass(frozen=True)
class CandidateConfig:
    """How the pool is built; chosen on the validation window (``weights``, ``trending_days``)."""

    pool_size: int = 500  # N: each source's list length, and the cut of pool recall@N
    rank_size: int | None = None  # how many of the merged pool the ranker scores (None: 2N)
    graph: str = "cosine"  # i2i weights: cosine | ease (chosen on validation by the candidates task)
    ease_lambda: float = 500.0
    recent_items: int = 50
    recency_half_life_days: float = 30.0
    neighbours: int = 200
    cold_item_events: int = 5
    trending_days: float = 7.0
    rrf_k: float = 60.0
    weights: dict[str, float] = field(default_factory=lambda: {
        "two_tower": 1.0, "i2i": 1.0, "content": 0.5, "trending": 0.5, "popularity": 0.1})

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise InvalidParamsError(f"candidates.pool_size={self.pool_size}: use a positive number of items")
        if self.rank_size is not None and self.rank_size < self.pool_size:
            raise InvalidParamsError(f"candidates.rank_size={self.rank_size} must be >= pool_size={self.pool_size}")
        if self.graph not in GRAPHS:
            raise InvalidParamsError(f"candidates.graph={self.graph!r}: use one of {GRAPHS}")
        unknown = set(self.weights) - set(SOURCES)
        if unknown:
            raise InvalidParamsError(f"candidates.weights names unknown sources {sorted(unknown)}; known: "
                                     f"{list(SOURCES)}")

    @classmethod
    def from_params(cls, p: Mapping[str, Any] | None) -> CandidateConfig:
        p = known_params(cls, p, "candidates")
        if "weights" in p:
            p["weights"] = {**cls().weights, **p["weights"]}
        return cls(**p)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ranked(self) -> int:
        """How many candidates of the merged pool the ranker scores."""
        return self.rank_size if self.rank_size is not None else 2 * self.pool_size


@dataclass
class ItemGraph:
    """What the i2i and content sources learned from a fit's history: sparse ``items x items`` scores."""

    item_ids: list[str]
    cooccurrence: sp.csr_matrix  # row i: the co-occurrence neighbours of item i (cosine)
    content: sp.csr_matrix  # row i: cold items by content cosine to item i

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sp.save_npz(path / "cooccurrence.npz", self.cooccurrence)
        sp.save_npz(path / "content.npz", self.content)
        pd.DataFrame({ITEM_ID: self.item_ids}).to_parquet(path / "item_ids.parquet", index=False)

    @functools.cached_property
    def index(self) -> pd.Index:
        """The catalog's item ids as an index (positions = catalog indices)."""
        return pd.Index(self.item_ids, dtype=object)

    @classmethod
    def load(cls, path: str | Path) -> ItemGraph:
        path = Path(path)
        ids = pd.read_parquet(path / "item_ids.parquet")[ITEM_ID].astype(str).tolist()
        return cls(ids, sp.load_npz(path / "cooccurrence.npz").tocsr(), sp.load_npz(path / "content.npz").tocsr())


def _top_per_row(matrix: sp.csr_matrix | np.ndarray, k: int) -> sp.csr_matrix:
    """Keep each row's k largest positive entries (sparse input: ties go to the lower column)."""
    if not sp.issparse(matrix):
        dense = np.asarray(matrix)
        dense = np.where(dense > 0, dense, 0.0).astype(np.float32)
        if dense.shape[1] > k:
            cut = np.argpartition(-dense, k - 1, axis=1)[:, k:]
            np.put_along_axis(dense, cut, 0.0, axis=1)
        return sp.csr_matrix(dense)
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.data[m.data < 0] = 0.0
    m.eliminate_zeros()
    counts = np.diff(m.indptr)
    if counts.max(initial=0) <= k:
        return m
    rows = np.repeat(np.arange(m.shape[0]), counts)
    order = np.lexsort((m.indices, -m.data, rows))  # by row, then largest first, then lowest column
    keep = order[np.arange(len(order)) - m.indptr[rows[order]] < k]
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


def _top_cold(vectors: np.ndarray, cold: np.ndarray, k: int, step: int) -> sp.csr_matrix:
    """Each item's k most similar cold items by content inner product (positive only, never itself), computed
    in blocks of ``step`` items against the cold items alone."""
    n, targets = len(vectors), vectors[cold]
    k = min(k, len(cold))
    rows, cols, vals = [], [], []
    for start in range(0, n, step):
        stop = min(start + step, n)
        sim = vectors[start:stop] @ targets.T  # (block, n_cold)
        mine = np.flatnonzero((cold >= start) & (cold < stop))  # cold items of this block: not their own neighbour
        sim[cold[mine] - start, mine] = 0.0
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if len(cold) > k else \
            np.broadcast_to(np.arange(len(cold)), (stop - start, len(cold)))
        best = np.take_along_axis(sim, top, axis=1)
        r, c = np.nonzero(best > 0)
        rows.append(r + start)
        cols.append(cold[top[r, c]])
        vals.append(best[r, c])
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, n))


def build_item_graph(history: pd.DataFrame, item_ids: Sequence[str], content: np.ndarray | None,
                     config: CandidateConfig) -> ItemGraph:
    """Co-occurrence neighbours and cold-item content neighbours of every catalog item, from ``history``.

    ``content`` holds one L2-normalised content vector per catalog item (rows aligned to ``item_ids``).
    """
    ids = [str(i) for i in item_ids]
    n = len(ids)
    index = pd.Index(ids)
    pairs = history[[USER_ID, ITEM_ID]].astype(str).drop_duplicates()
    cols = index.get_indexer(pairs[ITEM_ID])
    pairs = pairs[cols >= 0]
    cols = cols[cols >= 0]
    users, rows = np.unique(pairs[USER_ID].to_numpy(), return_inverse=True)
    incidence = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(users), n))
    counts = np.asarray(incidence.sum(axis=0)).ravel()
    norm = np.sqrt(np.maximum(counts, 1.0)).astype(np.float32)
    by_item = incidence.T.tocsr()
    blocks = []
    step = max(1, BLOCK_CELLS // max(n, 1))
    if config.graph == "ease" and n > EASE_MAX_ITEMS:
        log.warning("catalog of %d items > %d: i2i uses cosine co-occurrence instead of EASE", n, EASE_MAX_ITEMS)
    if config.graph == "ease" and 0 < n <= EASE_MAX_ITEMS:
        gram = (by_item @ incidence).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += config.ease_lambda
        inverse = np.linalg.inv(gram)
        del gram
        weights = -inverse / np.diag(inverse)[None, :]
        del inverse
        weights[np.diag_indices_from(weights)] = 0.0
        for start in range(0, n, step):
            blocks.append(_top_per_row(weights[start:start + step], config.neighbours))
        del weights
    for start in range(0, n if not blocks else 0, step):
        co = (by_item[start:start + step] @ incidence).tocoo()  # (block, n) co-occurrence counts, sparse
        weight = co.data / (norm[start + co.row] * norm[co.col])
        weight[co.row + start == co.col] = 0.0  # an item is not its own neighbour
        co = sp.csr_matrix((weight.astype(np.float32), (co.row, co.col)), shape=co.shape)
        blocks.append(_top_per_row(co, config.neighbours))
    cooc = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, n), dtype=np.float32)

    cold = np.flatnonzero(counts < config.cold_item_events)
    if content is not None and len(cold) and n:
        content_graph = _top_cold(np.asarray(content, np.float32), cold, config.neighbours,
                                  max(1, BLOCK_CELLS // max(len(cold), 1)))
    else:
        content_graph = sp.csr_matrix((n, n), dtype=np.float32)
    log.info("item graph: %d items, %d co-occurrence edges, %d cold items with %d content edges", n, cooc.nnz,
             len(cold), content_graph.nnz)
    return ItemGraph(ids, cooc, content_graph)


@dataclass
class ItemTable:
    """The catalog at a request time: servability, categories, regions and age, aligned to the graph's ids."""

    item_ids: list[str]
    servable: np.ndarray  # bool: available and created by the request time
    category: np.ndarray  # object: primary category ("unknown" when missing)
    region_allowed: dict[str, np.ndarray]  # region -> bool per item; items with no restriction are True
    unrestricted: np.ndarray  # bool: no region list
    created_at: pd.Series  # UTC timestamps (NaT when unknown)

    @classmethod
    def build(cls, items: pd.DataFrame, item_ids: Sequence[str], at: pd.Timestamp) -> ItemTable:
        """``items`` (contract items table) reindexed to ``item_ids``; an id missing from it is not servable."""
        ids = [str(i) for i in item_ids]
        table = items.assign(**{ITEM_ID: items[ITEM_ID].astype(str)}).drop_duplicates(ITEM_ID, keep="last")
        table = table.set_index(ITEM_ID).reindex(ids)
        known = table.index.isin(items[ITEM_ID].astype(str)) if len(ids) else np.zeros(0, bool)
        available = table["available"] if "available" in table else pd.Series(True, index=table.index)
        available = available.astype("boolean").fillna(True).to_numpy(dtype=bool) & np.asarray(known, bool)
        created = pd.to_datetime(table["created_at"], utc=True) if "created_at" in table else \
            pd.Series(pd.NaT, index=table.index, dtype="datetime64[ns, UTC]")
        # Not created after the request; an item with no creation time is a new entry and servable.
        not_future = (created.isna() | (created <= at)).to_numpy(dtype=bool)
        category = table["category"] if "category" in table else pd.Series(None, index=table.index)
        category = category.astype(object).where(category.notna() & (category.astype(str) != ""), "unknown")
        regions = table["regions"] if "regions" in table else pd.Series(None, index=table.index)
        lists = [[r.strip() for r in str(v).split("|") if r.strip()] if isinstance(v, str) else [] for v in regions]
        unrestricted = np.array([not r for r in lists], dtype=bool)
        allowed: dict[str, np.ndarray] = {}
        for i, names in enumerate(lists):
            for name in names:
                allowed.setdefault(name, unrestricted.copy())[i] = True
        return cls(ids, available & not_future, category.to_numpy(dtype=object), allowed, unrestricted,
                   created.reset_index(drop=True))

    def without(self, item_ids: Collection[str]) -> ItemTable:
        """This catalog with ``item_ids`` not servable, like unavailable items (the safety flags)."""
        if not item_ids:
            return self
        return replace(self, servable=self.servable & ~pd.Index(self.item_ids).isin(list(item_ids)))

    def allowed_for(self, regions: Sequence[str | None]) -> np.ndarray:
        """(len(regions), items) bool: servable and allowed in each user's region (unknown region: unrestricted
        items only)."""
        out = np.empty((len(regions), len(self.item_ids)), dtype=bool)
        for row, region in enumerate(regions):
            base = self.region_allowed.get(region or NO_REGION, self.unrestricted)
            out[row] = base & self.servable
        return out


@dataclass
class UserHistory:
    """Users' histories before a request time, as sparse matrices over the catalog."""

    user_ids: list[str]
    seen: sp.csr_matrix  # users x items, 1 where the user interacted before the request
    recent: sp.csr_matrix  # users x items, recency weight of the user's most recent distinct items
    region: list[str | None]  # the user's region (location of their latest event, else the users table's)

    @classmethod
    def build(cls, history: pd.DataFrame, user_ids: Sequence[str], item_ids: Sequence[str], at: pd.Timestamp,
              config: CandidateConfig, users: pd.DataFrame | None = None) -> UserHistory:
        """``history`` holds events before ``at`` (later rows are ignored); ``users`` gives locations of users
        without located events."""
        uids = [str(u) for u in user_ids]
        index = item_ids if isinstance(item_ids, pd.Index) else pd.Index([str(i) for i in item_ids])
        shape = (len(uids), len(index))
        at_ns = moment_ns(at)
        stamps = utc_ns(history[TIMESTAMP]) if len(history) else np.zeros(0, np.int64)
        before = stamps < at_ns
        rows = pd.Index(uids).get_indexer(history[USER_ID].to_numpy()[before].astype(str))
        kept = np.flatnonzero(before)[rows >= 0]  # positions in `history` of these users' events before `at`
        rows = rows[rows >= 0]
        cols = index.get_indexer(history[ITEM_ID].to_numpy()[kept].astype(str))
        ok = cols >= 0
        seen = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (rows[ok], cols[ok])), shape=shape)
        seen.data[:] = 1.0
        # Each user's distinct items by their latest event, newest first; the first `recent_items` of them.
        u, i, t = rows[ok], cols[ok], stamps[kept][ok]
        order = np.argsort(t, kind="stable")
        u, i, t = u[order], i[order], t[order]
        last = last_of(u.astype(np.int64) * max(len(index), 1) + i)
        u, i, t = u[last], i[last], t[last]
        newer = count_after(u)
        keep = newer < config.recent_items
        age = ((at_ns - t[keep]) / 1e9) / SECONDS_PER_DAY
        weight = np.power(0.5, np.clip(age, 0, None) / config.recency_half_life_days).astype(np.float32)
        recent = sp.csr_matrix((weight, (u[keep], i[keep])), shape=shape)
        region: list[str | None] = [None] * len(uids)
        if users is not None and "location" in users:
            where: dict[str, Any] = {}
            for user, value in zip(users[USER_ID].astype(str).to_numpy(), users["location"].to_numpy(), strict=True):
                where.setdefault(user, value)  # a user's first row
            region = [v if isinstance(v := where.get(u), str) and v else None for u in uids]
        if "location" in history and len(kept):
            located = history["location"].to_numpy()[kept]
            has = pd.notna(located)
            lu, lt, lv = rows[has], stamps[kept][has], located[has]
            order = np.argsort(lt, kind="stable")
            lu, lv = lu[order], lv[order]
            for pos in last_of(lu):
                region[int(lu[pos])] = str(lv[pos])
        return cls(uids, seen.tocsr(), recent.tocsr(), region)


def item_counts(history: pd.DataFrame, item_ids: Sequence[str], at: pd.Timestamp,
                days: float | None = None) -> np.ndarray:
    """Distinct users per catalog item over the events before ``at`` (the last ``days`` days when given)."""
    h = history[history[TIMESTAMP] < at]
    if days is not None:
        h = h[h[TIMESTAMP] >= at - pd.Timedelta(days=days)]
    pairs = h[[USER_ID, ITEM_ID]].astype(str).drop_duplicates()
    idx = pd.Index([str(i) for i in item_ids]).get_indexer(pairs[ITEM_ID])
    return np.bincount(idx[idx >= 0], minlength=len(item_ids)).astype(np.float32)


# A context's own trending list (cold start) needs this many distinct users in the window; else the global list.
CONTEXT_MIN_USERS = 20
# What a cold user's trending list follows, in this order: the request's location and device (from events), then
# the demographics the request or the users table gives (occupation, age band, gender).
CONTEXT_COLUMNS = ("location", "device", "occupation", "age_band", "gender")
DEMOGRAPHIC_COLUMNS = ("occupation", "age", "gender")  # users-table / request fields; age is banded
AGE_BAND_EDGES = (18, 25, 35, 45, 55, 65)


def age_band(age: Any) -> str | None:
    """An age as a band label (``<18``, ``18-24``, ..., ``65+``); None when unknown or not a number."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(value) or value < 0:
        return None
    lower = [e for e in AGE_BAND_EDGES if e <= value]
    if not lower:
        return f"<{AGE_BAND_EDGES[0]}"
    upper = [e for e in AGE_BAND_EDGES if e > value]
    return f"{lower[-1]}-{upper[0] - 1}" if upper else f"{AGE_BAND_EDGES[-1]}+"


def demographic_context(row: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The context keys of a user's demographics (``occupation``, ``age_band``, ``gender``) from a users-table row
    or a request's context; missing or empty values are None."""
    row = row or {}

    def text(v: Any) -> str | None:
        return str(v).strip() or None if isinstance(v, str) or (v is not None and pd.notna(v)) else None

    return {"occupation": text(row.get("occupation")), "age_band": age_band(row.get("age")),
            "gender": text(row.get("gender"))}


def context_trending(history: pd.DataFrame, item_ids: Sequence[str], at: pd.Timestamp, days: float,
                     min_users: int = CONTEXT_MIN_USERS, users: pd.DataFrame | None = None
                     ) -> dict[tuple[str, str], np.ndarray]:
    """Trending counts per request context: ``(column, value) -> distinct users per catalog item`` over the last
    ``days`` before ``at``, for each value of :data:`CONTEXT_COLUMNS` seen in at least ``min_users`` users' events.
    Demographic columns come from ``users`` (the contract users table, first row per user)."""
    h = history[(history[TIMESTAMP] < at) & (history[TIMESTAMP] >= at - pd.Timedelta(days=days))]
    if users is not None and len(users) and len(h):
        active = h[USER_ID].astype(str).to_numpy()
        table = users.assign(**{USER_ID: users[USER_ID].astype(str)}).drop_duplicates(USER_ID, keep="first")
        table = table[table[USER_ID].isin(set(active))]  # only the window's users are counted
        pos = pd.Index(table[USER_ID]).get_indexer(active)
        demo = [demographic_context(r) for r in table.to_dict("records")] + [demographic_context(None)]
        h = h.assign(**{col: [demo[p][col] for p in np.where(pos >= 0, pos, len(demo) - 1)]
                        for col in ("occupation", "age_band", "gender")})
    index = pd.Index([str(i) for i in item_ids])
    out: dict[tuple[str, str], np.ndarray] = {}
    for column in CONTEXT_COLUMNS:
        if column not in h or not len(h):
            continue
        pairs = h[[column, USER_ID, ITEM_ID]].dropna(subset=[column]).astype(str).drop_duplicates()
        counts = pairs.groupby(column)[USER_ID].nunique()
        for value in counts[counts >= min_users].index:
            part = pairs[pairs[column] == value]
            idx = index.get_indexer(part[ITEM_ID])
            out[(column, str(value))] = np.bincount(idx[idx >= 0], minlength=len(index)).astype(np.float32)
    return out


def trending_rows(global_counts: np.ndarray, by_context: Mapping[tuple[str, str], np.ndarray],
                  cold: np.ndarray, contexts: Sequence[Mapping[str, str | None]]) -> np.ndarray:
    """The trending counts each user row of a block ranks by: a cold user's (``cold[row]``) follows its request
    context (the first of :data:`CONTEXT_COLUMNS` with its own list), everyone else the global counts.
    Returns ``global_counts`` itself when no row differs, else a ``(rows, items)`` matrix."""
    out: np.ndarray | None = None
    for row in np.flatnonzero(cold):
        for column in CONTEXT_COLUMNS:
            value = contexts[row].get(column)
            counts = by_context.get((column, str(value))) if value else None
            if counts is not None:
                if out is None:
                    out = np.repeat(np.asarray(global_counts, np.float32)[None, :], len(contexts), axis=0)
                out[row] = counts
                break
    return global_counts if out is None else out


def _tied_cut(masked: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``part`` (each row's ``width`` best positions by an argpartition) with ties at the cut resolved to the lowest
    catalog index: argpartition keeps any of the items tied with the last one kept."""
    vals = np.take_along_axis(masked, part, axis=1)
    cut = vals.min(axis=1)
    in_part = (vals == cut[:, None]).sum(axis=1)
    in_row = (masked == cut[:, None]).sum(axis=1)
    for row in np.flatnonzero(np.isfinite(cut) & (in_row > in_part)):
        above = np.flatnonzero(masked[row] > cut[row])
        tied = np.flatnonzero(masked[row] == cut[row])[:part.shape[1] - len(above)]
        part[row] = np.concatenate([above, tied])
    return part


def _best_positions(values: np.ndarray, k: int) -> np.ndarray:
    """The positions of the ``k`` largest finite ``values``, best first, equal values by position (at the cut
    too): :func:`top_k` of one row, without its masking."""
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) > k:
        part = finite[np.argpartition(-values[finite], k - 1)[:k]]
        cut = values[part].min()
        above = finite[values[finite] > cut]
        finite = np.concatenate([above, finite[values[finite] == cut][:k - len(above)]])
    return finite[np.lexsort((finite, -values[finite]))]


WIDE_ROW_FACTOR = 16  # rows at least this many times wider than k take :func:`_top_k_wide`


def _kth_largest(values: np.ndarray, k: int) -> float:
    """``np.partition(values, n - k)[n - k]``, the ``k``-th largest of ``values`` (no NaN; 1 <= k <= n), without
    partitioning the whole of a long array: the ``k``-th best of a strided sample is a value at least ``k``
    values reach, so the ``k``-th largest is the ``k``-th largest of the values at or above it."""
    n = len(values)
    if n >= WIDE_ROW_FACTOR * k:
        sample = values[::max(2, int(np.sqrt(n / k)))]
        if len(sample) >= k:
            cut = np.partition(sample, len(sample) - k)[len(sample) - k]
            values = values[values >= cut]
            n = len(values)
    return np.partition(values, n - k)[n - k]


def _top_k_wide(masked: np.ndarray, width: int, out_idx: np.ndarray, out_score: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` of rows much wider than ``width``, row by row, with the same result: the ``width``-th best
    of a strided sample of a row is a score at least ``width`` items of the row reach, so only the items at or
    above it can be among the row's best (ties at the cut included); the exact top-k runs on those few
    (about ``width * stride`` of them, ``stride`` ~ sqrt(items / width)) instead of the whole catalog."""
    n_items = masked.shape[1]
    stride = max(2, int(np.sqrt(n_items / width)))
    for row in range(len(masked)):
        values = masked[row]
        sample = values[::stride]
        if np.count_nonzero(sample > -np.inf) >= width:
            cut = np.partition(sample, len(sample) - width)[len(sample) - width]
            cols = np.flatnonzero(values >= cut)  # ascending: positions keep the catalog order for ties
        else:
            cols = np.flatnonzero(values > -np.inf)
        best = _best_positions(values[cols], width)
        out_idx[row, :len(best)] = cols[best]
        out_score[row, :len(best)] = values[cols[best]]
    return out_idx, out_score


def top_k(scores: np.ndarray, allowed: np.ndarray, k: int, positive_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best allowed items: ``(indices, scores)``, -1 / NaN padded, best first; equal scores go to the
    lower catalog index (at the cut too)."""
    masked = np.where(allowed, scores, -np.inf).astype(np.float32, copy=False)
    if positive_only:
        masked[masked <= 0] = -np.inf
    n_items = masked.shape[1]
    width = min(k, n_items)
    out_idx = np.full((len(masked), k), -1, dtype=np.int64)
    out_score = np.full((len(masked), k), np.nan, dtype=np.float32)
    if width == 0 or not len(masked):
        return out_idx, out_score
    if n_items >= WIDE_ROW_FACTOR * width:
        return _top_k_wide(masked, width, out_idx, out_score)
    part = _tied_cut(masked, np.argpartition(-masked, width - 1, axis=1)[:, :width]) if width < n_items else \
        np.broadcast_to(np.arange(n_items), masked.shape).copy()
    part = np.sort(part, axis=1)  # ties broken by item index
    vals = np.take_along_axis(masked, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    best, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
    valid = np.isfinite(vals)
    out_idx[:, :width] = np.where(valid, best, -1)
    out_score[:, :width] = np.where(valid, vals, np.nan)
    return out_idx, out_score


def top_k_sparse(scores: sp.csr_matrix, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` with ``positive_only`` of a sparse score matrix (absent = 0): only its stored positive
    allowed entries can be chosen, so it never builds the dense rows."""
    m = sp.csr_matrix(scores, dtype=np.float32)
    out_idx = np.full((m.shape[0], k), -1, dtype=np.int64)
    out_score = np.full((m.shape[0], k), np.nan, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    cols, vals = m.indices.astype(np.int64), m.data
    ok = (vals > 0) & allowed[rows, cols]
    rows, cols, vals = rows[ok], cols[ok], vals[ok]
    order = np.lexsort((cols, -vals, rows))  # by row, best first, ties by catalog index
    rows, cols, vals = rows[order], cols[order], vals[order]
    place = count_before(rows)
    keep = place < min(k, m.shape[1])
    out_idx[rows[keep], place[keep]] = cols[keep]
    out_score[rows[keep], place[keep]] = vals[keep]
    return out_idx, out_score


def top_k_ranked(order: np.ndarray, scores: np.ndarray, allowed: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` with ``positive_only`` for rows that share one score vector: ``order`` is its positive items
    best first, ties by catalog index (:func:`ranked_order`); each row takes its first ``k`` allowed ones."""
    out_idx = np.full((len(allowed), k), -1, dtype=np.int64)
    out_score = np.full((len(allowed), k), np.nan, dtype=np.float32)
    for row in range(len(allowed)):
        step, found = max(2 * k, 64), np.zeros(0, np.int64)
        start = 0
        while len(found) < k and start < len(order):  # widen the window until k allowed items are found
            window = order[start:start + step]
            found = np.concatenate([found, window[allowed[row, window]]])
            start, step = start + step, step * 2
        found = found[:k]
        out_idx[row, :len(found)] = found
        out_score[row, :len(found)] = scores[found]
    return out_idx, out_score


def ranked_order(scores: np.ndarray) -> np.ndarray:
    """The positive entries of a score vector, best first, ties by catalog index (what :func:`top_k_ranked`
    walks)."""
    values = np.asarray(scores, np.float32)
    positive = np.flatnonzero(values > 0)
    return positive[np.argsort(-values[positive], kind="stable")]


PRUNE_MIN_ITEMS = 20_000  # catalogs at least this large take the pruned exact two-tower top-k
HEAD_ENERGY = 0.998  # the pruned top-k's projection keeps the principal axes holding this share of the variance
PAIR_CHUNK = 1 << 16  # (user, item) pairs scored at once (bounds the float64 temporaries)


class TwoTowerItems:
    """The catalog's two-tower item vectors and the one definition of a two-tower score: the inner product of
    the user's and the item's float32 vectors computed in float64 and rounded to float32. (A float32 BLAS
    product gives results that depend on the batch: one user scored alone and inside a block of users differed
    by up to 1e-5 here; in float64 such differences vanish in the rounding.)

    On catalogs of :data:`PRUNE_MIN_ITEMS` items or more, :meth:`top_k` does not score the whole catalog: the
    vectors are rotated onto their principal axes once (the head: the first axes holding :data:`HEAD_ENERGY` of
    the variance, at least 8 and at most half of them; a few axes hold nearly all of it in trained embeddings),
    each item's score is bounded by its head product plus or minus the product of the tail norms
    (Cauchy-Schwarz), and only items whose upper bound reaches the ``k``-th best lower bound are scored exactly.
    Every item of the exact top ``k``, ties at the cut included, passes that test, so the lists are
    :func:`top_k`'s of the full scores (tested). A flat spectrum only makes the test pass more items.
    """

    def __init__(self, vectors: np.ndarray, prune: bool | None = None) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.shape = self.vectors.shape
        n, dim = self.shape
        self.pruned = (n >= PRUNE_MIN_ITEMS if prune is None else prune) and dim >= 16
        v64 = self.vectors.astype(np.float64)
        # A small catalog keeps a float64 copy (its full score matrix is computed per block); a pruned one does not.
        self._v64 = None if self.pruned else v64
        if self.pruned:
            eigval, eigvec = np.linalg.eigh(v64.T @ v64)
            order = np.argsort(-eigval, kind="stable")
            basis, energy = eigvec[:, order], np.cumsum(np.clip(eigval[order], 0, None))
            share = energy / energy[-1] if energy[-1] > 0 else np.ones(dim)
            self.head_dims = h = int(np.clip(np.searchsorted(share, HEAD_ENERGY) + 1, 8, dim // 2))
            self.head_basis, self.tail_basis = basis[:, :h], basis[:, h:]
            rotated = v64 @ basis
            self.head_t = np.ascontiguousarray(rotated[:, :h].T, dtype=np.float32)  # (head dims, items)
            self.tail_norm = np.linalg.norm(rotated[:, h:], axis=1).astype(np.float32)
            self.norm_max = float(np.linalg.norm(v64, axis=1).max()) if n else 0.0

    def all_scores(self, user_vectors: np.ndarray) -> np.ndarray:
        """Every (user, item) score, ``(users, items)`` float32."""
        v64 = self._v64 if self._v64 is not None else self.vectors.astype(np.float64)
        return (np.asarray(user_vectors, np.float32).astype(np.float64) @ v64.T).astype(np.float32)

    def pair_scores(self, user_vectors: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The scores of the pairs ``(user_vectors[rows[i]], item items[i])``, float32."""
        users = np.asarray(user_vectors, np.float32).astype(np.float64)
        rows, items = np.asarray(rows, np.int64), np.asarray(items, np.int64)
        if len(rows) and (rows == rows[0]).all():  # one user's items (a request): a matrix-vector product
            return (self.vectors[items].astype(np.float64) @ users[rows[0]]).astype(np.float32)
        out = np.empty(len(rows), np.float32)
        for start in range(0, len(rows), PAIR_CHUNK):
            part = slice(start, start + PAIR_CHUNK)
            out[part] = np.einsum("ij,ij->i", users[rows[part]], self.vectors[items[part]].astype(np.float64))
        return out

    def top_k(self, user_vectors: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`top_k` of :meth:`all_scores` (``positive_only`` off), pruned on large catalogs."""
        if not self.pruned:
            return top_k(self.all_scores(user_vectors), allowed, k, positive_only=False)
        users = np.asarray(user_vectors, np.float32).astype(np.float64)
        out_idx = np.full((len(users), k), -1, dtype=np.int64)
        out_score = np.full((len(users), k), np.nan, dtype=np.float32)
        heads = (users @ self.head_basis).astype(np.float32)
        tails = np.linalg.norm(users @ self.tail_basis, axis=1).astype(np.float32)
        # The head products, float32; a block's users in one product (the head vectors are read once).
        every = heads @ self.head_t if len(users) > 1 else None
        for row in range(len(users)):
            ok = allowed[row]
            coarse = every[row] if every is not None else heads[row] @ self.head_t
            # Float32 rounding of the head product, the norms and the final score is far below this margin.
            spread = tails[row] * self.tail_norm
            spread += np.float32(1e-4 * np.linalg.norm(users[row]) * self.norm_max)
            upper = coarse + spread
            lower = np.subtract(coarse, spread, out=coarse)
            np.copyto(lower, -np.inf, where=~ok)
            if int(np.count_nonzero(ok)) > k:
                kth = _kth_largest(lower, k)  # the k-th best lower bound: k items score at least this
                cand = np.flatnonzero((upper >= kth) & ok)
            else:
                cand = np.flatnonzero(ok)
            if not len(cand):
                continue
            exact = self.pair_scores(users[row:row + 1], np.zeros(len(cand), np.int64), cand)
            best = _best_positions(exact, k)  # cand is ascending: positions break ties by catalog index
            out_idx[row, :len(best)] = cand[best]
            out_score[row, :len(best)] = exact[best]
        return out_idx, out_score


class TwoTowerScores:
    """A block's two-tower scores read like the dense ``(rows, items)`` matrix (:meth:`TwoTowerItems.pair_scores`
    of the pairs asked for), for catalogs too large to score whole per request."""

    def __init__(self, items: TwoTowerItems, user_vectors: np.ndarray) -> None:
        self.items, self.user_vectors = items, np.asarray(user_vectors, np.float32)
        self.shape = (len(self.user_vectors), items.shape[0])

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        rows, items = key
        return self.items.pair_scores(self.user_vectors, rows, items)


class SparseScores:
    """A block's sparse scores read like the dense ``(rows, items)`` matrix they stand for (absent = 0):
    ``shape`` and ``[rows, items]`` lookups, which is what fusion reads of them."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        m = sp.csr_matrix(matrix, dtype=np.float32)
        m.sum_duplicates()  # canonical: sorted, unique indices per row
        self.shape = m.shape
        self._keys = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) * m.shape[1] + m.indices
        self._data = m.data

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        rows, items = key
        want = np.asarray(rows, np.int64) * self.shape[1] + np.asarray(items, np.int64)
        pos = np.searchsorted(self._keys, want)
        hit = pos < len(self._keys)
        hit[hit] = self._keys[pos[hit]] == want[hit]
        out = np.zeros(len(want), np.float32)
        out[hit] = self._data[pos[hit]]
        return out


@dataclass
class SourceLists:
    """Each source's ranked lists for a block of users: ``source -> (indices, scores)``, and the dense
    cross scores of every (user, item) of the block that feature assembly reads for any candidate."""

    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: dict[str, np.ndarray]


def source_lists(user_vectors: np.ndarray | None, item_vectors: np.ndarray | TwoTowerItems | None,
                 history: UserHistory, rows: slice, graph: ItemGraph, catalog: ItemTable, trending: np.ndarray,
                 popularity: np.ndarray,
                 config: CandidateConfig, k: int | None = None, orders: Mapping[str, np.ndarray] | None = None
                 ) -> SourceLists:
    """Every source's top-k (default ``pool_size``) for the users ``history.user_ids[rows]``; ``trending`` is one
    row of counts for every user or one row per user of ``rows`` (:func:`trending_rows`).

    The item-graph sources are scored sparsely (:func:`top_k_sparse`); ``orders`` may hold the
    :func:`ranked_order` of the one-row ``trending`` and of ``popularity`` (a server computes them once), which
    their lists then walk instead of scoring the catalog. The lists are the same either way."""
    k = k or config.pool_size
    orders = orders or {}
    seen = history.seen[rows]
    allowed = catalog.allowed_for(history.region[rows])
    allowed[seen.nonzero()] = False
    recent = history.recent[rows]
    sparse = {"i2i": (recent @ graph.cooccurrence).tocsr(), "content": (recent @ graph.content).tocsr()}
    dense: dict[str, Any] = {name: SparseScores(matrix) for name, matrix in sparse.items()}
    tower = None
    if user_vectors is not None and item_vectors is not None:
        tower = item_vectors if isinstance(item_vectors, TwoTowerItems) else TwoTowerItems(item_vectors)
        dense["two_tower"] = TwoTowerScores(tower, user_vectors) if tower.pruned else tower.all_scores(user_vectors)
    n = allowed.shape[0]
    dense["trending"] = np.broadcast_to(trending, (n, trending.shape[-1]))  # one row for all, or one per user
    dense["popularity"] = np.broadcast_to(popularity, (n, len(popularity)))
    lists = {}
    for source in SOURCES:
        if source not in dense or config.weights.get(source, 0.0) <= 0:
            continue
        if source in sparse:
            lists[source] = top_k_sparse(sparse[source], allowed, k)
        elif source == "two_tower" and tower is not None and tower.pruned:
            lists[source] = tower.top_k(user_vectors, allowed, k)
        elif source in orders and (source != "trending" or np.ndim(trending) == 1):
            lists[source] = top_k_ranked(orders[source], trending if source == "trending" else popularity,
                                         allowed, k)
        else:
            lists[source] = top_k(dense[source], allowed, k, positive_only=source != "two_tower")
    return SourceLists(lists, dense)


def block_rows(block: SourceLists) -> int:
    """How many user rows a block's lists have."""
    return next(iter(block.dense.values())).shape[0]


def fuse(block: SourceLists, config: CandidateConfig) -> pd.DataFrame:
    """The pool: per user (block row) the ``rank_size`` best items by weighted reciprocal rank fusion.

    Columns: ``row`` (user row in the block), ``item`` (catalog index), ``{source}_score`` and
    ``{source}_rank`` (1-based; NaN where absent), ``fused_score``, ``pool_rank`` (1-based), ``n_sources``.
    """
    return pd.DataFrame(fuse_arrays(block, config), copy=False)


def fuse_arrays(block: SourceLists, config: CandidateConfig) -> dict[str, np.ndarray]:
    """:func:`fuse`'s columns as arrays, in its column order (a request builds its frame once from them)."""
    n_items = next(iter(block.dense.values())).shape[1]
    keys, parts = [], {}
    for source, (idx, _) in block.lists.items():
        r, c = np.nonzero(idx >= 0)
        keys.append(r.astype(np.int64) * n_items + idx[r, c])
        parts[source] = (r.astype(np.int64) * n_items + idx[r, c], c + 1)
    if not keys:
        return {name: np.zeros(0) for name in ("row", "item", "fused_score", "pool_rank", "n_sources")}
    marked = np.zeros(int(block_rows(block)) * n_items, dtype=bool)  # a mask over the block's cells: sorted, unique
    marked[np.concatenate(keys)] = True
    pool = np.flatnonzero(marked)
    fused = np.zeros(len(pool), np.float64)
    n_sources = np.zeros(len(pool), np.int16)
    out: dict[str, np.ndarray] = {"row": pool // n_items, "item": pool % n_items}
    for source in SOURCES:
        rank = np.full(len(pool), np.nan)
        if source in parts:
            key, r = parts[source]
            rank[np.searchsorted(pool, key)] = r
            hit = ~np.isnan(rank)
            fused[hit] += config.weights.get(source, 0.0) / (config.rrf_k + rank[hit])
            n_sources += hit
        out[f"{source}_rank"] = rank
    out["fused_score"], out["n_sources"] = fused, n_sources
    # Per row, best fused score first, ties by catalog index: a lexsort (last key first), then each row's ranks.
    # The pool is in (row, item) order already, so a stable sort on (row, -fused) keeps items ascending on ties.
    order = np.lexsort((-fused, out["row"]))
    pool_rank = count_before(out["row"][order]) + 1
    keep = pool_rank <= config.ranked
    taken = order[keep]
    frame = {name: values[taken] for name, values in out.items()}
    frame["pool_rank"] = pool_rank[keep]
    rows, items = frame["row"], frame["item"]
    for source in SOURCES:  # every source's score for every candidate (a cross feature), NaN without it
        values = block.dense.get(source)
        frame[f"{source}_score"] = values[rows, items].astype(np.float32) if values is not None else \
            np.full(len(rows), np.nan)
    return frame
