"""Offline protocol metrics (DATA_CONTRACT.md "Default offline evaluation protocol"): the one implementation.

Offline evaluation and serving/canary both call these functions. The definitions match the
independent ``../shared/bench/protocol.py`` number for number:

- test users: users with history and at least one item in the future window they had not seen;
  relevant items are those new items;
- ``recall@k`` = hits in the first k recommendations / |relevant| (a list shorter than k is
  allowed; a recommended item counts at every position it appears);
- at K = 10: ``ndcg@10`` (binary relevance, log2 discount, ideal DCG over min(|relevant|, 10)
  positions), ``precision@10`` = hits / 10, ``hit@10``, ``map@10`` (precision at each hit,
  summed, / min(|relevant|, 10)) and ``coverage@10`` = distinct items in all top-10 lists / catalog size.

``evaluate`` adds 95 % percentile-bootstrap confidence intervals over test users (not for coverage).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, SEED, USER_ID
from pipeline_tasks.core.errors import NoTestUsersError

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 100, 500)
# The cut-off of NDCG, precision, hit rate, MAP and coverage.
HEAD_K = 10
DEFAULT_N_BOOT = 1000
CI_LEVEL = 0.95
COVERAGE = "coverage@10"
# Bootstrap work is done this many (resample, user) cells at a time, to bound memory.
_BOOT_CELLS = 4_000_000

# 1 / log2(rank + 1) for ranks 1..HEAD_K, and the ideal DCG of m relevant items (m = 0..HEAD_K),
# summed as protocol.py sums it.
_DISCOUNT = 1.0 / np.log2(np.arange(2, HEAD_K + 2))
_IDEAL_DCG = np.array([_DISCOUNT[:m].sum() for m in range(HEAD_K + 1)])
_RANKS = np.arange(1, HEAD_K + 1)


def targets(history: pd.DataFrame, future: pd.DataFrame) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Test users and their relevant items, and every history user's seen items.

    Args:
        history: Interactions before the evaluation window (``user_id``, ``item_id``).
        future: Interactions in the evaluation window.

    Returns:
        ``(truth, seen)``: ``truth`` maps each user with history and at least one item in ``future``
        not in their history to those new items; ``seen`` maps each history user to their items.
        Ids are strings; both dicts are ordered by user id.
    """
    seen = _item_sets(history)
    truth: dict[str, set[str]] = {}
    for user, items in _item_sets(future).items():
        if user in seen:
            new = items - seen[user]
            if new:
                truth[user] = new
    return truth, seen


def _item_sets(frame: pd.DataFrame) -> dict[str, set[str]]:
    ids = pd.DataFrame({USER_ID: frame[USER_ID].astype(str), ITEM_ID: frame[ITEM_ID].astype(str)})
    return ids.groupby(USER_ID)[ITEM_ID].agg(set).to_dict()


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive cut-offs, got {ks}")
    return ks


class _Hits:
    """Which positions of the truth users' recommendation lists (cut at max_k) hold a relevant item."""

    def __init__(self, recs: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], max_k: int) -> None:
        self.users = list(truth)
        n = len(self.users)
        self.lists = [recs.get(u, ()) for u in self.users]
        self.lengths = np.fromiter((min(len(r), max_k) for r in self.lists), dtype=np.int64, count=n)
        self.n_rel = np.fromiter((len(truth[u]) for u in self.users), dtype=np.int64, count=n)
        if n and self.n_rel.min() == 0:
            empty = self.users[int(np.argmin(self.n_rel))]
            raise ValueError(f"truth has users with no relevant item (first: {empty!r}); build it with targets()")
        per_list = (
            map(truth[u].__contains__, itertools.islice(r, max_k)) for u, r in zip(self.users, self.lists, strict=True)
        )
        self.hit = np.fromiter(itertools.chain.from_iterable(per_list), dtype=bool, count=int(self.lengths.sum()))
        # Hits before each position of the concatenated lists: a user's hits in their first k
        # positions is a difference of two entries.
        self.cum = np.concatenate([[0], np.cumsum(self.hit, dtype=np.int64)])
        self.starts = np.cumsum(self.lengths) - self.lengths

    def hits_at(self, k: int) -> np.ndarray:
        """Number of hits among each user's first k recommendations."""
        return (self.cum[self.starts + np.minimum(self.lengths, k)] - self.cum[self.starts]).astype(float)

    def head(self) -> np.ndarray:
        """(n_users, HEAD_K) 0/1 matrix: is the item at each of the first HEAD_K positions relevant."""
        pos = np.arange(HEAD_K)
        inside = pos < np.minimum(self.lengths, HEAD_K)[:, None]
        out = np.zeros((len(self.users), HEAD_K))
        out[inside] = self.hit[(self.starts[:, None] + pos)[inside]]
        return out

    def covered(self) -> int:
        """Distinct items in the first HEAD_K positions of all lists."""
        return len(set(itertools.chain.from_iterable(itertools.islice(r, HEAD_K) for r in self.lists)))


