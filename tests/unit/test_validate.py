"""Validation: one negative test per fault class and per contract rule, through the real GX suites."""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline_tasks.core.constants import DEFAULT_MAX_STUB_SHARE
from pipeline_tasks.core.errors import InvalidParamsError, PermanentError
from pipeline_tasks.data.contract import ContractTables, normalise_interactions, normalise_items, normalise_users
from pipeline_tasks.data.quality_gate import gate_message
from pipeline_tasks.data.validate import (
    DataQualityError,
    ValidationConfig,
    detect_spikes,
    resolve_as_of,
    validate_contract_dir,
    validate_tables,
)

NOW = datetime(2025, 6, 1, tzinfo=UTC)
BASE = pd.Timestamp("2025-03-01T12:00:00Z")


def rows(n: int = 20, **overrides) -> list[dict]:
    """n clean interactions, one per (user, item), an hour apart."""
    out = [
        {"user_id": f"u{i % 5}", "item_id": f"i{i}", "timestamp": (BASE + pd.Timedelta(hours=i)).isoformat(),
         "event_type": "view", "value": None}
        for i in range(n)
    ]
    return out


def tables(interactions: list[dict], items: list[dict] | None = None, users: list[dict] | None = None
           ) -> ContractTables:
    inter = pd.DataFrame(interactions)
    inter = inter.astype({c: object for c in inter.columns})
    items_df = pd.DataFrame(items if items is not None else [{"item_id": f"i{i}"} for i in range(50)])
    users_df = pd.DataFrame(users if users is not None else [{"user_id": f"u{i}"} for i in range(5)],
                            columns=["user_id"] if users == [] else None)
    return ContractTables(normalise_interactions(inter), normalise_items(items_df), normalise_users(users_df))


def run(t: ContractTables, **cfg):
    cfg.setdefault("quality_threshold", 0.0)
    return validate_tables(t, ValidationConfig(**cfg), now=NOW)


def reasons_of(outcome, table: str = "interactions") -> dict[int, list[str]]:
    q = outcome.quarantine[table]
    return dict(zip(q["input_row"].tolist(), q["reasons"].tolist(), strict=True))


def test_clean_rows_are_all_accepted():
    out = run(tables(rows()))
    assert len(out.accepted.interactions) == 20
    assert len(out.quarantine["interactions"]) == 0
    assert out.report["quality_rate"] == 1.0


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("user_id", None, "missing_user_id"),
        ("item_id", None, "missing_item_id"),
        ("user_id", "", "invalid_user_id"),
        ("user_id", "   ", "invalid_user_id"),
        ("item_id", "x" * 129, "invalid_item_id"),
        ("item_id", "bad\x07id", "invalid_item_id"),
        ("user_id", "trailing\n", "invalid_user_id"),
        ("timestamp", None, "missing_or_unparseable_timestamp"),
        ("timestamp", "not a date", "missing_or_unparseable_timestamp"),
        ("timestamp", "2031-01-01T00:00:00Z", "future_timestamp"),
        ("timestamp", "2020-01-01T00:00:00Z", "too_old_timestamp"),
        ("event_type", "hover", "unknown_event_type"),
        ("event_type", None, "missing_event_type"),
        ("value", "abc", "unparseable_value"),
    ],
)
def test_each_fault_is_quarantined_with_its_reason(field, value, reason):
    data = rows()
    data[3][field] = value
    out = run(tables(data))
    assert reasons_of(out) == {3: [reason]}
    assert len(out.accepted.interactions) == 19


def test_id_of_exactly_128_characters_is_valid():
    data = rows()
    data[0]["item_id"] = "y" * 128
    assert len(run(tables(data)).quarantine["interactions"]) == 0


def test_unparseable_timestamp_keeps_its_raw_text():
    data = rows()
    data[2]["timestamp"] = "31/02/2025 25:00"
    q = run(tables(data)).quarantine["interactions"]
    assert q.loc[0, "raw_timestamp"] == "31/02/2025 25:00"


