"""rules: the business rules shared by offline evaluation and serving (pure numpy/pandas)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.online.rules import (
    CATEGORY_CAP_TOP,
    FRESHNESS_DAYS,
    FRESHNESS_WEIGHT,
    MAX_PER_CATEGORY,
    UNKNOWN_CATEGORY,
    apply_rules,
    cap_per_category,
    dedup,
    freshness_boost,
    positive_score,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_constants() -> None:
    assert (MAX_PER_CATEGORY, CATEGORY_CAP_TOP, FRESHNESS_WEIGHT, FRESHNESS_DAYS) == (3, 10, 0.1, 30.0)
    assert UNKNOWN_CATEGORY == "unknown"


# --- positive_score ---------------------------------------------------------------------------


def test_positive_score_is_the_sigmoid() -> None:
    x = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(positive_score(x), [_sigmoid(v) for v in x])


def test_positive_score_is_stable_for_large_magnitudes() -> None:
    x = np.array([-1e4, -800.0, -50.0, 50.0, 800.0, 1e4, -np.inf, np.inf])
    with np.errstate(over="raise", invalid="raise"):  # no overflow warning either
        out = positive_score(x)
    assert np.isfinite(out).all()
    assert (out > 0).all() and (out <= 1).all()
    assert np.all(np.diff(out[:6]) >= 0)
    assert out[2] == pytest.approx(math.exp(-50.0), rel=1e-12)


def test_positive_score_keeps_shape_and_propagates_nan() -> None:
    out = positive_score(np.array([[0.0, np.nan]]))
    assert out.shape == (1, 2)
    assert out[0, 0] == 0.5 and np.isnan(out[0, 1])


# --- freshness_boost --------------------------------------------------------------------------


def test_freshness_formula() -> None:
    scores = np.array([0.7, 0.7, -1.2, 2.0])
    out = freshness_boost(scores, np.array([0.0, 30.0, 0.0, 60.0]))
    s = positive_score(scores)
    np.testing.assert_allclose(out, [s[0] * 1.1, s[1] * (1 + 0.1 / math.e), s[2] * 1.1, s[3] * (1 + 0.1 * math.e**-2)])


def test_freshness_custom_weight_and_days() -> None:
    out = freshness_boost(np.array([0.0]), np.array([10.0]), weight=0.5, days=10.0)
    assert out[0] == pytest.approx(0.5 * (1 + 0.5 / math.e))


def test_freshness_negative_scores_are_positive_and_keep_order() -> None:
    scores = np.array([-0.1, -2.0, -5.0, -40.0, -900.0])
    out = freshness_boost(scores, np.full(5, 7.0))
    assert (out > 0).all()
    assert np.all(np.diff(out) < 0)


def test_freshness_unknown_age_gets_no_boost() -> None:
    scores = np.array([1.0, 1.0, 1.0])
    out = freshness_boost(scores, np.array([np.nan, np.inf, 0.0]))
    s = _sigmoid(1.0)
    np.testing.assert_allclose(out, [s, s, s * 1.1])


def test_freshness_accepts_none_ages_from_a_list() -> None:
    out = freshness_boost(np.array([0.0, 0.0]), [None, 0.0])
    np.testing.assert_allclose(out, [0.5, 0.55])


def test_freshness_negative_age_is_clipped_to_zero() -> None:
    out = freshness_boost(np.array([0.3, 0.3]), np.array([-5.0, 0.0]))
    assert out[0] == out[1] == pytest.approx(_sigmoid(0.3) * 1.1)


def test_freshness_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="age_days"):
        freshness_boost(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="weight"):
        freshness_boost(np.zeros(1), np.zeros(1), weight=-0.1)
    with pytest.raises(ValueError, match="days"):
        freshness_boost(np.zeros(1), np.zeros(1), days=0.0)


# --- dedup --------------------------------------------------------------------------------------


def test_dedup_keeps_first_occurrences_in_order() -> None:
    assert dedup(["a", "b", "a", "c", "b", "d"]) == [0, 1, 3, 5]
    assert dedup(["a", "b", "c"]) == [0, 1, 2]
    assert dedup(["x", "x", "x"]) == [0]
    assert dedup([]) == []


# --- cap_per_category ---------------------------------------------------------------------------


def _check_permutation(order: list[int], n: int) -> None:
    assert sorted(order) == list(range(n))


def test_cap_many_items_of_one_category() -> None:
    cats = ["a"] * 12 + ["b", "c", "d", "e", "f", "g", "h"]
    ids = [f"i{p}" for p in range(len(cats))]
    order = cap_per_category(ids, cats)
    _check_permutation(order, len(ids))
    top = Counter(cats[p] for p in order[:10])
    assert max(top.values()) <= 3
    assert top["a"] == 3
    # The capped picks in list order, then everything else in its original order.
    assert order[:10] == [0, 1, 2, 12, 13, 14, 15, 16, 17, 18]
    assert order[10:] == list(range(3, 12))


def test_cap_is_identity_when_nothing_is_over_the_cap() -> None:
    cats = ["a", "b", "a", "c", "a", "b", "d", "e", "f", "g", "a", "a"]
    assert cap_per_category([str(p) for p in range(12)], cats) == list(range(12))


def test_cap_after_top_keeps_original_relative_order() -> None:
    cats = ["a", "a", "a", "a", "b", "a", "b", "c"]
    order = cap_per_category([str(p) for p in range(8)], cats, max_per_category=2, top=4)
    assert order == [0, 1, 4, 6, 2, 3, 5, 7]


def test_cap_with_too_few_categories_still_fills_the_top() -> None:
    cats = ["a"] * 8 + ["b"] * 4
    order = cap_per_category([str(p) for p in range(12)], cats)
    _check_permutation(order, 12)
    # 3 a's and 3 b's under the cap, then the best skipped items (a's 3..6) fill the top.
    assert order[:10] == [0, 1, 2, 8, 9, 10, 3, 4, 5, 6]
    assert order[10:] == [7, 11]


def test_cap_single_category_shorter_than_top() -> None:
    order = cap_per_category(list("abcde"), ["x"] * 5)
    assert order == [0, 1, 2, 3, 4]


def test_null_categories_are_one_unknown_category() -> None:
    cats = [None, np.nan, "", "  ", pd.NA, "unknown", "a", "b"]
    order = cap_per_category([str(p) for p in range(8)], cats, max_per_category=3, top=5)
    _check_permutation(order, 8)
    assert order[:5] == [0, 1, 2, 6, 7]
    assert order[5:] == [3, 4, 5]


def test_cap_with_top_zero_and_empty_input() -> None:
    assert cap_per_category(list("abc"), ["x"] * 3, top=0) == [0, 1, 2]
    assert cap_per_category([], []) == []


def test_cap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="categories"):
        cap_per_category(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="max_per_category"):
        cap_per_category(["a"], ["x"], max_per_category=0)
    with pytest.raises(ValueError, match="top"):
        cap_per_category(["a"], ["x"], top=-1)


# --- apply_rules --------------------------------------------------------------------------------


def test_apply_rules_end_to_end() -> None:
    ids = ["a", "b", "c", "b", "d", "e", "f", "g"]
    scores = np.array([0.1, 0.5, 2.0, 3.0, -1.0, 1.5, 1.4, 1.3])
    cats = ["x", "y", "x", "x", "z", "x", "x", "y"]
    age = np.array([0.0, 10.0, np.nan, 100.0, 0.0, 5.0, 400.0, 0.0])
    out_ids, out_scores = apply_rules(ids, scores, cats, age, max_per_category=2, top=4, transform="sigmoid")
    # b keeps its second occurrence (raw 3.0, category x, age 100).
    final = {
        "b": _sigmoid(3.0) * (1 + 0.1 * math.exp(-100 / 30)),
        "c": _sigmoid(2.0),
        "e": _sigmoid(1.5) * (1 + 0.1 * math.exp(-5 / 30)),
        "f": _sigmoid(1.4) * (1 + 0.1 * math.exp(-400 / 30)),
        "g": _sigmoid(1.3) * 1.1,
        "a": _sigmoid(0.1) * 1.1,
        "d": _sigmoid(-1.0) * 1.1,
    }
    by_score = sorted(final, key=final.__getitem__, reverse=True)
    assert by_score == ["b", "e", "c", "g", "f", "a", "d"]  # e's boost lifts it over c
    # Top 4 with at most 2 per category: b, e (x full: c, f, a skipped), g (y), d (z); then c, f, a.
    assert out_ids == ["b", "e", "g", "d", "c", "f", "a"]
    np.testing.assert_allclose(out_scores, [final[i] for i in out_ids])
    assert out_scores.dtype == np.float64


def test_apply_rules_without_cap_is_sorted_by_final_score() -> None:
    ids = ["a", "b", "c", "d"]
    out_ids, out_scores = apply_rules(ids, np.array([-3.0, 1.0, -0.5, 1.0]), ["x"] * 4,
                                      np.array([0.0, 60.0, 0.0, 0.0]), cap=False)
    assert out_ids == ["d", "b", "c", "a"]
    assert np.all(np.diff(out_scores) <= 0) and (out_scores > 0).all()


def test_apply_rules_without_freshness_uses_positive_score() -> None:
    out_ids, out_scores = apply_rules(["a", "b"], np.array([0.0, 1.0]), None, None, freshness=False,
                                      transform="sigmoid")
    assert out_ids == ["b", "a"]
    np.testing.assert_allclose(out_scores, [_sigmoid(1.0), 0.5])


def test_relative_transform_keeps_score_gaps_whatever_the_offset() -> None:
    """The default transform: a 10 % boost equals a raw gap of ln 1.1, at any score level (no saturation)."""
    for offset in (-50.0, 0.0, 40.0):  # the sigmoid saturates at +40: every item would be ~1.0 there
        raw = np.array([1.0, 0.92, 0.5]) + offset  # b trails a by 0.08 < ln 1.1: the boost lifts it
        out_ids, out_scores = apply_rules(["a", "b", "c"], raw, ["x", "y", "z"], np.array([np.nan, 0.0, np.nan]))
        assert out_ids == ["b", "a", "c"], offset
        np.testing.assert_allclose(out_scores, [np.exp(-0.08) * 1.1, 1.0, np.exp(-0.5)])
        raw = np.array([1.0, 0.85, 0.5]) + offset  # trails by 0.15 > ln 1.1: stays behind
        assert apply_rules(["a", "b", "c"], raw, ["x", "y", "z"], np.array([np.nan, 0.0, np.nan]))[0] == [
            "a", "b", "c"]


def test_apply_rules_ties_keep_input_order() -> None:
    ids = ["c", "a", "d", "b"]
    out_ids, _ = apply_rules(ids, np.zeros(4), ["x", "y", "z", "w"], np.full(4, np.nan))
    assert out_ids == ids


def test_apply_rules_dedup_keeps_the_highest_scored_occurrence() -> None:
    ids = ["a", "b", "a", "a"]
    out_ids, out_scores = apply_rules(ids, np.array([0.0, 0.5, 2.0, 1.0]), ["x", "y", "z", "w"],
                                      np.full(4, np.nan), cap=False)
    assert out_ids == ["a", "b"]
    np.testing.assert_allclose(out_scores, [1.0, np.exp(0.5 - 2.0)])  # relative to the kept best (2.0)


def test_apply_rules_default_cap() -> None:
    cats = ["a"] * 15 + list("bcdefgh")
    n = len(cats)
    ids = [f"i{p}" for p in range(n)]
    out_ids, out_scores = apply_rules(ids, np.linspace(5.0, -5.0, n), cats, np.full(n, 3.0))
    assert sorted(out_ids) == sorted(ids) and len(out_scores) == n
    assert out_ids[:CATEGORY_CAP_TOP] == ["i0", "i1", "i2", *(f"i{p}" for p in range(15, 22))]
    assert out_ids[CATEGORY_CAP_TOP:] == [f"i{p}" for p in range(3, 15)]


def test_apply_rules_too_few_categories_keeps_the_top_full() -> None:
    cats = ["a"] * 15 + ["b"] * 5
    n = len(cats)
    ids = [f"i{p}" for p in range(n)]
    out_ids, _ = apply_rules(ids, np.linspace(5.0, -5.0, n), cats, np.full(n, 3.0))
    # 3 a's and 3 b's under the cap, then the best skipped items (a's) fill the top 10.
    assert out_ids[:10] == ["i0", "i1", "i2", "i15", "i16", "i17", "i3", "i4", "i5", "i6"]
    assert len(out_ids) == n


def test_apply_rules_empty() -> None:
    out_ids, out_scores = apply_rules([], np.array([]), [], np.array([]))
    assert out_ids == [] and out_scores.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scores": np.zeros(2)}, "scores"),
        ({"categories": ["x"] * 4}, "categories"),
        ({"age_days": np.zeros(2)}, "age_days"),
    ],
)
def test_apply_rules_validates_lengths(kwargs: dict, name: str) -> None:
    args = {"item_ids": ["a", "b", "c"], "scores": np.zeros(3), "categories": ["x"] * 3, "age_days": np.zeros(3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        apply_rules(**args)


def test_apply_rules_rejects_nan_and_2d_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        apply_rules(["a", "b"], np.array([0.0, np.nan]), None, None)
    with pytest.raises(ValueError, match="one-dimensional"):
        apply_rules(["a", "b"], np.zeros((2, 1)), None, None)
