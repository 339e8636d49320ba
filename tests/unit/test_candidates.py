"""Candidate sources, servability filters and the fused pool (pure logic, small hand-made catalogs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.candidates import (
    SOURCES,
    CandidateConfig,
    ItemTable,
    UserHistory,
    build_item_graph,
    fuse,
    item_counts,
    source_lists,
    top_k,
)

AT = pd.Timestamp("2025-01-10", tz="UTC")


def _ts(day: int) -> pd.Timestamp:
    return pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=day)


@pytest.fixture
def catalog() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{n}" for n in range(8)],
        "category": ["a", "a", "b", "b", "c", None, "c", "a"],
        "created_at": [_ts(0)] * 6 + [_ts(20), pd.NaT],  # i6 created after AT; i7 unknown creation
        "available": [True, True, True, False, True, True, True, True],  # i3 unavailable
        "regions": [None, None, "DE", None, None, "US|FR", None, None],  # i2 DE only, i5 US/FR only
    })


@pytest.fixture
def history() -> pd.DataFrame:
    rows = [("u1", "i0", 1), ("u1", "i1", 2), ("u2", "i0", 3), ("u2", "i1", 4), ("u2", "i4", 5),
            ("u3", "i4", 6), ("u3", "i5", 7), ("u4", "i0", 8)]
    return pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "timestamp": [_ts(r[2]) for r in rows], "event_type": "view",
                         "location": ["DE", "DE", "US", "US", "US", "FR", "FR", None]})


def test_servability(catalog):
    table = ItemTable.build(catalog, catalog["item_id"], AT)
    assert table.servable.tolist() == [True, True, True, False, True, True, False, True]
    allowed = table.allowed_for(["DE", "US", None])
    assert allowed[0, 2] and not allowed[1, 2] and not allowed[2, 2]  # DE-only item
    assert allowed[1, 5] and not allowed[0, 5]  # US|FR item
    assert not allowed[:, 3].any() and not allowed[:, 6].any()  # unavailable, created after the request
    assert table.category[5] == "unknown"
    # an id the items table lacks is never servable
    assert not ItemTable.build(catalog, ["i0", "zz"], AT).servable[1]


def test_user_history_recency_and_region(history, catalog):
    cfg = CandidateConfig(recent_items=1, recency_half_life_days=1.0)
    h = UserHistory.build(history, ["u1", "u3", "new"], catalog["item_id"], AT, cfg)
    assert h.seen[0].indices.tolist() == [0, 1] and h.seen[2].nnz == 0
    assert h.recent[0].nnz == 1 and h.recent[0].indices.tolist() == [1]  # only the most recent item
    assert h.recent[0].data[0] == pytest.approx(0.5 ** 7)  # 7 days old, half-life 1 day
    assert h.region == ["DE", "FR", None]
    later = history.assign(timestamp=history["timestamp"] + pd.Timedelta(days=30))
    assert UserHistory.build(later, ["u1"], catalog["item_id"], AT, cfg).seen.nnz == 0  # events after AT ignored


def test_item_graph_cooccurrence_and_cold_content(history, catalog):
    content = np.eye(8, dtype=np.float32)
    content[7] = content[0]  # i7 (no events: cold) has i0's content
    graph = build_item_graph(history, catalog["item_id"], content, CandidateConfig(cold_item_events=1))
    ease = build_item_graph(history, catalog["item_id"], content,
                            CandidateConfig(cold_item_events=1, graph="ease", ease_lambda=1.0)).cooccurrence.toarray()
    assert ease[0, 1] > 0 and ease[0, 0] == 0 and ease[0, 5] <= 0  # EASE weights: co-occurring items are positive
    co = graph.cooccurrence.toarray()
    assert co[0, 1] > 0 and co[0, 1] == pytest.approx(co[1, 0]) and co[0, 0] == 0
    assert co[0, 5] == 0  # never together
    assert graph.content.toarray()[0, 7] == pytest.approx(1.0)  # cold item reached through content
    assert graph.content.toarray()[0, 1] == 0  # warm items are not content candidates


def test_top_k_skips_disallowed_and_pads():
    scores = np.array([[0.1, 0.9, 0.5, -1.0]], dtype=np.float32)
    allowed = np.array([[True, False, True, True]])
    idx, vals = top_k(scores, allowed, 5, positive_only=True)
    assert idx[0].tolist() == [2, 0, -1, -1, -1] and np.isnan(vals[0, 2:]).all()
    idx, _ = top_k(scores, allowed, 3, positive_only=False)
    assert idx[0].tolist() == [2, 0, 3]


def test_pool_is_unique_servable_unseen_and_keeps_source_ranks(history, catalog):
    cfg = CandidateConfig(pool_size=3, rank_size=4, cold_item_events=1)
    ids = catalog["item_id"].tolist()
    graph = build_item_graph(history, ids, np.eye(8, dtype=np.float32), cfg)
    table = ItemTable.build(catalog, ids, AT)
    users = ["u1", "u4", "cold"]
    h = UserHistory.build(history, users, ids, AT, cfg)
    rng = np.random.default_rng(0)
    lists = source_lists(rng.normal(size=(3, 4)), rng.normal(size=(8, 4)), h, slice(0, 3), graph, table,
                         item_counts(history, ids, AT, days=7), item_counts(history, ids, AT), cfg)
    pool = fuse(lists, cfg)
    assert set(lists.lists) == set(SOURCES)
    for row in range(len(users)):
        got = pool[pool["row"] == row]
        assert got["item"].is_unique and len(got) <= 4
        assert got["pool_rank"].tolist() == list(range(1, len(got) + 1))
        seen = set(h.seen[row].indices)
        assert not seen & set(got["item"])
        assert table.allowed_for([h.region[row]])[0, got["item"]].all()
        assert (got["fused_score"].diff().dropna() <= 0).all()
    # every candidate's source columns: a rank where the source returned it
    assert (pool["n_sources"] == pool[[f"{s}_rank" for s in SOURCES]].notna().sum(axis=1)).all()
    # u1 saw i0 and i1: co-occurrence brings u2's i4
    u1 = pool[pool["row"] == 0]
    assert 4 in u1.loc[u1["i2i_rank"].notna(), "item"].tolist()


def test_config_refuses_unknown_params():
    with pytest.raises(InvalidParamsError, match="unknown candidates params"):
        CandidateConfig.from_params({"pool": 5})
    with pytest.raises(InvalidParamsError, match="unknown sources"):
        CandidateConfig.from_params({"weights": {"magic": 1.0}})
    with pytest.raises(InvalidParamsError, match="pool_size"):
        CandidateConfig(pool_size=0)
    with pytest.raises(InvalidParamsError, match="rank_size"):
        CandidateConfig(pool_size=10, rank_size=5)
    with pytest.raises(InvalidParamsError, match="graph"):
        CandidateConfig(graph="magic")
    assert CandidateConfig(pool_size=10).ranked == 20
    assert CandidateConfig.from_params({"weights": {"i2i": 3.0}}).weights["two_tower"] == 1.0


def test_validation_chooses_how_history_seeds_i2i(catalog):
    """The graph x history-seeding grid is scored on validation recall and its best row is the config returned:
    here only the user's older item (i0) leads to their future item (i1), so seeding from one recent item misses."""
    from pipeline_tasks.online.candidates import ItemGraph
    from pipeline_tasks.online.two_stage import Fit, Moment
    from pipeline_tasks.ranking.fits import choose_graph

    rows = [("u2", "i0", 1), ("u2", "i1", 2), ("u3", "i4", 3), ("u3", "i7", 4), ("t", "i0", 1), ("t", "i4", 8)]
    hist = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "timestamp": [_ts(r[2]) for r in rows], "event_type": "view"})
    ids = catalog["item_id"].tolist()
    base = CandidateConfig(pool_size=2, recent_items=1)
    probe = Fit(None, ItemGraph(ids, None, None), base)
    chosen, graph, table = choose_graph(probe, Moment(AT, hist, catalog), {"t": {"i1"}}, base, None,
                                        grid=[{"graph": "cosine"}], history_grid=[{}, {"recent_items": 1000}])
    assert [(row["recent_items"], row["i2i_recall"]) for row in table] == [(1, 0.0), (1000, 1.0)]
    assert chosen.recent_items == 1000 and chosen.graph == "cosine" and graph.item_ids == ids