def test_duplicate_keeps_the_first_occurrence_in_input_order():
    data = rows()
    data.insert(5, dict(data[2]))  # a copy of row 2 at position 5
    data.insert(9, dict(data[2]))  # and another at position 9
    out = run(tables(data))
    assert reasons_of(out) == {5: ["duplicate"], 9: ["duplicate"]}
    kept = out.accepted.interactions
    assert (kept["item_id"] == data[2]["item_id"]).sum() == 1


def test_rows_differing_only_in_event_type_are_not_duplicates():
    data = rows()
    data.append({**data[0], "event_type": "click"})
    assert len(run(tables(data)).quarantine["interactions"]) == 0


def test_row_breaking_several_rules_is_quarantined_once_with_all_reasons():
    data = rows()
    data[4].update({"user_id": "", "timestamp": "2031-01-01T00:00:00Z", "event_type": "hover"})
    out = run(tables(data))
    assert reasons_of(out) == {4: ["invalid_user_id", "future_timestamp", "unknown_event_type"]}
    assert out.report["tables"]["interactions"]["quarantined"] == 1


def test_bot_days_are_quarantined_and_the_bots_other_days_kept():
    data = rows()
    bot_day = pd.Timestamp("2025-03-10T00:00:00Z")
    data += [{"user_id": "bot", "item_id": f"i{k % 50}", "event_type": "view", "value": None,
              "timestamp": (bot_day + pd.Timedelta(seconds=20 * k)).isoformat()} for k in range(12)]
    data += [{"user_id": "bot", "item_id": "i1", "event_type": "view", "value": None,
              "timestamp": "2025-03-12T10:00:00+00:00"}]
    out = run(tables(data), bot_events_per_day=10)
    reasons = reasons_of(out)
    assert len(reasons) == 12 and all(r == ["bot"] for r in reasons.values())
    kept_bot = out.accepted.interactions.query("user_id == 'bot'")
    assert len(kept_bot) == 1 and str(kept_bot["timestamp"].iloc[0].date()) == "2025-03-12"


def test_bot_threshold_is_strictly_more_than_the_limit():
    data = [{"user_id": "u1", "item_id": f"i{k}", "event_type": "view", "value": None,
             "timestamp": (BASE + pd.Timedelta(minutes=k)).isoformat()} for k in range(10)]
    assert len(run(tables(data), bot_events_per_day=10).quarantine["interactions"]) == 0


def test_spikes_are_reported_not_quarantined():
    days = pd.date_range("2025-01-01", periods=40, freq="D", tz="UTC")
    data = []
    for d_i, day in enumerate(days):
        n = 60 if d_i == 35 else 5 + (d_i % 3)
        data += [{"user_id": f"u{k % 5}-{d_i}", "item_id": f"i{k}", "event_type": "view", "value": None,
                  "timestamp": (day + pd.Timedelta(minutes=k)).isoformat()} for k in range(n)]
    out = run(tables(data))
    assert len(out.quarantine["interactions"]) == 0
    assert [s["day"] for s in out.report["spikes"]] == [days[35].date().isoformat()]
    assert out.report["spikes"][0]["events"] == 60


def test_no_spike_without_28_trailing_days():
    ts = pd.Series(pd.date_range("2025-01-01", periods=10, freq="D", tz="UTC").repeat([1] * 9 + [100]))
    assert detect_spikes(ts, 3.0, 28) == []


def test_as_of_default_anchors_horizon_on_newest_non_future_event():
    # A single row dated far in the future must not push every real (old) row out of the horizon.
    data = rows()
    for r in data:
        r["timestamp"] = pd.Timestamp(r["timestamp"]).replace(year=1998).isoformat()
    data.append({**data[0], "item_id": "i49", "timestamp": "2099-01-01T00:00:00Z"})
    out = run(tables(data))
    assert reasons_of(out) == {20: ["future_timestamp"]}
    assert out.report["as_of"]["horizon_anchor"] == "1998-03-02T07:00:00+00:00"  # newest real event
    assert not out.report["as_of"]["explicit"]


