"""Canary decisions from router-log frames (pure logic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.evaluation.canary import CanaryConfig, analyse, since, step_samples


def _log(n_a: int, ctr_a: float, n_b: int, ctr_b: float, seed: int = 0, fallbacks: int = 0,
         latency_b: float = 20.0, items_b: int = 50) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, fb = [], []
    for variant, n, ctr, lat, pool in (("champion", n_a, ctr_a, 20.0, 50), ("challenger", n_b, ctr_b, latency_b,
                                                                           items_b)):
        for i in range(n):
            rid = f"{variant}-{i}"
            rows.append({"request_id": rid, "variant": variant, "assigned": variant, "latency_ms": lat,
                         "items": [f"i{rng.integers(pool)}" for _ in range(5)]})
            if rng.random() < ctr:
                fb.append({"request_id": rid, "event_type": "click"})
    for i in range(fallbacks):  # assigned to the challenger, answered by the champion
        rows.append({"request_id": f"fb-{i}", "variant": "champion", "assigned": "challenger", "latency_ms": 20.0,
                     "items": ["i1"]})
    return pd.DataFrame(rows), pd.DataFrame(fb)


def test_step_samples_are_fixed_up_front():
    samples = step_samples(CanaryConfig())  # challenger requests per step: CTR 5 %, 10 % MDE
    assert list(samples) == [500, 2500, 5000]
    assert 0 < samples[500] < samples[2500] < samples[5000]  # a small arm beside a large control needs fewer ...
    assert samples[500] / 0.05 > samples[2500] / 0.25 > samples[5000] / 0.5  # ... but waits for more traffic
    assert step_samples(CanaryConfig(max_sample=300))[500] == 300
    with pytest.raises(ValueError, match="steps"):
        CanaryConfig(steps=(2500, 500))


def test_worse_challenger_is_rolled_back_better_one_advances_and_small_samples_wait():
    cfg = CanaryConfig()
    worse = analyse(*_log(4000, 0.30, 1000, 0.10), cfg, share=2000, needed=800)
    assert worse["decision"] == "rollback" and "CTR significantly worse" in worse["reasons"][0]
    better = analyse(*_log(4000, 0.10, 1000, 0.30), cfg, share=2000, needed=800)
    assert better["decision"] == "advance" and not better["reasons"]
    assert better["ctr"]["lift"] > 1.0 and better["ctr"]["lift_ci"][0] > 0
    early = analyse(*_log(4000, 0.30, 300, 0.10), cfg, share=2000, needed=800)
    assert early["decision"] == "wait"  # significantly worse already, but the sample is not in: no peeking


def test_guardrails_stop_a_step_early():
    cfg = CanaryConfig()
    broken = analyse(*_log(1000, 0.2, 100, 0.2, fallbacks=20), cfg, share=500, needed=5000)
    assert broken["decision"] == "rollback" and "error_share" in broken["reasons"][0]
    slow = analyse(*_log(1000, 0.2, 100, 0.2, latency_b=500.0), cfg, share=500, needed=5000)
    assert slow["decision"] == "rollback" and "p99_ms" in slow["reasons"][0]
    narrow = analyse(*_log(1000, 0.2, 1000, 0.2, items_b=2), cfg, share=500, needed=500)
    assert narrow["decision"] == "rollback" and "coverage_ratio" in narrow["reasons"][0]


def test_since_keeps_the_step_rows():
    frame = pd.DataFrame({"logged_at": ["2026-01-01T00:00:00+00:00", "2026-01-01T00:01:00+00:00"], "x": [1, 2]})
    assert since(frame, pd.Timestamp("2026-01-01T00:00:30Z"))["x"].tolist() == [2]


def test_coverage_counts_users_not_repeated_requests():
    """At a small share a few users ask many times: their repeated lists are not a narrow model."""
    rng = np.random.default_rng(1)
    rows = []
    for variant, users, n in (("champion", 150, 1900), ("challenger", 8, 100)):
        lists = {u: [f"i{x}" for x in rng.choice(1000, 10, replace=False)] for u in range(users)}
        for i in range(n):
            u = int(rng.integers(users))
            rows.append({"request_id": f"{variant}-{i}", "user_id": f"{variant}-u{u}", "variant": variant,
                         "assigned": variant, "latency_ms": 20.0, "items": lists[u]})
    few_users = analyse(pd.DataFrame(rows), pd.DataFrame(columns=["request_id", "event_type"]), CanaryConfig(),
                        share=500, needed=100)
    assert few_users["guardrails"]["coverage_ratio"]["ok"], few_users["guardrails"]
    assert few_users["guardrails"]["coverage_ratio"]["value"] > 0.9  # 10 distinct items per list on both sides