def test_cold_users_get_the_trending_list_of_their_context():
    """Trending per location / device among users active in the window (enough of them), and only cold rows follow
    their context: the first context column with its own list, else the global counts."""
    from pipeline_tasks.online.candidates import context_trending, trending_rows

    rows = [(f"de{n}", "i0", "DE", "mobile") for n in range(3)] + [(f"us{n}", "i1", "US", "web") for n in range(2)]
    rows += [("old", "i2", "DE", "mobile")]  # outside the 7-day window
    hist = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "location": [r[2] for r in rows], "device": [r[3] for r in rows],
                         "timestamp": [_ts(8)] * 5 + [_ts(1)]})
    ids = ["i0", "i1", "i2"]
    by_context = context_trending(hist, ids, AT, days=7, min_users=3)
    assert set(by_context) == {("location", "DE"), ("device", "mobile")}  # US / web: too few users
    assert by_context[("location", "DE")].tolist() == [3, 0, 0]
    overall = np.array([3, 2, 0], np.float32)
    cold = np.array([True, True, True, False])
    contexts = [{"location": "DE", "device": "web"}, {"location": "US", "device": "mobile"},
                {"location": None, "device": None}, {"location": "DE", "device": "mobile"}]
    got = trending_rows(overall, by_context, cold, contexts)
    assert got.tolist() == [[3, 0, 0], [3, 0, 0], [3, 2, 0], [3, 2, 0]]  # DE; mobile (no US list); global; warm
    assert trending_rows(overall, by_context, np.zeros(4, bool), contexts) is overall  # nobody cold: no copy