def test_explicit_as_of_overrides_both_anchors():
    data = rows()  # 2025-03-01 12:00 .. 2025-03-02 07:00
    out = run(tables(data), as_of=datetime(2025, 3, 2, 0, 0, tzinfo=UTC), horizon_days=1)
    reasons = reasons_of(out)
    assert all(r == ["future_timestamp"] for r in reasons.values())
    assert sorted(reasons) == list(range(13, 20))  # row 12 at 00:00 is not after as_of
    out2 = run(tables(data), as_of=datetime(2025, 3, 2, 14, 0, tzinfo=UTC), horizon_days=1)
    assert set(reasons_of(out2)) == {0, 1}  # older than as_of - 1 day


def test_resolve_as_of_without_past_events_uses_now():
    a = resolve_as_of(pd.Series(pd.to_datetime(["2099-01-01"], utc=True)), None, 730, now=NOW)
    assert a.horizon_anchor == pd.Timestamp(NOW)


def test_unknown_event_types_follow_configuration():
    data = rows()
    data[0]["event_type"] = "share"
    out = run(tables(data), event_types=("view", "share"))
    assert len(out.quarantine["interactions"]) == 0


def test_items_and_users_rules():
    items = [{"item_id": "i1"}, {"item_id": "i1", "title": "second"}, {"item_id": ""}, {"item_id": None}]
    users = [{"user_id": "u0"}, {"user_id": "u0"}, {"user_id": "x" * 200}]
    out = run(tables(rows(3), items=items, users=users))
    assert reasons_of(out, "items") == {1: ["duplicate_item_id"], 2: ["invalid_item_id"], 3: ["missing_item_id"]}
    assert reasons_of(out, "users") == {1: ["duplicate_user_id"], 2: ["invalid_user_id"]}


def test_entities_mentioned_by_interactions_get_rows_and_created_at():
    out = run(tables(rows(4), items=[{"item_id": "i0", "title": "known"}], users=[]))
    items = out.accepted.items.set_index("item_id")
    assert set(items.index) == {"i0", "i1", "i2", "i3"}
    assert items.loc["i2", "category"] == "unknown"
    assert items.loc["i3", "created_at"] == pd.Timestamp(BASE + pd.Timedelta(hours=3))
    assert set(out.accepted.users["user_id"]) == {"u0", "u1", "u2", "u3"}
    assert out.report["entities_added"] == {"items": 3, "users": 4}
    # Stubbed rows are counted, never hidden: 3 of 4 interactions name an item the table lacks.
    assert out.report["stubs"]["items"] == {"stubbed": 3, "interactions": 3, "share": 0.75,
                                            "first_ids": ["i1", "i2", "i3"], "limit_applies": True,
                                            "passed": False}
    assert out.report["gate"]["failed"] == ["stubbed_items"]


def test_every_input_row_is_accepted_or_quarantined():
    data = rows(40)
    data[1]["user_id"] = None
    data[7]["event_type"] = "bad"
    data.append(dict(data[10]))
    out = run(tables(data))
    t = out.report["tables"]["interactions"]
    assert t["input"] == len(data) == t["accepted"] + t["quarantined"]
    assert sorted(out.quarantine["interactions"]["input_row"]) == [1, 7, 40]


def test_gate_fails_below_threshold_naming_top_reasons(tmp_path):
    data = rows(20)
    for i in range(4):
        data[i]["event_type"] = "hover"
    data[5]["user_id"] = "   "  # (an empty CSV field reads as null: missing_user_id)
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame(data).to_csv(src / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(20)]}).to_csv(src / "items.csv", index=False)
    with pytest.raises(DataQualityError) as err:
        validate_contract_dir(src, tmp_path / "out", ValidationConfig(quality_threshold=0.9), now=NOW)
    msg = str(err.value)
    assert "15 of 20 interactions accepted (75.0%)" in msg
    assert "unknown_event_type: 4" in msg and "invalid_user_id: 1" in msg
    # The top reason's fix: the event types setting, naming the unknown value.
    assert "add them to the event types (env `RECSYS_EVENT_TYPES`" in msg and "If hover are real" in msg
    # The evidence is written before the gate fails.
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] is False
    q = pd.read_parquet(tmp_path / "out" / "quarantine" / "interactions.parquet")
    assert len(q) == 5 and list(q["reasons"].iloc[0]) == ["unknown_event_type"]
    assert (tmp_path / "out" / "data_docs" / "index.html").exists()


