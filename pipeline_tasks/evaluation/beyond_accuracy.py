"""List metrics beyond accuracy: how concentrated, diverse and novel the recommendations are.

All take ``recs`` (user -> ranked item ids, best first) and look at each user's first k positions:

- ``gini@k`` (``gini_of_exposure``): the Gini coefficient of the exposure counts (appearances in
  the top-k lists) of all ``n_items`` catalog items, never-recommended items counting as 0. With
  the counts sorted ascending, ``G = 2 * sum(i * x_i) / (n * sum(x)) - (n + 1) / n`` (i = 1..n):
  0 when every item is shown equally often, (n - 1) / n when one item takes all exposure; 0 when
  nothing is shown at all.
- ``ild@k`` (``intra_list_diversity``): per user, the mean cosine distance ``1 - cos`` over the
  pairs of distinct top-k items that have a (non-zero, finite) vector, averaged over users. 0 for
  identical directions, 1 for orthogonal ones (up to 2 for opposite ones).
- ``category_diversity@k``: the same with a categorical distance: per user, the share of pairs of
  distinct top-k items (with a known category) whose categories differ.
- ``novelty@k``: per user, the mean self-information ``-log2(p_i)`` of the top-k items, where
  ``p_i`` = users who interacted with item i / ``n_users``, clipped to ``[1 / n_users, 1]`` (an item
  nobody interacted with gets the maximum, ``log2(n_users)``); averaged over users.

The pairwise metrics skip users with fewer than 2 usable items and novelty skips users with an
empty list; a mean over no users is NaN.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_K = 10

ItemVectors = Mapping[str, np.ndarray] | tuple[Sequence[str], np.ndarray]


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _head(items: Iterable[str], k: int) -> list[str]:
    """The first k positions of a list."""
    return list(itertools.islice(items, k))


def _distinct_head(items: Iterable[str], k: int) -> list[str]:
    """The distinct items among the first k positions, in order."""
    return list(dict.fromkeys(itertools.islice(items, k)))


def _mean(values: list[float], metric: str) -> float:
    if not values:
        log.debug("%s: no user qualifies", metric)
        return float("nan")
    return float(np.mean(values))


def gini_of_exposure(recs: Mapping[str, Sequence[str]], n_items: int, k: int = DEFAULT_K) -> float:
    """Gini coefficient of the catalog items' exposure in the top-k lists.

    Args:
        recs: User -> ranked item ids. Each appearance in a first-k slice is one exposure.
        n_items: Catalog size (>= 1); items never recommended count as 0 exposure.
        k: Cut-off.

    Returns:
        0 for perfectly even exposure over the whole catalog, towards 1 for concentrated exposure;
        0.0 when there is no exposure at all.

    Raises:
        ValueError: ``n_items < 1``, ``k < 1``, or more distinct items are recommended than ``n_items``.
    """
    k = _check_k(k)
    if n_items < 1:
        raise ValueError(f"n_items must be the catalog size (>= 1), got {n_items}")
    counts = Counter(itertools.chain.from_iterable(_head(r, k) for r in recs.values()))
    if len(counts) > n_items:
        raise ValueError(f"{len(counts)} distinct items are recommended but the catalog has n_items={n_items}")
    exposure = np.zeros(n_items, dtype=np.float64)
    exposure[n_items - len(counts) :] = sorted(counts.values())  # ascending, zeros first
    total = exposure.sum()
    if total == 0:
        return 0.0
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    return float(2.0 * (ranks @ exposure) / (n_items * total) - (n_items + 1) / n_items)


def _vector_table(item_vectors: ItemVectors) -> tuple[dict[str, int], np.ndarray]:
    """Row index of each item with a usable vector, and the unit-normalised matrix."""
    if isinstance(item_vectors, tuple):
        ids, matrix = item_vectors
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or len(matrix) != len(ids):
            raise ValueError(f"item_vectors: the matrix must be (len(ids), dim) = ({len(ids)}, dim), "
                             f"got shape {matrix.shape}")
        ids = list(ids)
    else:
        ids = list(item_vectors)
        rows = [np.asarray(item_vectors[i], dtype=np.float64).ravel() for i in ids]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("item_vectors: the vectors do not all have the same dimension")
        matrix = np.vstack(rows) if rows else np.zeros((0, 1))
    norms = np.linalg.norm(matrix, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    if not usable.all():
        log.debug("item_vectors: %d zero or non-finite vector(s) ignored", int((~usable).sum()))
    unit = matrix[usable] / norms[usable, None]
    index = {item: row for row, item in enumerate(itertools.compress(ids, usable))}
    return index, unit


def intra_list_diversity(
    recs: Mapping[str, Sequence[str]], item_vectors: ItemVectors, k: int = DEFAULT_K
) -> float:
    """Mean over users of the average pairwise cosine distance of their top-k items.

    Args:
        recs: User -> ranked item ids.
        item_vectors: Item id -> vector, or ``(ids, matrix)`` with one row per id. Items without a
            vector (or with a zero or non-finite one) are left out of the pairs.
        k: Cut-off.

    Returns:
        The mean of ``1 - cos`` over pairs of distinct top-k items, averaged over users with at least
        2 such items; NaN when no user has.
    """
    k = _check_k(k)
    index, unit = _vector_table(item_vectors)
    per_user: list[float] = []
    for items in recs.values():
        rows = [index[i] for i in _distinct_head(items, k) if i in index]
        m = len(rows)
        if m < 2:
            continue
        v = unit[rows]
        sim = v @ v.T
        mean_sim = (sim.sum() - np.trace(sim)) / (m * (m - 1))
        per_user.append(float(np.clip(1.0 - mean_sim, 0.0, 2.0)))
    return _mean(per_user, "intra_list_diversity")


def _known(category: object) -> bool:
    if category is None:
        return False
    if isinstance(category, str):
        return bool(category.strip())
    try:
        return not bool(pd.isna(category))
    except (TypeError, ValueError):
        return True


def category_diversity(
    recs: Mapping[str, Sequence[str]], categories: Mapping[str, str], k: int = DEFAULT_K
) -> float:
    """Mean over users of the share of pairs of their top-k items in different categories.

    Args:
        recs: User -> ranked item ids.
        categories: Item id -> category; items missing, or with a null/NaN/empty category, are left
            out of the pairs.
        k: Cut-off.

    Returns:
        The categorical intra-list diversity, averaged over users with at least 2 such items; NaN
        when no user has.
    """
    k = _check_k(k)
    per_user: list[float] = []
    for items in recs.values():
        cats = [categories[i] for i in _distinct_head(items, k) if i in categories and _known(categories[i])]
        m = len(cats)
        if m < 2:
            continue
        counts = np.fromiter(Counter(cats).values(), dtype=np.float64)
        same = float((counts * (counts - 1)).sum())
        per_user.append(1.0 - same / (m * (m - 1)))
    return _mean(per_user, "category_diversity")


def novelty(
    recs: Mapping[str, Sequence[str]], popularity: Mapping[str, float], n_users: int, k: int = DEFAULT_K
) -> float:
    """Mean over users of the mean self-information of their top-k items.

    Args:
        recs: User -> ranked item ids.
        popularity: Item id -> number of users who interacted with it (missing or NaN: 0).
        n_users: Number of users the popularity counts are out of (>= 1).
        k: Cut-off.

    Returns:
        The mean of ``-log2(p_i)`` over each user's first k positions, averaged over users with a
        non-empty list, in bits; NaN when no user has one.

    Raises:
        ValueError: ``n_users < 1`` or ``k < 1``.
    """
    k = _check_k(k)
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    per_user: list[float] = []
    for items in recs.values():
        head = _head(items, k)
        if not head:
            continue
        counts = np.array([popularity.get(i, 0.0) for i in head], dtype=np.float64)
        p = np.clip(np.nan_to_num(counts, nan=0.0) / n_users, 1.0 / n_users, 1.0)
        per_user.append(float(np.mean(-np.log2(p))))
    return _mean(per_user, "novelty")


def beyond_accuracy(
    recs: Mapping[str, Sequence[str]],
    *,
    n_items: int,
    item_popularity: Mapping[str, float],
    n_users: int,
    categories: Mapping[str, str] | None = None,
    item_vectors: ItemVectors | None = None,
    k: int = DEFAULT_K,
) -> dict[str, float]:
    """All beyond-accuracy metrics of a set of lists.

    Args:
        recs: User -> ranked item ids.
        n_items: Catalog size (for ``gini@k``).
        item_popularity: Item id -> number of users who interacted with it (for ``novelty@k``).
        n_users: Number of users behind ``item_popularity``.
        categories: Item id -> category; adds ``category_diversity@k``.
        item_vectors: Item vectors (see ``intra_list_diversity``); adds ``ild@k``.
        k: Cut-off, also used in the key names.

    Returns:
        ``gini@k``, ``novelty@k``, and ``ild@k`` / ``category_diversity@k`` when their inputs are given.
    """
    result = {
        f"gini@{k}": gini_of_exposure(recs, n_items, k),
        f"novelty@{k}": novelty(recs, item_popularity, n_users, k),
    }
    if item_vectors is not None:
        result[f"ild@{k}"] = intra_list_diversity(recs, item_vectors, k)
    if categories is not None:
        result[f"category_diversity@{k}"] = category_diversity(recs, categories, k)
    log.debug("beyond-accuracy metrics of %d lists: %s", len(recs), result)
    return result