def test_cold_users_get_the_trending_list_of_their_demographics():
    """Occupation, age band and gender come from the users table (first row per user); a cold user's own users-table
    row or the demographics its request states pick the list, after location and device."""
    from pipeline_tasks.online.candidates import age_band, context_trending, demographic_context, trending_rows

    assert [age_band(a) for a in (12, 18, 24, 25, 64, 65, 90, None, "x", float("nan"), -3)] == \
        ["<18", "18-24", "18-24", "25-34", "55-64", "65+", "65+", None, None, None, None]
    assert demographic_context({"occupation": " student ", "age": 22, "gender": ""}) == \
        {"occupation": "student", "age_band": "18-24", "gender": None}
    rows = [(f"s{n}", "i0") for n in range(3)] + [(f"e{n}", "i1") for n in range(3)]
    hist = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                         "timestamp": [_ts(8)] * len(rows)})
    users = pd.DataFrame({"user_id": ["s0", "s1", "s2", "e0", "e1", "e2", "s0"],
                          "occupation": ["student"] * 3 + ["engineer"] * 3 + ["engineer"],  # s0's first row counts
                          "age": [20, 21, 22, 40, 41, 42, 99], "gender": ["F", "M", "M", "M", "F", "M", "F"]})
    by_context = context_trending(hist, ["i0", "i1", "i2"], AT, days=7, min_users=3, users=users)
    assert by_context[("occupation", "student")].tolist() == [3, 0, 0]
    assert by_context[("age_band", "35-44")].tolist() == [0, 3, 0]
    assert by_context[("gender", "M")].tolist() == [2, 2, 0] and ("gender", "F") not in by_context  # 4 and 2 users
    overall = np.array([3, 3, 0], np.float32)
    contexts = [{"location": None, "device": None, **demographic_context({"occupation": "engineer"})},
                {"location": None, "device": None, **demographic_context({"age": 19})},
                {"location": None, "device": None, **demographic_context({"gender": "F"})}]
    got = trending_rows(overall, by_context, np.ones(3, bool), contexts)
    assert got.tolist() == [[0, 3, 0], [3, 0, 0], [3, 3, 0]]  # engineers; 18-24; no list for F: global