def test_validate_contract_dir_writes_a_complete_contract_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame(rows(10)).to_parquet(src / "interactions.parquet")
    pd.DataFrame({"item_id": ["i0"]}).to_parquet(src / "items.parquet")
    # 9 of 10 interactions name an item the table lacks: allowed here by turning the stub limit off.
    out = validate_contract_dir(src, tmp_path / "out", ValidationConfig(max_stub_share=1.0), now=NOW)
    acc = tmp_path / "out" / "accepted"
    assert {p.name for p in acc.iterdir()} == {"interactions.parquet", "items.parquet", "users.parquet"}
    inter = pd.read_parquet(acc / "interactions.parquet")
    assert str(inter["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert not any(c.startswith("_") or c.startswith("raw_") for c in inter.columns)
    assert len(pd.read_parquet(acc / "items.parquet")) == 10
    assert out["counts"]["interactions"] == {"input": 10, "accepted": 10, "quarantined": 0}
    docs = (tmp_path / "out" / "data_docs" / "index.html").read_text()
    assert "interactions" in docs
    assert out["data_docs"] == str(tmp_path / "out" / "data_docs" / "index.html")
    assert (tmp_path / "out" / "data_docs" / "gx" / "index.html").exists()  # GX's own docs, beside the page


# --- interactions naming items or users that their table lacks (stubs) ---------------------------

def write_source(root: Path, data: list[dict], items: list[str], users: list[str] | None = None) -> Path:
    """A contract directory as CSV (no users file when ``users`` is None)."""
    src = root / "src"
    src.mkdir(parents=True)
    pd.DataFrame(data).to_csv(src / "interactions.csv", index=False)
    pd.DataFrame({"item_id": items}).to_csv(src / "items.csv", index=False)
    if users is not None:
        pd.DataFrame({"user_id": users}).to_csv(src / "users.csv", index=False)
    return src


def test_unknown_items_are_accepted_counted_and_logged(caplog):
    data = rows(30)  # items i0..i29; the table has i0..i19
    with caplog.at_level(logging.WARNING):
        out = run(tables(data, items=[{"item_id": f"i{i}"} for i in range(20)]), max_stub_share=0.5)
    t = out.report["tables"]
    assert t["interactions"]["input"] == t["interactions"]["accepted"] == 30  # accepted, not quarantined
    assert t["interactions"]["quarantined"] == 0
    assert t["items"]["input"] == t["items"]["accepted"] == 20  # the 10 stub rows come on top
    assert out.report["stubs"]["users"]["interactions"] == 0
    stubs = out.report["stubs"]["items"]
    assert stubs["stubbed"] == 10 and stubs["interactions"] == 10
    assert stubs["share"] == pytest.approx(1 / 3)
    assert stubs["first_ids"] == ["i20", "i21", "i22", "i23", "i24"]
    assert stubs["passed"] and out.report["passed"]
    assert len(out.accepted.items) == 30
    assert "10 accepted interactions (33.3%) name 10 items missing from the items table" in caplog.text
    assert "(first: i20, i21, i22, i23, i24)" in caplog.text


def test_stub_share_above_the_limit_fails_the_gate(tmp_path):
    """The issue's case: 1,000 of 3,000 interactions name unknown items, every row is valid."""
    data = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 300}", "event_type": "view",
             "timestamp": (BASE + pd.Timedelta(minutes=i)).isoformat()} for i in range(3000)]
    src = write_source(tmp_path, data, items=[f"i{i}" for i in range(200)])  # i200..i299: 1,000 rows
    with pytest.raises(DataQualityError) as err:
        validate_contract_dir(src, tmp_path / "out", ValidationConfig(), now=NOW)
    msg = str(err.value)
    assert isinstance(err.value, PermanentError)
    assert "1,000 of 3,000 accepted interactions (33.3%) name an item missing from the items table" in msg
    assert "(100 items, first: 'i200', 'i201', 'i202', 'i203', 'i204')" in msg
    assert "above max_stub_share 5.0%" in msg
    assert "raise max_stub_share to 0.334 (DAG param `max_stub_share`, CLI `--max-stub-share`, env " \
           "`RECSYS_MAX_STUB_SHARE`)" in msg
    assert "quality_threshold" not in msg  # the quality gate itself passed (100 %)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quality_rate"] == 1.0 and report["passed"] is False
    assert report["gate"] == {"passed": False, "failed": ["stubbed_items"], "message": msg}
    assert report["stubs"]["items"]["interactions"] == 1000 and report["stubs"]["items"]["stubbed"] == 100
    # The no-loss invariant still holds: stubbed rows count as accepted.
    t = report["tables"]["interactions"]
    assert t["input"] == t["accepted"] + t["quarantined"] == 3000


