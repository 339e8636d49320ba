"""What makes the hourly refresh publish a new serving snapshot (pure logic; the DAG run is in
tests/integration/test_item_refresh.py)."""

from __future__ import annotations

import json

from pipeline_tasks.bundle.publish import KEY_FIELDS, changed, point_snapshot, pointed_snapshot

KEY = {"as_of": "2024-01-02T00:00:01+00:00", "data_dir": "/data", "features_end": "2024-01-02T00:00:00+00:00",
       "index_dir": "/idx/r0001"}


def test_nothing_pointed_yet_changes_everything():
    assert changed(None, KEY) == list(KEY_FIELDS)
    assert changed({"at": "x"}, KEY) == list(KEY_FIELDS)  # a hand-made snapshot (`recsys snapshot`) records no key


def test_only_what_moved_is_named():
    assert changed({"published": dict(KEY)}, KEY) == []
    assert changed({"published": {**KEY, "index_dir": "/idx/r0002"}}, KEY) == ["index_dir"]
    assert changed({"published": {**KEY, "as_of": "2024-01-03T00:00:00+00:00", "features_end": ""}}, KEY) == [
        "as_of", "features_end"]


def test_pointer_round_trip(tmp_path):
    snap = tmp_path / "v1" / "published-a"
    snap.mkdir(parents=True)
    assert pointed_snapshot(tmp_path / "v1") is None
    pointer = point_snapshot(snap)
    assert json.loads(pointer.read_text()) == {"snapshot": str(snap)}
    assert pointed_snapshot(tmp_path / "v1") is None  # pointed at, but not a snapshot (no snapshot.json)
    (snap / "snapshot.json").write_text(json.dumps({"published": KEY}))
    assert pointed_snapshot(tmp_path / "v1") == (snap, {"published": KEY})
    assert not list((tmp_path / "v1").glob(".current.json.*"))  # written under a temporary name, then renamed


def test_newest_event_reads_the_timestamp_column(tmp_path):
    import pandas as pd

    from pipeline_tasks.data.contract import newest_event

    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp,event_type\n1,a,2024-01-02T00:00:00Z,"
                                               "view\n1,b,1704326400,click\n2,a,not a time,view\n")
    assert newest_event(tmp_path) == pd.Timestamp("2024-01-04", tz="UTC")  # epoch seconds count; junk is skipped