def _reference_top(scores: np.ndarray, allowed: np.ndarray, k: int, positive_only: bool) -> list[list[int]]:
    """Each row's k best allowed items by (-score, index): what every top-k of the module must return."""
    out = []
    for row, ok in zip(scores, allowed, strict=True):
        keep = [i for i in range(len(row)) if ok[i] and (row[i] > 0 or not positive_only)]
        out.append(sorted(keep, key=lambda i: (-row[i], i))[:k])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_variants_agree_and_break_ties_by_index_at_the_cut(seed):
    """Dense, sparse and pre-ordered top-k give the same lists, ties at the cut going to the lower index
    (integer counts tie a lot: trending and popularity)."""
    import scipy.sparse as sp

    from pipeline_tasks.online.candidates import ranked_order, top_k_ranked, top_k_sparse

    rng = np.random.default_rng(seed)
    n_rows, n_items, k = 6, 300, 40
    counts = rng.integers(0, 4, size=n_items).astype(np.float32)  # many ties, zeros excluded
    allowed = rng.random((n_rows, n_items)) > 0.3
    sparse = sp.random(n_rows, n_items, density=0.2, random_state=seed, dtype=np.float32).tocsr()
    sparse.data = np.round(sparse.data * 4) / 4  # ties
    for scores, positive in ((np.broadcast_to(counts, (n_rows, n_items)), True), (sparse.toarray(), True),
                             (rng.integers(-3, 3, size=(n_rows, n_items)).astype(np.float32), False)):
        want = _reference_top(scores, allowed, k, positive)
        idx, vals = top_k(scores, allowed, k, positive_only=positive)
        assert [[i for i in row if i >= 0] for row in idx.tolist()] == want
        got = np.take_along_axis(scores, np.where(idx >= 0, idx, 0), axis=1)
        np.testing.assert_array_equal(np.where(idx >= 0, got, np.nan), vals)
    idx_sparse, vals_sparse = top_k_sparse(sparse, allowed, k)
    idx_dense, vals_dense = top_k(sparse.toarray(), allowed, k, positive_only=True)
    np.testing.assert_array_equal(idx_sparse, idx_dense)
    np.testing.assert_array_equal(vals_sparse, vals_dense)
    idx_ranked, vals_ranked = top_k_ranked(ranked_order(counts), counts, allowed, k)
    idx_dense, vals_dense = top_k(np.broadcast_to(counts, allowed.shape), allowed, k, positive_only=True)
    np.testing.assert_array_equal(idx_ranked, idx_dense)
    np.testing.assert_array_equal(vals_ranked, vals_dense)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_of_wide_rows_is_the_exact_top_k(seed):
    """Rows far wider than k take the sampled-threshold path; its lists equal the reference's: ties at the
    cut, rows with fewer allowed items than k, rows of one repeated score, positive-only rows."""
    from pipeline_tasks.online.candidates import WIDE_ROW_FACTOR

    rng = np.random.default_rng(seed)
    k = 12
    n_items = WIDE_ROW_FACTOR * k * 3
    scores = np.vstack([
        rng.normal(size=n_items),                          # distinct scores
        rng.integers(0, 5, size=n_items),                  # heavy ties at the cut
        np.full(n_items, 0.5),                             # one repeated score
        np.sort(rng.normal(size=n_items)),                 # best items at the end (worst case for the sample)
        rng.normal(size=n_items),                          # few allowed (below)
        rng.integers(-2, 2, size=n_items),                 # mostly non-positive
    ]).astype(np.float32)
    allowed = rng.random(scores.shape) > 0.2
    allowed[4] = False
    allowed[4, rng.choice(n_items, size=k // 2, replace=False)] = True
    for positive in (True, False):
        want = _reference_top(scores, allowed, k, positive)
        idx, vals = top_k(scores, allowed, k, positive_only=positive)
        assert [[i for i in row if i >= 0] for row in idx.tolist()] == want
        got = np.take_along_axis(scores, np.where(idx >= 0, idx, 0), axis=1)
        np.testing.assert_array_equal(np.where(idx >= 0, got, np.nan), vals)


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_two_tower_top_k_is_the_exact_top_k(seed):
    """On a large catalog the two-tower top-k bounds scores by a projection and scores exactly only what it
    cannot rule out: the lists equal the exact top-k of every score (duplicate vectors tie at the cut), and a
    pair's score is the same read alone, in a block or from the full matrix."""
    from pipeline_tasks.online.candidates import PRUNE_MIN_ITEMS, TwoTowerItems

    rng = np.random.default_rng(seed)
    n_items, dim, k = PRUNE_MIN_ITEMS + 500, 32, 60
    # Trained embeddings: most variance in a few directions, plus a small spread in all.
    basis = rng.normal(size=(6, dim))
    items = (rng.normal(size=(n_items, 6)) * [4, 3, 2, 1.5, 1, 0.5]) @ basis + 0.05 * rng.normal(size=(n_items, dim))
    users = rng.normal(size=(5, 6)) @ basis + 0.05 * rng.normal(size=(5, dim))
    cut = int(np.argsort(-(items @ users[0]))[k - 5])  # user 0's item just above the cut
    items[1000:1400] = items[cut]  # 400 copies of it: a tie straddling user 0's cut
    allowed = rng.random((5, n_items)) > 0.1
    allowed[4] = False
    allowed[4, :k // 2] = True  # fewer allowed items than k
    tower = TwoTowerItems(items.astype(np.float32))
    assert tower.pruned
    full = tower.all_scores(users.astype(np.float32))
    want_idx, want_vals = top_k(full, allowed, k, positive_only=False)
    idx, vals = tower.top_k(users.astype(np.float32), allowed, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(vals, want_vals)
    for row in (0, 3):  # a user alone (a request) gets the list it gets inside the block
        alone_idx, _ = tower.top_k(users[row:row + 1].astype(np.float32), allowed[row:row + 1], k)
        np.testing.assert_array_equal(alone_idx[0], want_idx[row])
    tied = [i for i in idx[0].tolist() if i == cut or 1000 <= i < 1400]
    assert len(tied) > 1 and 1399 not in tied and tied == sorted(tied)  # the tie went to the lowest indices
    rows, cols = np.repeat(np.arange(5), 300), rng.integers(0, n_items, size=1500)
    np.testing.assert_array_equal(tower.pair_scores(users.astype(np.float32), rows, cols), full[rows, cols])
    alone = tower.all_scores(users[2:3].astype(np.float32))[0]
    np.testing.assert_array_equal(alone, full[2])


def test_kth_largest_is_the_partition_value():
    """The sampled k-th largest (long arrays) equals np.partition's, with ties, -inf and short arrays."""
    from pipeline_tasks.online.candidates import _kth_largest

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60_000))
        k = int(rng.integers(1, min(n, 1500) + 1))
        values = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            values = np.round(values, 1)  # many ties
        if trial % 4 == 0:
            values[rng.random(n) < 0.7] = -np.inf  # masked items
        assert _kth_largest(values, k) == np.partition(values, n - k)[n - k], (n, k)
