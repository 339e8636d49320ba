"""Pure parts of the serving path: in-process state, exploration, the feedback log's files."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from pipeline_tasks.online.engine import LocalState, explore
from pipeline_tasks.online.feedback_log import FeedbackLog, feedback_interactions, read_log


def test_local_state_ttls_and_lru():
    state = LocalState(max_vectors=2)
    state.set_vectors({"a": np.ones(3), "b": np.zeros(3)}, ttl_s=60)
    assert set(state.get_vectors(["a", "b", "c"])) == {"a", "b"}
    state.get_vectors(["a"])  # a is now the most recently used
    state.set_vectors({"c": np.ones(3)}, ttl_s=60)
    assert set(state.get_vectors(["a", "b", "c"])) == {"a", "c"}  # b evicted
    state.set_vectors({"d": np.ones(3)}, ttl_s=0.05)
    time.sleep(0.1)
    assert state.get_vectors(["d"]) == {}
    state.drop_vector("a")
    assert "a" not in state.get_vectors(["a"])
    state.add_shown("u", ["i1", "i2"], ttl_s=60)
    state.add_shown("u", ["i3"], ttl_s=0.05)
    time.sleep(0.1)
    assert state.shown("u") == {"i1", "i2"}
    state.add_event("u", {"item_id": "x"})
    assert state.events(["u", "v"]) == {"u": [{"item_id": "x"}]}


def test_explore_is_seeded_and_keeps_the_items():
    ranked = [(f"i{k}", float(-k)) for k in range(20)]
    assert explore(ranked, 0.0, random.Random(1)) == ranked
    a = explore(ranked, 0.5, random.Random("req-1"))
    assert a == explore(ranked, 0.5, random.Random("req-1")) and a != ranked
    assert sorted(a) == sorted(ranked) and a[0] == ranked[0]  # the first position is never explored


def test_feedback_log_partitions_and_reads_back(tmp_path):
    log = FeedbackLog(tmp_path, sync_interval_s=0.05)
    log.append("feedback", [{"request_id": "r1", "user_id": "u", "item_id": "i", "event_type": "click",
                             "timestamp": "2026-01-02T10:00:00Z"},
                            {"request_id": "r2", "user_id": "u", "item_id": "j", "event_type": "dwell",
                             "timestamp": "2026-01-03T10:00:00+00:00"}])
    log.append("impressions", [{"request_id": "r1", "user_id": "u", "item_id": "i", "position": 1}])
    with pytest.raises(ValueError, match="table"):
        log.append("clicks", [{}])
    log.close()
    days = sorted(p.parent.name for p in (tmp_path / "feedback").glob("date=*/*.jsonl"))
    assert days == ["date=2026-01-02", "date=2026-01-03"]
    part = next((tmp_path / "feedback" / "date=2026-01-02").glob("*.jsonl"))
    with open(part, "a") as fh:
        fh.write('{"request_id": "torn", "user')  # a crash mid-write
    frame, torn = read_log(tmp_path, "feedback")
    assert torn == 1 and set(frame["request_id"]) == {"r1", "r2"}
    interactions = feedback_interactions(tmp_path)  # contract event types only; impressions never
    assert interactions[["user_id", "item_id", "event_type"]].values.tolist() == [["u", "i", "click"]]
    assert str(interactions["timestamp"].dt.tz) == "UTC"
    impressions, _ = read_log(tmp_path, "impressions")
    assert json.loads(impressions.to_json(orient="records"))[0]["position"] == 1


def test_training_ingests_logged_feedback(tmp_path):
    """`recsys run --feedback-log DIR`: logged events of contract types join the source's interactions."""
    from pipeline_tasks.core.errors import InvalidParamsError
    from pipeline_tasks.data.contract import read_contract_dir
    from pipeline_tasks.data.ingest import ingest
    from pipeline_tasks.stages.common import resolve_config

    log = FeedbackLog(tmp_path / "feedback")
    log.append("feedback", [{"request_id": "r1", "user_id": "u_new", "item_id": "i1", "event_type": "purchase",
                             "timestamp": "2025-01-05T10:00:00Z"},
                            {"request_id": "r2", "user_id": "u_new", "item_id": "i2", "event_type": "dwell",
                             "timestamp": "2025-01-05T10:01:00Z"}])
    log.append("impressions", [{"request_id": "r1", "user_id": "u_new", "item_id": "i9", "position": 1}])
    log.close()
    synthetic = {"n_users": 50, "n_items": 40, "n_days": 10, "n_events": 500, "faults": "none", "seed": 3}
    plain = ingest("synthetic", tmp_path / "plain", synthetic)
    joined = ingest("synthetic", tmp_path / "joined", synthetic, feedback_log=tmp_path / "feedback")
    assert joined["counts"]["interactions"] == plain["counts"]["interactions"] + 1
    inter = read_contract_dir(tmp_path / "joined").interactions
    row = inter[inter["user_id"].astype(str) == "u_new"]
    assert row[["item_id", "event_type"]].astype(str).values.tolist() == [["i1", "purchase"]]
    with pytest.raises(InvalidParamsError, match="feedback_log"):
        resolve_config({"feedback_log": str(tmp_path / "missing")})
