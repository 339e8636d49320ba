"""beyond_accuracy: Gini of exposure, intra-list diversity, category diversity and novelty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_tasks.evaluation.beyond_accuracy import (
    beyond_accuracy,
    category_diversity,
    gini_of_exposure,
    intra_list_diversity,
    novelty,
)

# --- gini_of_exposure ---------------------------------------------------------------------------


def test_gini_is_zero_for_even_exposure_over_the_whole_catalog() -> None:
    recs = {"u1": ["a", "b"], "u2": ["c", "d"], "u3": ["b", "a"], "u4": ["d", "c"]}
    assert gini_of_exposure(recs, n_items=4) == pytest.approx(0.0, abs=1e-12)


def test_gini_counts_unrecommended_catalog_items() -> None:
    recs = {"u1": ["a", "b"], "u2": ["b", "a"]}
    # counts (0, 0, 2, 2): G = 2 * (3*2 + 4*2) / (4*4) - 5/4 = 0.5
    assert gini_of_exposure(recs, n_items=4) == pytest.approx(0.5)


def test_gini_near_one_when_everyone_gets_the_same_single_item() -> None:
    n_items = 10_000
    recs = {f"u{i}": ["hit"] for i in range(50)}
    assert gini_of_exposure(recs, n_items=n_items) == pytest.approx((n_items - 1) / n_items)
    assert gini_of_exposure(recs, n_items=n_items) > 0.999


def test_gini_hand_example() -> None:
    # exposure (0, 0, 1, 3): sum |x_i - x_j| over ordered pairs = 20, / (2 * n^2 * mean) = 20 / 32
    recs = {"u1": ["a", "b"], "u2": ["a"], "u3": ["a"]}
    assert gini_of_exposure(recs, n_items=4) == pytest.approx(0.625)


def test_gini_cuts_lists_at_k() -> None:
    recs = {"u1": ["a", "b", "c"], "u2": ["b", "a", "c"]}
    assert gini_of_exposure(recs, n_items=2, k=2) == pytest.approx(0.0)
    assert gini_of_exposure(recs, n_items=3, k=3) == pytest.approx(0.0)
    assert gini_of_exposure(recs, n_items=3, k=1) == pytest.approx(1 / 3)  # exposure (0, 1, 1)


def test_gini_no_exposure_and_bad_arguments() -> None:
    assert gini_of_exposure({}, n_items=5) == 0.0
    assert gini_of_exposure({"u1": []}, n_items=5) == 0.0
    with pytest.raises(ValueError, match="n_items"):
        gini_of_exposure({"u1": ["a", "b", "c"]}, n_items=2)
    with pytest.raises(ValueError, match="n_items"):
        gini_of_exposure({}, n_items=0)
    with pytest.raises(ValueError, match="k"):
        gini_of_exposure({}, n_items=1, k=0)


# --- intra_list_diversity -----------------------------------------------------------------------


def test_ild_zero_for_identical_vectors() -> None:
    vectors = {"a": np.array([1.0, 2.0]), "b": np.array([2.0, 4.0]), "c": np.array([0.5, 1.0])}
    assert intra_list_diversity({"u1": ["a", "b", "c"]}, vectors) == pytest.approx(0.0, abs=1e-12)


def test_ild_one_for_orthogonal_vectors() -> None:
    ids = ["a", "b", "c"]
    assert intra_list_diversity({"u1": ids, "u2": ["c", "a"]}, (ids, np.eye(3))) == pytest.approx(1.0)


def test_ild_hand_example_and_mean_over_users() -> None:
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([-1.0, 0.0])}
    # u1: pairs (a,b)=1, (a,c)=2, (b,c)=1 -> 4/3; u2: (a,c) = 2
    recs = {"u1": ["a", "b", "c"], "u2": ["a", "c"]}
    assert intra_list_diversity(recs, vectors) == pytest.approx((4 / 3 + 2) / 2)


def test_ild_skips_items_without_vectors_and_short_lists() -> None:
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "z": np.zeros(2)}
    recs = {"u1": ["a", "x", "b"], "u2": ["a"], "u3": ["x", "y"], "u4": [], "u5": ["a", "z"], "u6": ["a", "a"]}
    assert intra_list_diversity(recs, vectors) == pytest.approx(1.0)  # only u1 qualifies
    assert math.isnan(intra_list_diversity({"u2": ["a"], "u3": ["x"]}, vectors))
    assert math.isnan(intra_list_diversity({}, vectors))


def test_ild_cuts_lists_at_k() -> None:
    ids = ["a", "b", "c"]
    vectors = (ids, np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert intra_list_diversity({"u1": ["a", "b", "c"]}, vectors, k=2) == pytest.approx(0.0, abs=1e-12)
    assert intra_list_diversity({"u1": ["a", "b", "c"]}, vectors, k=3) == pytest.approx(2 / 3)


def test_ild_rejects_bad_vectors() -> None:
    with pytest.raises(ValueError, match="matrix"):
        intra_list_diversity({}, (["a", "b"], np.eye(3)))
    with pytest.raises(ValueError, match="dimension"):
        intra_list_diversity({}, {"a": np.ones(2), "b": np.ones(3)})


# --- category_diversity -------------------------------------------------------------------------


def test_category_diversity_hand_example() -> None:
    categories = {"a": "x", "b": "x", "c": "y", "d": "z"}
    # u1: 6 pairs, 1 same-category (a, b) -> 5/6; u2: (a, b) same -> 0
    recs = {"u1": ["a", "b", "c", "d"], "u2": ["a", "b"]}
    assert category_diversity(recs, categories) == pytest.approx((5 / 6 + 0) / 2)


def test_category_diversity_skips_unknown_items_and_short_lists() -> None:
    categories = {"a": "x", "b": "y", "n": None, "e": ""}
    recs = {"u1": ["a", "q", "b", "n", "e"], "u2": ["a", "q"], "u3": []}
    assert category_diversity(recs, categories) == 1.0
    assert math.isnan(category_diversity({"u2": ["a", "q"]}, categories))
    assert math.isnan(category_diversity({}, categories))


# --- novelty ------------------------------------------------------------------------------------


def test_novelty_hand_example() -> None:
    popularity = {"a": 8, "b": 2, "c": 1}
    # u1: (-log2(8/8) - log2(2/8)) / 2 = 1; u2: c -> 3, unseen d -> log2(8) = 3
    recs = {"u1": ["a", "b"], "u2": ["c", "d"]}
    assert novelty(recs, popularity, n_users=8) == pytest.approx(2.0)


def test_novelty_clips_probabilities_and_skips_empty_lists() -> None:
    popularity = {"a": 20, "b": 0, "c": float("nan")}
    recs = {"u1": ["a"], "u2": ["b", "c"], "u3": []}
    assert novelty(recs, popularity, n_users=4) == pytest.approx((0.0 + 2.0) / 2)
    assert novelty({"u1": ["a", "b"]}, popularity, n_users=4, k=1) == pytest.approx(0.0)
    assert math.isnan(novelty({"u3": []}, popularity, n_users=4))
    with pytest.raises(ValueError, match="n_users"):
        novelty(recs, popularity, n_users=0)


# --- beyond_accuracy ----------------------------------------------------------------------------


def test_beyond_accuracy_keys_and_values() -> None:
    recs = {"u1": ["a", "b"], "u2": ["c", "a"]}
    popularity = {"a": 4, "b": 1, "c": 2}
    out = beyond_accuracy(recs, n_items=3, item_popularity=popularity, n_users=4)
    assert set(out) == {"gini@10", "novelty@10"}
    assert out["gini@10"] == pytest.approx(gini_of_exposure(recs, 3))
    assert out["novelty@10"] == pytest.approx(novelty(recs, popularity, 4))

    vectors = (["a", "b", "c"], np.eye(3))
    out = beyond_accuracy(recs, n_items=3, item_popularity=popularity, n_users=4,
                          categories={"a": "x", "b": "x", "c": "y"}, item_vectors=vectors, k=5)
    assert set(out) == {"gini@5", "novelty@5", "ild@5", "category_diversity@5"}
    assert out["ild@5"] == pytest.approx(1.0)
    assert out["category_diversity@5"] == pytest.approx(0.5)


def test_beyond_accuracy_empty_input() -> None:
    out = beyond_accuracy({}, n_items=10, item_popularity={}, n_users=1, categories={}, item_vectors={})
    assert out["gini@10"] == 0.0
    assert all(math.isnan(out[key]) for key in ("novelty@10", "ild@10", "category_diversity@10"))
