"""Offline protocol metrics (DATA_CONTRACT.md "Default offline evaluation protocol"): agreement with the
independent ../shared/bench/protocol.py, boundary cases, the bootstrap intervals and top-k selection."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.evaluation.metrics import evaluate, format_metric, per_user_metrics, targets, top_k_unseen

BENCH = Path(__file__).resolve().parents[3] / "shared" / "bench"
K10 = ("ndcg@10", "precision@10", "hit@10", "map@10")


@pytest.fixture(scope="module")
def protocol() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("protocol")


def interactions(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def random_case(seed: int, n_users: int = 300, n_items: int = 400) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Truth sets of 1-30 items; lists of 0-600 items (some duplicated, some users without a list, some
    lists for users outside truth), drawn so that hits are frequent."""
    rng = np.random.default_rng(seed)
    truth = {
        f"u{u}": {f"i{i}" for i in rng.choice(n_items, rng.integers(1, 31), replace=False)} for u in range(n_users)
    }
    recs: dict[str, list[str]] = {}
    for u, rel in truth.items():
        draw = rng.random()
        if draw < 0.1:
            continue  # missing from recs
        length = 0 if draw < 0.15 else int(rng.integers(1, 601))
        pool = sorted(rel) + [f"i{i}" for i in range(n_items)]
        recs[u] = [pool[j] for j in rng.integers(0, len(pool), length)]
    recs["not-a-test-user"] = ["i1", "i2"]
    return recs, truth


# --- targets -----------------------------------------------------------------------------------


def test_targets_match_protocol_on_a_hand_made_frame(protocol: ModuleType) -> None:
    history = interactions([("a", "1"), ("a", "2"), ("b", "1"), ("c", "3"), ("a", "1")])
    future = interactions([
        ("a", "2"), ("a", "3"), ("a", "4"), ("a", "3"),  # a: 3 and 4 are new
        ("b", "1"),  # b: nothing new -> not a test user
        ("d", "1"),  # d: no history -> not a test user
        ("c", "5"),
    ])
    truth, seen = targets(history, future)
    assert truth == {"a": {"3", "4"}, "c": {"5"}}
    assert seen == {"a": {"1", "2"}, "b": {"1"}, "c": {"3"}}
    their_truth, their_seen = protocol.targets(history, future)
    assert truth == their_truth
    assert seen == their_seen.to_dict()


def test_targets_give_string_ids_for_integer_columns(protocol: ModuleType) -> None:
    history = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10]})
    future = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [12, 10, 10]})
    truth, seen = targets(history, future)
    assert truth == {"1": {"12"}}
    assert seen == {"1": {"10", "11"}, "2": {"10"}}
    their_truth, _ = protocol.targets(history.astype(str), future.astype(str))
    assert truth == their_truth


def test_targets_match_protocol_on_ml100k_time_split(protocol: ModuleType, ml100k: Path, tmp_path: Path) -> None:
    raw = pd.read_csv(ml100k / "u.data", sep="\t", names=["user", "item", "rating", "epoch"])
    inter = pd.DataFrame({
        "user_id": raw["user"].astype(str),
        "item_id": raw["item"].astype(str),
        "timestamp": pd.to_datetime(raw["epoch"], unit="s", utc=True),
    })
    inter.to_parquet(tmp_path / "interactions.parquet")
    train, val, test, _, _ = protocol.split(tmp_path)
    for history, future in ((train, val), (pd.concat([train, val]), test)):
        truth, seen = targets(history, future)
        their_truth, their_seen = protocol.targets(history, future)
        assert truth == their_truth
        assert seen == their_seen.to_dict()
    assert len(truth) == 90  # DATA_CONTRACT.md: ml-100k has 90 test users


