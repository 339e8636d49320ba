"""Sticky canary assignment."""

import math

import pytest

from pipeline_tasks.online.routing import CHALLENGER, CHAMPION, bucket, variant_of

USERS = [f"u{i}" for i in range(40_000)]


def test_assignment_is_sticky_and_stable_across_processes() -> None:
    first = [variant_of("salt-1", u, 500) for u in USERS[:1000]]
    assert first == [variant_of("salt-1", u, 500) for u in USERS[:1000]]
    # A fixed value: Python's hash() is salted per process, the assignment must not be.
    assert bucket("salt-1", "u0") == bucket("salt-1", "u0") and 0 <= bucket("salt-1", "u0") < 10_000


@pytest.mark.parametrize("bp", [500, 2500, 5000])
def test_observed_share_is_within_tolerance_of_the_configured_one(bp: int) -> None:
    share = bp / 10_000
    observed = sum(variant_of("s", u, bp) == CHALLENGER for u in USERS) / len(USERS)
    tolerance = 4 * math.sqrt(share * (1 - share) / len(USERS))  # four standard errors
    assert abs(observed - share) < tolerance


def test_raising_the_share_keeps_challenger_users_and_a_new_salt_reshuffles() -> None:
    at5 = {u for u in USERS if variant_of("s", u, 500) == CHALLENGER}
    at25 = {u for u in USERS if variant_of("s", u, 2500) == CHALLENGER}
    assert at5 <= at25
    other = {u for u in USERS if variant_of("t", u, 500) == CHALLENGER}
    assert len(at5 & other) < 0.2 * len(at5)
    assert all(variant_of("s", u, 0) == CHAMPION for u in USERS[:100])
    assert all(variant_of("s", u, 10_000) == CHALLENGER for u in USERS[:100])


def test_out_of_range_share_is_refused() -> None:
    with pytest.raises(ValueError, match="canary_bp"):
        variant_of("s", "u", 10_001)
