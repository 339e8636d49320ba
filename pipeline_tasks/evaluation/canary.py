"""Canary analysis: what the router's log says about the challenger against the champion, and the decision.

Reads the router's ``ab_requests`` and ``ab_feedback`` tables (:mod:`pipeline_tasks.online.feedback_log`) since a
step began. Per variant (the one that answered): requests, clicked requests (at least one click-type event on the
request's items), converted requests (a ``purchase``), the error share (challenger requests the champion had to
answer, over the requests assigned to the challenger), p99 latency through the router and coverage (distinct items
served per user: each user's first list). The challenger is compared with the champion by the two-proportion z-test of
:mod:`pipeline_tasks.evaluation.ab_test` (CTR and conversion: p-value, the lift and its 95 % CI).

:func:`decide` holds the rules (:class:`CanaryConfig`):

- ``wait``: the challenger has fewer requests than the step's sample, fixed up front from the minimum detectable
  effect (:func:`step_samples`; no peeking: the verdict is read once the sample is in);
- ``rollback``: a guardrail is breached (error share, p99 latency, coverage; checked from
  :data:`GUARDRAIL_MIN_REQUESTS` challenger requests on, so a broken challenger stops early) or, once the sample is
  in, CTR or conversion is significantly worse (two-sided p < alpha and a negative lift);
- ``advance``: the challenger holds; the next step (or, after the last one, promotion) follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.evaluation.ab_test import sample_size, two_proportion_test

CLICK_EVENTS = ("click", "add_to_cart", "purchase", "favorite")
CONVERSION_EVENTS = ("purchase",)
CHAMPION, CHALLENGER = "champion", "challenger"
GUARDRAIL_MIN_REQUESTS = 50  # guardrails may stop a step early, once this many requests went to the challenger
LATENCY_MIN_REQUESTS = 100  # per variant, before p99 latencies are compared


@dataclass(frozen=True)
class CanaryConfig:
    """The walk (shares in basis points), the test's design and the guardrails; documented defaults."""

    steps: tuple[int, ...] = (500, 2500, 5000)  # analysed shares; passing the last one promotes (100 %)
    base_ctr: float = 0.05  # the champion's expected CTR (requests with a click), for the sample size
    mde: float = 0.10  # the relative lift the test must detect
    alpha: float = 0.05
    power: float = 0.8
    max_error_share: float = 0.01  # challenger requests answered by the champion instead
    max_p99_ratio: float = 1.5  # challenger p99 latency / champion p99 latency
    p99_slack_ms: float = 10.0  # ... plus this much (tiny latencies are noisy)
    min_coverage_ratio: float = 0.5  # challenger / champion distinct items per request
    min_sample: int = 0  # a floor for each step's sample (tests use large effects and small samples)
    max_sample: int | None = None  # a cap (a demo's short steps); None: the computed sample

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s < 10_000 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps={self.steps}: use increasing shares in basis points between 1 and 9999 (the "
                             "last step's success promotes to 10000)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_samples(config: CanaryConfig) -> dict[int, int]:
    """The challenger requests each step waits for, computed once from the design (CTR's base rate and MDE)."""
    out = {}
    for share in config.steps:
        n = max(sample_size(config.base_ctr, config.mde, share / 10_000, config.alpha, config.power),
                config.min_sample)
        out[share] = min(n, config.max_sample) if config.max_sample else n
    return out


def variant_counts(requests: pd.DataFrame, feedback: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per answering variant: requests, clicked and converted requests, p99 latency, coverage, and per assigned
    variant the requests answered by the other (fallbacks).

    Coverage is distinct items per user list over the first list of each of the first ``n`` users of each variant
    (``n``: the smaller variant's user count). Per user, not per request: at a 5 % share a few users ask many times,
    and repeated lists of a few users would read as a narrow model beside the champion's many users."""
    out: dict[str, dict[str, Any]] = {}
    if requests.empty:
        return {v: {"requests": 0, "clicked": 0, "converted": 0, "p99_ms": float("nan"), "coverage": float("nan"),
                    "assigned": 0, "fallbacks": 0} for v in (CHAMPION, CHALLENGER)}
    fb = feedback if not feedback.empty else pd.DataFrame(columns=["request_id", "event_type"])
    clicked = set(fb.loc[fb["event_type"].isin(CLICK_EVENTS), "request_id"])
    converted = set(fb.loc[fb["event_type"].isin(CONVERSION_EVENTS), "request_id"])
    who = requests["user_id"] if "user_id" in requests else requests["request_id"]  # no user: one list each
    firsts = {}
    for v in (CHAMPION, CHALLENGER):
        mine = requests["variant"] == v
        firsts[v] = requests[mine][~who[mine].duplicated()]  # each user's first list from this variant
    common = int(min(len(f) for f in firsts.values()))
    for variant in (CHAMPION, CHALLENGER):
        answered = requests[requests["variant"] == variant]
        assigned = requests[requests["assigned"] == variant] if "assigned" in requests else answered
        items = {i for row in firsts[variant]["items"].iloc[:common]
                 for i in (row if isinstance(row, list | np.ndarray) else [])}
        out[variant] = {
            "requests": int(len(answered)),
            "clicked": int(answered["request_id"].isin(clicked).sum()),
            "converted": int(answered["request_id"].isin(converted).sum()),
            "p99_ms": float(np.percentile(answered["latency_ms"], 99)) if len(answered) else float("nan"),
            "coverage": len(items) / common if common else float("nan"),
            "assigned": int(len(assigned)),
            "fallbacks": int((assigned["variant"] != variant).sum()),
        }
    return out


def analyse(requests: pd.DataFrame, feedback: pd.DataFrame, config: CanaryConfig, share: int,
            needed: int) -> dict[str, Any]:
    """The step's counts, tests, guardrails and decision (``wait`` / ``rollback`` / ``advance``) with its reasons."""
    counts = variant_counts(requests, feedback)
    a, b = counts[CHAMPION], counts[CHALLENGER]
    ctr = two_proportion_test(a["clicked"], a["requests"], b["clicked"], b["requests"])
    conversion = two_proportion_test(a["converted"], a["requests"], b["converted"], b["requests"])
    error_share = b["fallbacks"] / b["assigned"] if b["assigned"] else 0.0
    # p99 of a few dozen requests is their maximum: the latency guardrail waits for LATENCY_MIN_REQUESTS per variant.
    enough = min(a["requests"], b["requests"]) >= LATENCY_MIN_REQUESTS
    p99_limit = a["p99_ms"] * config.max_p99_ratio + config.p99_slack_ms if enough else float("inf")
    coverage_ratio = b["coverage"] / a["coverage"] if a["requests"] and b["requests"] and a["coverage"] else 1.0
    guardrails = {
        "error_share": {"value": error_share, "limit": config.max_error_share,
                        "ok": error_share <= config.max_error_share},
        "p99_ms": {"value": b["p99_ms"], "limit": p99_limit, "ok": not b["p99_ms"] > p99_limit},
        "coverage_ratio": {"value": coverage_ratio, "limit": config.min_coverage_ratio,
                           "ok": coverage_ratio >= config.min_coverage_ratio},
    }
    breached = [f"guardrail {name}: {g['value']:.4g} (limit {g['limit']:.4g})" for name, g in guardrails.items()
                if not g["ok"]]
    sampled = b["requests"] >= needed
    reasons = list(breached) if b["assigned"] >= GUARDRAIL_MIN_REQUESTS or sampled else []
    if sampled:  # the primary metrics are read once, when the step's sample is in (no peeking)
        for name, test in (("CTR", ctr), ("conversion", conversion)):
            if test.significant(config.alpha) and test.difference < 0:
                reasons.append(f"{name} significantly worse: {test.rate_b:.4f} vs {test.rate_a:.4f} (lift "
                               f"{test.lift:+.1%}, 95 % CI [{test.lift_ci[0]:+.1%}, {test.lift_ci[1]:+.1%}], "
                               f"p={test.p_value:.2g})")
    decision = "rollback" if reasons else ("advance" if sampled else "wait")
    return {"share_bp": share, "needed": needed, "decision": decision, "reasons": reasons, "counts": counts,
            "ctr": ctr.to_dict(), "conversion": conversion.to_dict(), "guardrails": guardrails}


def since(frame: pd.DataFrame, started: pd.Timestamp, column: str = "logged_at") -> pd.DataFrame:
    """Rows logged at or after ``started`` (``logged_at``: the append time, UTC)."""
    if frame.empty or column not in frame:
        return frame
    stamps = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame[stamps >= started]


def steps_summary(history: Sequence[dict[str, Any]]) -> str:
    """One line per analysed step, for task logs and the CLI."""
    lines = []
    for step in history:
        b = step["counts"][CHALLENGER]
        a = step["counts"][CHAMPION]
        lines.append(f"{step['share_bp'] / 100:g} %: {step['decision']} -- challenger CTR {step['ctr']['rate_b']:.4f} "
                     f"({b['requests']} requests) vs champion {step['ctr']['rate_a']:.4f} ({a['requests']}), lift "
                     f"{step['ctr']['lift']:+.1%} p={step['ctr']['p_value']:.2g}" +
                     (f"; {'; '.join(step['reasons'])}" if step["reasons"] else ""))
    return "\n".join(lines)