def _per_user(hits: _Hits, ks: tuple[int, ...]) -> pd.DataFrame:
    columns: dict[str, np.ndarray] = {}
    for k in ks:
        columns[f"recall@{k}"] = hits.hits_at(k) / hits.n_rel
        if k == HEAD_K:
            columns.update(_head_metrics(hits))
    return pd.DataFrame(columns, index=pd.Index(hits.users, name=USER_ID, dtype=object))


def _head_metrics(hits: _Hits) -> dict[str, np.ndarray]:
    """NDCG, precision, hit rate and AP at HEAD_K for each user."""
    head = hits.head()
    n_hits = head.sum(axis=1)
    depth = np.minimum(hits.n_rel, HEAD_K)
    dcg = np.zeros(len(head))
    precision_sum = np.zeros(len(head))
    # Rows grouped by list length so that each row's sums run over exactly its own positions, in the
    # same order as protocol.py's (bit-identical results, not merely close ones).
    length = np.minimum(hits.lengths, HEAD_K)
    for m in np.unique(length[length > 0]):
        rows = length == m
        h = head[rows, :m]
        dcg[rows] = (h * _DISCOUNT[:m]).sum(axis=1)
        precision_sum[rows] = (h * np.cumsum(h, axis=1) / _RANKS[:m]).sum(axis=1)
    return {
        "ndcg@10": dcg / _IDEAL_DCG[depth],
        "precision@10": n_hits / HEAD_K,
        "hit@10": (n_hits > 0).astype(float),
        "map@10": precision_sum / depth,
    }


def per_user_metrics(
    recs: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], ks: Sequence[int] = DEFAULT_KS
) -> pd.DataFrame:
    """Each test user's metrics.

    Args:
        recs: User -> ranked item ids, best first, already excluding the user's history. Users missing
            from ``recs`` count as empty lists; users not in ``truth`` are ignored.
        truth: Test user -> relevant items (non-empty), as from ``targets``.
        ks: Cut-offs for recall; the K = 10 metrics are computed when 10 is one of them.

    Returns:
        One row per truth user (index ``user_id``, in ``truth`` order): ``recall@k`` for each k, and
        ``ndcg@10``, ``precision@10``, ``hit@10``, ``map@10``.
    """
    ks = _check_ks(ks)
    return _per_user(_Hits(recs, truth, max(ks)), ks)


