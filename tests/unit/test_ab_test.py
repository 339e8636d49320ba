"""The canary's A/B statistics against textbook values."""

import math

import pytest

from pipeline_tasks.evaluation.ab_test import sample_size, two_proportion_test


def test_textbook_two_proportion_example() -> None:
    t = two_proportion_test(3000, 100_000, 3300, 100_000)
    assert t.z == pytest.approx(3.84, abs=0.01)
    assert 0.0001 <= t.p_value <= 0.0002
    assert t.significant()
    assert t.difference == pytest.approx(0.003)
    assert t.difference_ci[0] == pytest.approx(0.00147, abs=1e-5)
    assert t.difference_ci[1] == pytest.approx(0.00453, abs=1e-5)
    assert t.lift == pytest.approx(0.10)
    assert t.lift_ci[0] < 0.10 < t.lift_ci[1]
    assert t.lift_ci[0] > 0  # significant: the lift's interval excludes 0


def test_no_difference_and_degenerate_counts() -> None:
    same = two_proportion_test(50, 1000, 50, 1000)
    assert same.z == 0 and same.p_value == pytest.approx(1.0) and not same.significant()
    zero = two_proportion_test(0, 1000, 0, 1000)
    assert zero.p_value == 1.0 and math.isnan(zero.lift)
    empty = two_proportion_test(10, 100, 0, 0)
    assert math.isnan(empty.p_value) and math.isnan(empty.rate_b) and not empty.significant()


def test_the_test_is_symmetric() -> None:
    ab, ba = two_proportion_test(120, 4000, 90, 3800), two_proportion_test(90, 3800, 120, 4000)
    assert ab.p_value == pytest.approx(ba.p_value)
    assert ab.z == pytest.approx(-ba.z)


@pytest.mark.parametrize("args", [(5, 4, 1, 10), (-1, 10, 1, 10), (1, 10, 11, 10)])
def test_impossible_counts_are_refused(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="successes"):
        two_proportion_test(*args)


def test_sample_size_matches_the_textbook_formula() -> None:
    # 3 % base rate, 10 % relative lift, 50/50, alpha 0.05, power 0.8: about 53,000 per arm.
    assert 52_500 <= sample_size(0.03, 0.10) <= 53_500
    # A 5 % treatment share needs fewer treatment trials (its control is 19 times larger) but more in total.
    small = sample_size(0.03, 0.10, share=0.05)
    assert small < sample_size(0.03, 0.10)
    assert small / 0.05 > 2 * sample_size(0.03, 0.10)
    # A larger effect needs fewer trials; more power needs more.
    assert sample_size(0.03, 0.5) < sample_size(0.03, 0.1) < sample_size(0.03, 0.1, power=0.9)


def test_sample_size_refuses_meaningless_inputs() -> None:
    with pytest.raises(ValueError, match="mde"):
        sample_size(0.5, 1.0)
    with pytest.raises(ValueError, match="share"):
        sample_size(0.03, 0.1, share=1.0)
    with pytest.raises(ValueError, match="base_rate"):
        sample_size(0.0, 0.1)