# --- means against protocol.metrics ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ks", [(10, 100, 500), (10,), (3, 10, 50), (20, 100)])
def test_evaluate_means_equal_protocol(protocol: ModuleType, seed: int, ks: tuple[int, ...]) -> None:
    recs, truth = random_case(seed)
    ours = evaluate(recs, truth, n_items=400, ks=ks, n_boot=0)
    theirs = protocol.metrics(recs, truth, 400, ks=ks)
    assert set(ours) - {"ci95"} == set(theirs)
    for name, value in theirs.items():
        assert np.isclose(ours[name], value, rtol=1e-12, atol=0), name
    assert ours["hit@10" if 10 in ks else f"recall@{ks[0]}"] > 0  # the case does exercise hits


def test_per_user_metrics_equal_protocol_user_by_user(protocol: ModuleType) -> None:
    recs, truth = random_case(3, n_users=60)
    table = per_user_metrics(recs, truth)
    assert table.index.name == "user_id"
    assert table.index.tolist() == list(truth)
    assert table.columns.tolist() == ["recall@10", *K10, "recall@100", "recall@500"]
    for user in truth:
        theirs = protocol.metrics(recs, {user: truth[user]}, 400)
        for name in table.columns:
            assert np.isclose(table.at[user, name], theirs[name], rtol=1e-12, atol=0), (user, name)


# --- boundary cases ----------------------------------------------------------------------------


def test_perfect_ranking() -> None:
    truth = {"few": {"a", "b", "c"}, "many": {f"m{i}" for i in range(12)}}
    recs = {"few": ["b", "a", "c", "x", "y"], "many": sorted(truth["many"]) + ["x"]}
    table = per_user_metrics(recs, truth, ks=(10, 100))
    assert table["ndcg@10"].tolist() == [1.0, 1.0]
    assert table["map@10"].tolist() == [1.0, 1.0]
    assert table["hit@10"].tolist() == [1.0, 1.0]
    assert table.at["few", "recall@10"] == 1.0
    assert table.at["few", "precision@10"] == pytest.approx(0.3)
    assert table.at["many", "recall@10"] == pytest.approx(10 / 12)
    assert table.at["many", "precision@10"] == 1.0
    assert table["recall@100"].tolist() == [1.0, 1.0]


def test_no_hits_and_empty_lists_score_zero() -> None:
    truth = {"u1": {"a"}, "u2": {"b"}, "u3": {"c"}}
    recs = {"u1": ["x", "y", "z"], "u2": []}  # u3 has no list at all
    result = evaluate(recs, truth, n_items=10, n_boot=50)
    for name in ("recall@10", *K10, "recall@100", "recall@500"):
        assert result[name] == 0.0, name
        assert result["ci95"][name] == [0.0, 0.0], name
    assert result["coverage@10"] == pytest.approx(0.3)
    assert result["users"] == 3


def test_hit_positions_set_ndcg_and_map() -> None:
    # One relevant item of two, at rank 2 (and an irrelevant item at rank 1).
    table = per_user_metrics({"u": ["x", "a", "y"]}, {"u": {"a", "b"}}, ks=(10,))
    ideal = 1 + 1 / np.log2(3)
    assert table.at["u", "ndcg@10"] == pytest.approx((1 / np.log2(3)) / ideal)
    assert table.at["u", "map@10"] == pytest.approx(0.5 / 2)
    assert table.at["u", "recall@10"] == 0.5


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="no test users"):
        evaluate({}, {}, n_items=10)
    with pytest.raises(ValueError, match="no relevant item"):
        evaluate({"u": ["a"]}, {"u": set()}, n_items=10)
    with pytest.raises(ValueError, match="ks must be"):
        per_user_metrics({}, {"u": {"a"}}, ks=(10, 0))
    with pytest.raises(ValueError, match="n_items"):
        evaluate({}, {"u": {"a"}}, n_items=0)


# --- bootstrap intervals -----------------------------------------------------------------------