def evaluate(
    recs: Mapping[str, Sequence[str]],
    truth: Mapping[str, set[str]],
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = SEED,
) -> dict[str, Any]:
    """Mean metrics over test users, with 95 % bootstrap confidence intervals.

    Args:
        recs: User -> ranked item ids (see ``per_user_metrics``).
        truth: Test user -> relevant items, as from ``targets``.
        n_items: Catalog size, the denominator of ``coverage@10``.
        ks: Recall cut-offs; the K = 10 metrics and coverage are computed when 10 is one of them.
        n_boot: Bootstrap resamples of the test users (0: no intervals).
        seed: Seed of the resampling.

    Returns:
        The keys of protocol.metrics (``recall@k``, ``ndcg@10``, ``precision@10``, ``hit@10``, ``map@10``,
        ``coverage@10``, ``users``) and ``ci95``: metric -> ``[low, high]``, the 2.5th and 97.5th
        percentiles of each per-user mean over resamples of the test users with replacement. Coverage
        has no interval: it is a catalog count, not a mean over users, and a resample (which holds
        about 63 % of the distinct users) covers fewer items, so its bootstrap interval is biased low
        and usually excludes the observed value.
    """
    ks = _check_ks(ks)
    if not truth:
        raise NoTestUsersError("no test users: truth is empty (is the evaluation window empty, or has no user "
                               "history?)")
    if n_items < 1:
        raise ValueError(f"n_items must be the catalog size (>= 1), got {n_items}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    hits = _Hits(recs, truth, max(ks))
    table = _per_user(hits, ks)
    result: dict[str, Any] = {}
    for name in table.columns:
        result[name] = float(table[name].to_numpy().mean())
        if name == "map@10":
            result[COVERAGE] = hits.covered() / n_items
    result["users"] = len(table)
    log.debug("evaluated %d test users: %s", len(table), result)
    if n_boot == 0:
        result["ci95"] = {}
        return result
    tail = (1 - CI_LEVEL) / 2 * 100
    values = np.ascontiguousarray(table.to_numpy(dtype=float))
    low, high = np.percentile(_bootstrap_means(values, n_boot, seed), [tail, 100 - tail], axis=0)
    result["ci95"] = {name: [float(lo), float(hi)] for name, lo, hi in zip(table.columns, low, high, strict=True)}
    return result


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, metrics) means of ``values`` (users x metrics) over resamples of the users with replacement."""
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, values.shape[1]))
    chunk = max(1, _BOOT_CELLS // n)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draws = rng.integers(0, n, size=(size, n))
        # How often each user is drawn in each resample: a resample's means are counts @ values / n.
        offsets = (np.arange(size, dtype=np.int64) * n)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n).reshape(size, n)
        means[start : start + size] = counts.astype(np.float64) @ values / n
    return means


def top_k_unseen(scores: np.ndarray, seen: Sequence[np.ndarray | Sequence[int]], k: int) -> np.ndarray:
    """Each row's k best item indices, best first, never one of that row's seen items.

    Args:
        scores: (n_users, n_items) scores; higher is better. NaN and -inf scores are never returned
            (a caller can set -inf to exclude more items, e.g. unavailable ones). Not modified.
        seen: For each row, the item indices to exclude.
        k: Number of items per row.

    Returns:
        (n_users, k) int64 item indices in descending score order. When a row has fewer than k
        candidates (k >= n_items - |seen|), its list ends with -1 padding. Equal scores are ordered
        by item index, except at the cut, where which of the tied items make the list is unspecified.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_users, n_items), got shape {scores.shape}")
    if len(seen) != len(scores):
        raise ValueError(f"seen has {len(seen)} rows but scores has {len(scores)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_users, n_items = scores.shape
    masked = np.array(scores, dtype=np.result_type(scores.dtype, np.float32))
    masked[np.isnan(masked)] = -np.inf
    lengths = [len(s) for s in seen]
    if sum(lengths):
        cols = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in seen])
        masked[np.repeat(np.arange(n_users), lengths), cols] = -np.inf
    out = np.full((n_users, k), -1, dtype=np.int64)
    width = min(k, n_items)
    if width == 0 or n_users == 0:
        return out
    if width < n_items:
        # argpartition on the negated scores puts each row's `width` largest first (unordered).
        part = np.argpartition(-masked, width - 1, axis=1)[:, :width]
    else:
        part = np.broadcast_to(np.arange(n_items), (n_users, n_items))
    part = np.sort(part, axis=1)  # so that the stable sort below breaks ties by item index
    part_scores = np.take_along_axis(masked, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    valid = np.take_along_axis(part_scores, order, axis=1) > -np.inf
    out[:, :width] = np.where(valid, best, -1)
    return out


def format_metric(value: float, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    """A metric with its interval, e.g. ``0.412 [0.351, 0.470]`` (just the value without ``ci``)."""
    if ci is None or len(ci) == 0:
        return f"{value:.{digits}f}"
    if len(ci) != 2:
        raise ValueError(f"ci must be [low, high], got {ci}")
    low, high = ci
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
