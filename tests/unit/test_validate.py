"""Validation: one negative test per fault class and per contract rule, through the real GX suites."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
import pytest

from pipeline_tasks.data.contract import ContractTables, normalise_interactions, normalise_items, normalise_users
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
    out = validate_contract_dir(src, tmp_path / "out", ValidationConfig(), now=NOW)
    acc = tmp_path / "out" / "accepted"
    assert {p.name for p in acc.iterdir()} == {"interactions.parquet", "items.parquet", "users.parquet"}
    inter = pd.read_parquet(acc / "interactions.parquet")
    assert str(inter["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert not any(c.startswith("_") or c.startswith("raw_") for c in inter.columns)
    assert len(pd.read_parquet(acc / "items.parquet")) == 10
    assert out["counts"]["interactions"] == {"input": 10, "accepted": 10, "quarantined": 0}
    docs = (tmp_path / "out" / "data_docs" / "index.html").read_text()
    assert "interactions" in docs