def test_ci_contains_the_mean_and_is_seeded() -> None:
    recs, truth = random_case(4)
    first = evaluate(recs, truth, n_items=400, n_boot=300, seed=7)
    again = evaluate(recs, truth, n_items=400, n_boot=300, seed=7)
    other = evaluate(recs, truth, n_items=400, n_boot=300, seed=8)
    assert first == again
    assert first["ci95"] != other["ci95"]
    assert set(first["ci95"]) == {"recall@10", *K10, "recall@100", "recall@500"}
    for name, (low, high) in first["ci95"].items():
        assert low <= first[name] <= high, name
        assert low < high, name


def test_ci_narrows_with_more_users() -> None:
    def width(n_users: int) -> float:
        recs, truth = random_case(5, n_users=n_users)
        low, high = evaluate(recs, truth, n_items=400, ks=(10,), n_boot=500)["ci95"]["ndcg@10"]
        return high - low

    small, large = width(50), width(2000)
    # About sqrt(2000 / 50) ~ 6.3 times narrower.
    assert large < small / 3


def test_bootstrap_is_fast_for_100k_users() -> None:
    rng = np.random.default_rng(0)
    names = np.array([f"i{i}" for i in range(1000)], dtype=object)
    users = [f"u{u}" for u in range(100_000)]
    truth = {u: {item} for u, item in zip(users, names[rng.integers(0, 1000, len(users))], strict=True)}
    recs = dict(zip(users, names[rng.integers(0, 1000, (len(users), 10))], strict=True))  # rows: arrays of ids
    start = time.perf_counter()
    result = evaluate(recs, truth, n_items=1000, ks=(10,), n_boot=1000)
    # Vectorised: a few seconds on a 2-core laptop (a Python loop over resamples would take minutes).
    assert time.perf_counter() - start < 60
    low, high = result["ci95"]["hit@10"]
    assert low < result["hit@10"] < high


# --- top_k_unseen ------------------------------------------------------------------------------


def test_top_k_unseen_excludes_seen_and_is_ordered() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 200))
    seen = [rng.choice(200, rng.integers(0, 150), replace=False) for _ in range(50)]
    before = scores.copy()
    top = top_k_unseen(scores, seen, k=20)
    np.testing.assert_array_equal(scores, before)  # input untouched
    assert top.shape == (50, 20)
    assert top.dtype == np.int64
    for row, (items, excluded) in enumerate(zip(top, seen, strict=True)):
        assert not set(items) & set(excluded.tolist())
        assert np.all(np.diff(scores[row, items]) <= 0)
        allowed = np.setdiff1d(np.arange(200), excluded)
        expected = allowed[np.argsort(-scores[row, allowed], kind="stable")][:20]
        np.testing.assert_array_equal(items, expected)


def test_top_k_unseen_pads_short_rows_with_minus_one() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    top = top_k_unseen(scores, [[1, 2], []], k=3)
    np.testing.assert_array_equal(top, [[3, 0, -1], [0, 1, 2]])
    wide = top_k_unseen(scores, [[0, 1, 2, 3], [2]], k=6)  # k > n_items
    np.testing.assert_array_equal(wide, [[-1] * 6, [0, 1, 3, -1, -1, -1]])


def test_top_k_unseen_never_returns_nan_or_minus_inf_and_breaks_ties_by_index() -> None:
    scores = np.array([[np.nan, 1.0, -np.inf, 1.0, 2.0]])
    np.testing.assert_array_equal(top_k_unseen(scores, [[]], k=5), [[4, 1, 3, -1, -1]])
    with pytest.raises(ValueError, match="seen has"):
        top_k_unseen(scores, [], k=1)


# --- formatting --------------------------------------------------------------------------------


def test_format_metric() -> None:
    assert format_metric(0.41234, [0.3512, 0.4699]) == "0.412 [0.351, 0.470]"
    assert format_metric(0.5, None) == "0.500"
    assert format_metric(0.5, (0.25, 0.75), digits=2) == "0.50 [0.25, 0.75]"
