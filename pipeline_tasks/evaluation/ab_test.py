"""A/B statistics of a canary: two-proportion z-test, the lift's confidence interval and the sample a step needs.

Pure functions over counts (successes and trials per variant), so the canary DAG, the operator commands and the
tests compute the same numbers. ``a`` is the control (the champion), ``b`` the treatment (the challenger).

- :func:`two_proportion_test`: the pooled two-sided z-test of ``p_b == p_a``, the absolute difference with its
  unpooled Wald interval and the relative lift ``p_b / p_a - 1`` with a delta-method interval on the log ratio.
- :func:`sample_size`: the treatment's trials needed to detect a relative lift ``mde`` of a base rate with the
  given significance and power when the treatment takes ``share`` of the traffic (the control gets the rest),
  fixed up front so a step waits for its sample and decides once (no peeking).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy.stats import norm


@dataclass(frozen=True)
class ProportionTest:
    """The outcome of :func:`two_proportion_test` (rates, difference, lift, z and p; intervals at ``level``)."""

    successes_a: int
    trials_a: int
    successes_b: int
    trials_b: int
    rate_a: float
    rate_b: float
    difference: float  # rate_b - rate_a
    difference_ci: tuple[float, float]
    lift: float  # rate_b / rate_a - 1 (NaN when rate_a is 0)
    lift_ci: tuple[float, float]
    z: float
    p_value: float  # two-sided
    level: float

    def significant(self, alpha: float | None = None) -> bool:
        """Whether the p-value is below ``alpha`` (default: ``1 - level``)."""
        return self.p_value < (1.0 - self.level if alpha is None else alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_counts(successes: int, trials: int, name: str) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"variant {name}: {successes} successes of {trials} trials; need 0 <= successes <= trials")


def two_proportion_test(successes_a: int, trials_a: int, successes_b: int, trials_b: int,
                        level: float = 0.95) -> ProportionTest:
    """Two-sided pooled z-test of two proportions, with the difference's and the relative lift's intervals.

    A variant without trials gives NaN statistics (no evidence either way), never an exception.
    """
    _check_counts(successes_a, trials_a, "a")
    _check_counts(successes_b, trials_b, "b")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: use a confidence level in (0, 1), e.g. 0.95")
    nan = float("nan")
    rate_a = successes_a / trials_a if trials_a else nan
    rate_b = successes_b / trials_b if trials_b else nan
    z_crit = float(norm.ppf(0.5 + level / 2))
    z = p_value = nan
    diff_ci = lift_ci = (nan, nan)
    lift = rate_b / rate_a - 1.0 if trials_a and trials_b and rate_a > 0 else nan
    if trials_a and trials_b:
        pooled = (successes_a + successes_b) / (trials_a + trials_b)
        se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
        if se_pooled > 0:
            z = (rate_b - rate_a) / se_pooled
            p_value = float(2 * norm.sf(abs(z)))
        else:  # both rates 0 or both 1: no difference can be seen
            z, p_value = 0.0, 1.0
        se = math.sqrt(rate_a * (1 - rate_a) / trials_a + rate_b * (1 - rate_b) / trials_b)
        diff_ci = (rate_b - rate_a - z_crit * se, rate_b - rate_a + z_crit * se)
        if successes_a and successes_b:  # the log ratio's delta-method standard error
            se_log = math.sqrt(1 / successes_a - 1 / trials_a + 1 / successes_b - 1 / trials_b)
            log_ratio = math.log(rate_b / rate_a)
            lift_ci = (math.exp(log_ratio - z_crit * se_log) - 1, math.exp(log_ratio + z_crit * se_log) - 1)
    return ProportionTest(successes_a, trials_a, successes_b, trials_b, rate_a, rate_b,
                          rate_b - rate_a, diff_ci, lift, lift_ci, z, p_value, level)


def sample_size(base_rate: float, mde: float, share: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> int:
    """Trials the treatment needs to detect a relative lift ``mde`` of ``base_rate`` (two-sided ``alpha``,
    ``power``) when it takes ``share`` of the traffic and the control the rest.

    The control's trials are ``n * (1 - share) / share``; the total is ``n / share``.
    """
    if not 0.0 < base_rate < 1.0:
        raise ValueError(f"base_rate={base_rate}: use a rate in (0, 1)")
    treated = base_rate * (1 + mde)
    if mde == 0 or not 0.0 < treated < 1.0:
        raise ValueError(f"mde={mde}: the treated rate {treated:.4g} must differ from the base rate and lie in (0, 1)")
    if not 0.0 < share < 1.0:
        raise ValueError(f"share={share}: use the treatment's traffic share in (0, 1)")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha={alpha}, power={power}: both must lie in (0, 1)")
    ratio = (1 - share) / share  # control trials per treatment trial
    pooled = (base_rate * ratio + treated) / (1 + ratio)
    z_a, z_b = float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))
    numerator = (z_a * math.sqrt(pooled * (1 - pooled) * (1 + 1 / ratio))
                 + z_b * math.sqrt(treated * (1 - treated) + base_rate * (1 - base_rate) / ratio)) ** 2
    return math.ceil(numerator / (treated - base_rate) ** 2)
