"""The validate stage's gate: which rule failed, and which setting addresses it.

Two rules: the accepted share of interactions must reach ``quality_threshold``, and the share of
accepted interactions naming an item (or, with a users table, a user) that its table lacks must
not exceed ``max_stub_share``. A failed gate's message names the top reason and the one setting
that would keep those rows, with the value to give it where the data tells it.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline_tasks.core.constants import EVENT_TYPE, ROW_ID, TIMESTAMP, USER_DAY_EVENTS

# Where a user changes each setting (the same names in the DAG's params, `recsys run` and the environment).
SETTING_PLACES: dict[str, str] = {
    "quality_threshold": "DAG param `quality_threshold`, CLI `--quality-threshold`, env `RECSYS_QUALITY_THRESHOLD`",
    "horizon_days": "DAG param `horizon_days`, CLI `--horizon-days`, env `RECSYS_HORIZON_DAYS`",
    "as_of": "DAG param `as_of`, CLI `--as-of`",
    "bot_events_per_day": "DAG param `bot_events_per_day`, CLI `--bot-events-per-day`, env "
                          "`RECSYS_BOT_EVENTS_PER_DAY`",
    "event_types": "env `RECSYS_EVENT_TYPES`",
    "max_stub_share": "DAG param `max_stub_share`, CLI `--max-stub-share`, env `RECSYS_MAX_STUB_SHARE`",
}
# The setting that keeps the rows of each reason (every other reason is a fault of the source data).
REASON_SETTING: dict[str, str] = {
    "too_old_timestamp": "horizon_days",
    "future_timestamp": "as_of",
    "bot": "bot_events_per_day",
    "unknown_event_type": "event_types",
    "stubbed_items": "max_stub_share",
    "stubbed_users": "max_stub_share",
}
FIRST_IDS = 5  # ids named in messages and the report
ARTICLE = {"items": "an item", "users": "a user"}


def reason_details(frame: pd.DataFrame, results: list[dict[str, Any]], horizon_anchor: pd.Timestamp,
                   horizon_days: int) -> dict[str, dict[str, Any]]:
    """What the data says about the reasons a setting can fix: the oldest too-old event and the
    horizon that keeps it, the newest future event, the busiest bot day, the unknown event types."""
    flagged = {r["reason"]: frame[frame[ROW_ID].isin(r["row_ids"])] for r in results if len(r["row_ids"])}
    out: dict[str, dict[str, Any]] = {}
    if "too_old_timestamp" in flagged:
        oldest = flagged["too_old_timestamp"][TIMESTAMP].min()
        days = math.ceil((horizon_anchor - oldest) / pd.Timedelta(days=1))
        out["too_old_timestamp"] = {"oldest": oldest.isoformat(), "horizon_anchor": horizon_anchor.isoformat(),
                                    "horizon_days": horizon_days, "horizon_days_to_keep": int(days)}
    if "future_timestamp" in flagged:
        out["future_timestamp"] = {"newest": flagged["future_timestamp"][TIMESTAMP].max().isoformat()}
    if "bot" in flagged:
        out["bot"] = {"busiest_user_day_events": int(flagged["bot"][USER_DAY_EVENTS].max())}
    if "unknown_event_type" in flagged:
        values = flagged["unknown_event_type"][EVENT_TYPE].value_counts().index[:FIRST_IDS]
        out["unknown_event_type"] = {"values": [str(v) for v in values]}
    return out


def _ids(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:FIRST_IDS])


def fix_for(reason: str, report: dict[str, Any]) -> str:
    """One sentence: the setting that keeps the rows of ``reason`` and the value to give it, or, for a
    fault of the source data, to fix the source or lower ``quality_threshold``."""
    details = report.get("reason_details", {}).get(reason, {})
    params = report.get("parameters", {})
    if reason == "too_old_timestamp" and details:
        days = details["horizon_days_to_keep"]
        return (f"To keep the too_old_timestamp rows, raise horizon_days from {details['horizon_days']} to {days} "
                f"(the data reaches {days} days "
                f"back from {details['horizon_anchor'][:10]}; {SETTING_PLACES['horizon_days']}).")
    if reason == "future_timestamp" and details:
        return (f"If the future_timestamp rows are real events, set as_of to {details['newest']} or later "
                f"({SETTING_PLACES['as_of']}); otherwise correct the source's clock.")
    if reason == "bot" and details:
        return (f"If the bot users are real (shared or service accounts), raise bot_events_per_day from "
                f"{params.get('bot_events_per_day')} to {details['busiest_user_day_events']} "
                f"({SETTING_PLACES['bot_events_per_day']}).")
    if reason == "unknown_event_type" and details:
        known = ",".join(params.get("event_types", []))
        return (f"If {', '.join(details['values'])} are real event types, add them to the event types "
                f"({SETTING_PLACES['event_types']}, now {known}).")
    if reason in ("stubbed_items", "stubbed_users"):
        kind = reason.removeprefix("stubbed_")
        share = report["stubs"][kind]["share"]
        return (f"Add the missing rows to the {kind} table, or, if it is known to lag the events, raise "
                f"max_stub_share to {math.ceil(share * 1000) / 1000} ({SETTING_PLACES['max_stub_share']}).")
    return (f"Fix the source data, or lower quality_threshold ({SETTING_PLACES['quality_threshold']}) if this "
            "share of bad rows is expected.")


def gate_failures(report: dict[str, Any]) -> list[str]:
    """The failed rules: ``quality_threshold``, ``stubbed_items``, ``stubbed_users`` (empty = passed)."""
    failed = [] if report["quality_rate"] >= report["quality_threshold"] else ["quality_threshold"]
    return failed + [f"stubbed_{kind}" for kind in ("items", "users") if not report["stubs"][kind]["passed"]]


def _quality_clause(report: dict[str, Any]) -> str:
    t = report["tables"]["interactions"]
    top = sorted(t["reasons"].items(), key=lambda kv: -kv[1])[:5]
    reasons = ", ".join(f"{k}: {v:,}" for k, v in top) or "none"
    fix = fix_for(top[0][0], report) if top else fix_for("", report)
    return (f"{t['accepted']:,} of {t['input']:,} interactions accepted ({report['quality_rate']:.1%}), below the "
            f"threshold {report['quality_threshold']:.1%}. Top reasons: {reasons}. {fix}")


def _stub_clause(report: dict[str, Any], kind: str) -> str:
    s, n = report["stubs"][kind], report["tables"]["interactions"]["accepted"]
    return (f"{s['interactions']:,} of {n:,} accepted interactions ({s['share']:.1%}) name {ARTICLE[kind]} missing "
            f"from the {kind} table ({s['stubbed']:,} {kind}, first: {_ids(s['first_ids'])}), above "
            f"max_stub_share {report['stubs']['max_stub_share']:.1%}. {fix_for(f'stubbed_{kind}', report)}")


def gate_message(report: dict[str, Any], quarantine_dir: str, docs: str | None) -> str:
    """A failed gate's message: each failed rule with its numbers and the setting that addresses it,
    then where to look."""
    clauses = [_quality_clause(report) if f == "quality_threshold" else _stub_clause(report, f.removeprefix(
        "stubbed_")) for f in gate_failures(report)]
    return (f"Data quality gate failed: {' Also: '.join(clauses)} "
            f"Quarantined rows: {quarantine_dir}; Data Docs: {docs}.")
