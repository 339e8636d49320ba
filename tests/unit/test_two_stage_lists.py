"""Two-stage lists on a hand-made catalog (:mod:`tiny_two_stage`): `recsys recommend`'s popularity fill when the
pool is smaller than k, the evaluation's list checks (unique, unseen) and the cold-start row kept out of the headline
rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import tiny_two_stage as tiny

from pipeline_tasks.core.settings import load_settings
from pipeline_tasks.evaluation.metrics import targets
from pipeline_tasks.evaluation.two_stage import ListCheckError, check_lists, cold_start_row, evaluate_fit
from pipeline_tasks.online.bundle import BUNDLE_FILE, open_bundle
from pipeline_tasks.online.two_stage import Moment, candidate_blocks, load_fit


@pytest.fixture
def bundle_dir(tmp_path, monkeypatch):
    """A bundle on disk (serving fit, accepted contract data) in an empty RECSYS_HOME (no features, no flags)."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_SAFETY_FLAGS", raising=False)
    history = tiny.history()
    accepted = tmp_path / "accepted"
    accepted.mkdir()
    history.to_parquet(accepted / "interactions.parquet", index=False)
    tiny.items().to_parquet(accepted / "items.parquet", index=False)
    bundle = tmp_path / "bundle"
    tiny.fit(history).save(bundle / "serving", {"fit": "serving"})
    (bundle / BUNDLE_FILE).write_text(json.dumps({"model": "recsys_fill_ns", "version": 1, "namespace": "fill_ns",
                                                  "accepted_dir": str(accepted)}))
    return bundle


@pytest.mark.parametrize("rules", [False, True], ids=["no-rules", "rules"])
def test_recommend_fills_a_pool_smaller_than_k_from_popularity(bundle_dir, rules):
    from pipeline_tasks.bundle.recommend import recommend

    k = 6
    pool = next(candidate_blocks(load_fit(bundle_dir / "serving"), Moment(tiny.AT, tiny.history(), tiny.items()),
                                 ["u1"])).column("item_id")
    assert sorted(pool) == ["i1", "i2"]  # the saved fit's pool for u1: smaller than k
    out = recommend(open_bundle(bundle_dir), ["u1"], k, tiny.AT, rules=rules, settings=load_settings())
    got = out.sort_values("rank")["item_id"].tolist()
    assert len(got) == k and len(set(got)) == k
    assert out["rank"].tolist() == list(range(1, k + 1)) and out["score"].is_monotonic_decreasing
    assert "i0" not in got  # seen
    assert not {"i8", "i9", "i5"} & set(got)  # unavailable, created after AT, not allowed in u1's region
    # The pool (i1 at i2i rank 1, i2 at rank 2) first, in the ranker's order (it prefers the later pool rank) ...
    assert got[:2] == ["i2", "i1"]
    # ... then the servable unseen items by popularity: i3 (6 users), i4 (5), i6 (3), i7 (2).
    assert got[2:] == ["i3", "i4", "i6", "i7"]


def test_recommend_asks_for_more_than_the_servable_catalog(bundle_dir):
    from pipeline_tasks.bundle.recommend import recommend

    out = recommend(open_bundle(bundle_dir), ["u1"], 9, tiny.AT, rules=False, settings=load_settings())
    # 10 items: i0 seen, i5 / i8 / i9 not servable to u1: 6 left, each once.
    assert out["item_id"].tolist() == ["i2", "i1", "i3", "i4", "i6", "i7"]


def test_check_lists_names_the_user_and_the_problem():
    seen = {"u1": {"i0", "i9"}, "u2": set()}
    check_lists({"u1": ["i1", "i2"], "u2": ["i0", "i9"], "u3": ["i1"]}, seen, "two-stage")  # valid: no error
    with pytest.raises(ListCheckError, match=r"^two-stage: the list of user u2 repeats items$"):
        check_lists({"u1": ["i1"], "u2": ["i3", "i4", "i3"]}, seen, "two-stage")
    with pytest.raises(ListCheckError, match=r"^merged pool: the list of user u1 contains seen items \['i9'\]$"):
        check_lists({"u1": ["i1", "i9", "i2"]}, seen, "merged pool")
    with pytest.raises(ListCheckError, match=r"seen items \['i0', 'i9'\]"):
        check_lists({"u1": ["i9", "i0"]}, seen, "popularity")


def test_cold_start_users_are_outside_the_headline_rows():
    history = tiny.history()
    fit = tiny.fit(history)
    moment = Moment(tiny.AT, history, tiny.items())
    # The test window: u1 and u2 have history (headline users); c1 and c2 have none before AT (cold start).
    future = pd.DataFrame({"user_id": ["u1", "u2", "c1", "c1", "c2"], "item_id": ["i2", "i3", "i3", "i4", "i6"],
                           "timestamp": [tiny.AT + pd.Timedelta(hours=h) for h in range(5)], "event_type": "view"})
    rows = {"two-stage": "ranker", "merged pool": "pool"}
    table, per_user, lists = evaluate_fit(fit, moment, future, 6, n_boot=0, rows=rows)
    headline = {"u1", "u2"}
    assert set(per_user.index) == headline
    assert all(table[row]["users"] == 2 for row in rows)
    assert all(set(lists[row]) == headline for row in rows)
    assert set(targets(history, future)[0]) == headline  # the protocol's test users: history before the cut
    cold = cold_start_row(fit, moment, future, 6, n_boot=0, seed=0)
    assert cold["users"] == 2  # c1 and c2 only
    # The cold list is the popularity order of servable items (the fit has no trending source): i3, i4, i0, ...
    # c1 finds both of its items in the top 10, c2 its one.
    assert cold["recall@10"] == pytest.approx(1.0)
    no_cold = future[future["user_id"].str.startswith("u")]
    assert cold_start_row(fit, moment, no_cold, 6, n_boot=0, seed=0) is None


def test_a_block_without_candidates_is_filled_from_popularity():
    from pipeline_tasks.online.two_stage import rank_block, ranked_lists

    history = tiny.history()
    fit = tiny.fit(history)
    moment = Moment(tiny.AT, history, tiny.items())
    # A block whose only user has an empty pool (no history: no item-to-item neighbours).
    assert ranked_lists(fit, moment, ["nobody"], 4)["ranker"]["nobody"] == [("i3", -1.0), ("i4", -2.0),
                                                                           ("i0", -3.0), ("i6", -4.0)]
    # A block whose every candidate is excluded (a request's exclude, the safety flags): the fill skips them too.
    block = next(candidate_blocks(fit, moment, ["u1"], fill_k=6))
    assert set(block.column("item_id")) == {"i1", "i2"}
    got = rank_block(fit, block, 4, rules=False, exclude={"u1": {"i1", "i2", "i3"}})
    assert [i for i, _ in got["u1"]] == ["i4", "i6", "i7"]  # i3 excluded; i0 seen; i5, i8, i9 not servable
