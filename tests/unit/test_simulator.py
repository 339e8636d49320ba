"""The traffic simulator's click model (pure; the HTTP loop runs in tests/integration/test_canary.py)."""

from __future__ import annotations

import random

from serving.simulator import clicks_for, window_truth


def test_users_click_what_they_really_met_more_near_the_top():
    truth = {"a", "b"}
    rng = random.Random(0)
    top = sum("a" in clicks_for(["a", "x", "y"], truth, rng) for _ in range(2000)) / 2000
    low = sum("a" in clicks_for(["x", "y", "z", "w", "v", "a"], truth, rng) for _ in range(2000)) / 2000
    noise = sum(bool(clicks_for(["x", "y", "z"], truth, rng)) for _ in range(2000)) / 2000
    assert abs(top - 0.9) < 0.03 and abs(low - 0.9 * 0.9 ** 5) < 0.04 and noise < 0.03
    assert clicks_for(["a", "x"], truth, random.Random(5)) == clicks_for(["a", "x"], truth, random.Random(5))


def test_window_truth(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("user_id,item_id,timestamp\n1,11,2020-01-02\n1,10,2020-01-01\n2,10,2020-01-01\n")
    assert window_truth(str(path)) == {"1": {"10", "11"}, "2": {"10"}}
    assert window_truth(str(path), min_items=2) == {"1": {"10", "11"}}
    assert window_truth(str(path), max_items=1) == {"1": {"10"}, "2": {"10"}}  # the first item met