def test_suggested_max_stub_share_passes_the_gate(tmp_path):
    data = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 300}", "event_type": "view",
             "timestamp": (BASE + pd.Timedelta(minutes=i)).isoformat()} for i in range(3000)]
    src = write_source(tmp_path, data, items=[f"i{i}" for i in range(200)])
    out = validate_contract_dir(src, tmp_path / "out", ValidationConfig(max_stub_share=0.334), now=NOW)
    assert out["counts"]["interactions"]["accepted"] == 3000


def test_stub_limit_is_strictly_above_the_share():
    items = [{"item_id": f"i{i}"} for i in range(19)]  # rows(20) names i0..i19: i19 is unknown
    at_limit = run(tables(rows(20), items=items))  # 1 of 20 = 5 % = the default limit
    assert DEFAULT_MAX_STUB_SHARE == 0.05
    assert at_limit.report["stubs"]["items"]["share"] == 0.05 and at_limit.report["passed"]
    above = run(tables(rows(20), items=items[:18]))  # 2 of 20
    assert not above.report["passed"] and above.report["gate"]["failed"] == ["stubbed_items"]


def test_missing_users_table_does_not_count_but_a_given_one_does(tmp_path):
    without = run(tables(rows(20), users=[]))
    assert without.report["stubs"]["users"]["share"] == 1.0
    assert not without.report["stubs"]["users"]["limit_applies"] and without.report["passed"]
    given = run(tables(rows(20), users=[{"user_id": "u0"}]))  # u1..u4 unknown: 16 of 20 rows
    users = given.report["stubs"]["users"]
    assert users["limit_applies"] and users["share"] == 0.8 and users["first_ids"] == ["u1", "u2", "u3", "u4"]
    assert given.report["gate"]["failed"] == ["stubbed_users"]
    # Through the stage: no users file passes; a users file naming one user fails, naming the users table.
    data = rows(20)
    validate_contract_dir(write_source(tmp_path / "a", data, [f"i{i}" for i in range(20)]), tmp_path / "a" / "out",
                          ValidationConfig(), now=NOW)
    with pytest.raises(DataQualityError, match=r"16 of 20 accepted interactions \(80.0%\) name a user missing "
                                               r"from the users table \(4 users, first: 'u1'"):
        validate_contract_dir(write_source(tmp_path / "b", data, [f"i{i}" for i in range(20)], users=["u0"]),
                              tmp_path / "b" / "out", ValidationConfig(), now=NOW)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_max_stub_share_must_be_a_share(share):
    with pytest.raises(InvalidParamsError, match="max_stub_share"):
        ValidationConfig(max_stub_share=share)


# --- the gate's message names the setting that addresses the top reason ---------------------------

def failed_gate(data: list[dict], **cfg) -> tuple[dict, str]:
    """The report of a run failing the quality gate, and its message."""
    out = run(tables(data), quality_threshold=0.99, **cfg)
    assert not out.report["passed"]
    return out.report, gate_message(out.report, "QDIR", "DOCS")


def test_gate_names_horizon_days_with_the_value_that_keeps_the_rows():
    """A ratings set spanning 3 years: 91 % of its rows are older than the 730-day horizon."""
    start = pd.Timestamp("2022-03-01T00:00:00Z")
    data = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 50}", "event_type": "view", "value": None,
             "timestamp": (start + pd.Timedelta(days=3 * i)).isoformat()} for i in range(91)]
    data += [{**r, "timestamp": (BASE + pd.Timedelta(days=k)).isoformat()} for k, r in enumerate(rows(9))]
    report, msg = failed_gate(data)
    assert report["tables"]["interactions"]["reasons"] == {"too_old_timestamp": 91}
    anchor = pd.Timestamp(report["as_of"]["horizon_anchor"])
    needed = math.ceil((anchor - start) / pd.Timedelta(days=1))  # the data's age span, rounded up
    assert f"raise horizon_days from 730 to {needed} " in msg
    assert "DAG param `horizon_days`, CLI `--horizon-days`, env `RECSYS_HORIZON_DAYS`" in msg
    assert "lower quality_threshold" not in msg and "Traceback" not in msg
    # The value keeps every row; one day less does not.
    assert run(tables(data), horizon_days=needed).report["quality_rate"] == 1.0
    assert run(tables(data), horizon_days=needed - 1).report["tables"]["interactions"]["quarantined"] == 1


def test_gate_names_as_of_for_future_rows():
    data = rows(20)
    for i in range(3):
        data[i]["timestamp"] = f"2031-01-0{i + 1}T00:00:00Z"
    report, msg = failed_gate(data)
    assert "set as_of to 2031-01-03T00:00:00+00:00 or later (DAG param `as_of`, CLI `--as-of`)" in msg
    assert run(tables(data), as_of=datetime(2031, 1, 3, tzinfo=UTC), horizon_days=10_000).report[
        "quality_rate"] == 1.0


def test_gate_names_bot_events_per_day_with_the_busiest_day():
    data = [{"user_id": "bot", "item_id": f"i{k}", "event_type": "view", "value": None,
             "timestamp": (BASE + pd.Timedelta(minutes=k)).isoformat()} for k in range(12)]
    data += rows(5)
    report, msg = failed_gate(data, bot_events_per_day=10)
    assert "raise bot_events_per_day from 10 to 12 (DAG param `bot_events_per_day`, CLI `--bot-events-per-day`, " \
           "env `RECSYS_BOT_EVENTS_PER_DAY`)" in msg
    assert run(tables(data), bot_events_per_day=12).report["quality_rate"] == 1.0


def test_gate_names_event_types_with_the_unknown_values():
    data = rows(20)
    for i, e in enumerate(["share", "share", "hover"]):
        data[i]["event_type"] = e
    report, msg = failed_gate(data)
    assert "If share, hover are real event types, add them to the event types (env `RECSYS_EVENT_TYPES`, now " \
           "view,click,add_to_cart,purchase,favorite)" in msg


@pytest.mark.parametrize(("field", "value", "reason"), [("user_id", None, "missing_user_id"),
                                                         ("value", "abc", "unparseable_value")])
def test_gate_without_a_setting_says_fix_the_source_or_lower_the_threshold(field, value, reason):
    data = rows(20)
    data[0][field] = value
    report, msg = failed_gate(data)
    assert f"Top reasons: {reason}: 1." in msg
    assert "Fix the source data, or lower quality_threshold (DAG param `quality_threshold`, CLI " \
           "`--quality-threshold`, env `RECSYS_QUALITY_THRESHOLD`)" in msg
    assert "QDIR" in msg and "DOCS" in msg
