"""The PySpark feature jobs: exact values on a hand-made fixture, point-in-time correctness,
idempotent re-runs, the written parquet layout, and the same output on ``local[*]`` and on
``local-cluster`` (separate executor JVMs).

The fixture (UTC), days A = 2025-01-01 .. D = 2025-01-04:

    u1: A 10:00 view i1, A 10:10 click i1, A 11:00 view i2, C 09:00 purchase i1, C 09:05 view i3
    u2: B 23:50 view i2, C 00:10 click i2, D 08:00 favorite i1
    items: i1 cat a created 2024-12-31 10:00; i2 cat b created A 00:00; i3 cat a no created_at;
           i4 cat c created C 12:00 (no events); i5 created 2025-01-10 (after the end: no rows);
           i6 no category, created 2024-06-01 (no events: rows start the day before the first event)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_tasks.data.contract import (
    ContractTables,
    empty_users,
    normalise_interactions,
    normalise_items,
    write_contract_dir,
)

pytestmark = [pytest.mark.spark, pytest.mark.integration]

EVENTS = [
    ("u1", "i1", "2025-01-01T10:00:00Z", "view"),
    ("u1", "i1", "2025-01-01T10:10:00Z", "click"),
    ("u1", "i2", "2025-01-01T11:00:00Z", "view"),
    ("u1", "i1", "2025-01-03T09:00:00Z", "purchase"),
    ("u1", "i3", "2025-01-03T09:05:00Z", "view"),
    ("u2", "i2", "2025-01-02T23:50:00Z", "view"),
    ("u2", "i2", "2025-01-03T00:10:00Z", "click"),
    ("u2", "i1", "2025-01-04T08:00:00Z", "favorite"),
]
ITEMS = [
    ("i1", "a", "2024-12-31T10:00:00Z"),
    ("i2", "b", "2025-01-01T00:00:00Z"),
    ("i3", "a", None),
    ("i4", "c", "2025-01-03T12:00:00Z"),
    ("i5", "c", "2025-01-10T00:00:00Z"),
    ("i6", None, "2024-06-01T00:00:00Z"),
]
DAYS = ["2024-12-31", "2025-01-01", "2025-01-02", "2025-01-03", "2025-01-04"]
JOB_TIME = datetime(2025, 1, 7, 3, 0, tzinfo=UTC)  # when the tiny fixture's job "ran": every day is over

TS = pa.timestamp("us", tz="UTC")
USER_SCHEMA = {
    "user_id": pa.string(), "event_timestamp": TS, "created_timestamp": TS,
    "user_total_interactions": pa.int64(), "user_unique_items": pa.int64(), "user_n_view": pa.int64(),
    "user_n_click": pa.int64(), "user_n_add_to_cart": pa.int64(), "user_n_purchase": pa.int64(),
    "user_n_favorite": pa.int64(), "user_ctr": pa.float64(), "user_conversion_rate": pa.float64(),
    "user_days_since_last_event": pa.float64(), "user_top1_category": pa.string(), "user_top2_category": pa.string(),
    "user_top3_category": pa.string(), "user_top1_share": pa.float64(), "user_top2_share": pa.float64(),
    "user_top3_share": pa.float64(), "user_mean_session_events": pa.float64(),
    "user_mean_session_minutes": pa.float64(), "user_last_items": pa.string(),
}
ITEM_SCHEMA = {
    "item_id": pa.string(), "event_timestamp": TS, "created_timestamp": TS,
    "item_n_view": pa.int64(), "item_n_click": pa.int64(), "item_n_purchase": pa.int64(),
    "item_total_interactions": pa.int64(), "item_unique_users": pa.int64(), "item_ctr": pa.float64(),
    "item_conversion_rate": pa.float64(), "item_popularity": pa.float64(), "item_interactions_30d": pa.int64(),
    "item_trending_score": pa.float64(), "item_age_days": pa.float64(), "item_category": pa.string(),
}


def _contract(events: list[tuple], items: list[tuple], directory: Path) -> Path:
    inter = pd.DataFrame(events, columns=["user_id", "item_id", "timestamp", "event_type"])
    cat = pd.DataFrame(items, columns=["item_id", "category", "created_at"])
    write_contract_dir(ContractTables(normalise_interactions(inter), normalise_items(cat), empty_users()), directory)
    return directory


def _read(out_dir: Path, table: str) -> pd.DataFrame:
    """A written feature table as pandas (pyarrow, hive partitions), sorted by entity and day."""
    df = pd.read_parquet(out_dir / table)
    df["snapshot_date"] = df["snapshot_date"].astype(str)
    key = "user_id" if table == "user_features" else "item_id"
    return df.sort_values([key, "snapshot_date"]).reset_index(drop=True)


def _row(df: pd.DataFrame, key: str, entity: str, day: str) -> pd.Series:
    rows = df[(df[key] == entity) & (df["snapshot_date"] == day)]
    assert len(rows) == 1, f"{entity} {day}: {len(rows)} rows"
    return rows.iloc[0]


def _files(table_dir: Path) -> dict[str, list[str]]:
    return {p.name: sorted(f.name for f in p.glob("*.parquet")) for p in sorted(table_dir.glob("snapshot_date=*"))}


# --- the local-cluster run starts first: its JVMs boot while the other tests run ---------------

SYNTHETIC = {"n_users": 300, "n_items": 500, "n_days": 30, "n_events": 20_000}
CLUSTER_JOB_TIME = datetime(2030, 1, 1, tzinfo=UTC)  # both runs stamp the same created_timestamp
FAST_JVM = "-XX:TieredStopAtLevel=1 -Duser.timezone=UTC"  # a short job: quick JIT beats a good one


@pytest.fixture(scope="module")
def synthetic_contract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline_tasks.data.synthetic import SyntheticConfig, generate

    directory = tmp_path_factory.mktemp("synthetic_contract")
    write_contract_dir(generate(SyntheticConfig(**SYNTHETIC)).tables, directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def cluster_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``python -m pipeline_tasks.features.snapshots --master local-cluster[2,1,1024]`` in a subprocess, started
    before the other tests (when the test that needs it is selected) so that its JVMs boot meanwhile.

    It also runs with another number of shuffle partitions than the local session: the output
    must not depend on the partitioning either.
    """
    if not any(item.name == test_local_cluster_matches_local.__name__ for item in request.session.items):
        yield None
        return
    contract = request.getfixturevalue("synthetic_contract")
    out = tmp_path_factory.mktemp("cluster_out")
    log = out.parent / "cluster_run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "PYSPARK_SUBMIT_ARGS")}
    conf = {"spark.driver.extraJavaOptions": FAST_JVM, "spark.executor.extraJavaOptions": FAST_JVM,
            "spark.sql.shuffle.partitions": "3"}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline_tasks.features.snapshots", "--master", "local-cluster[2,1,1024]",
             "--job-time", CLUSTER_JOB_TIME.isoformat(),
             *(arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")), str(contract), str(out)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
    yield {"proc": proc, "out": out, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# --- the hand-made fixture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline_tasks.features.snapshots import build_features

    contract = _contract(EVENTS, ITEMS, tmp_path_factory.mktemp("tiny_contract"))
    out = tmp_path_factory.mktemp("tiny_features")
    result = build_features(spark, contract, out, job_time=JOB_TIME)
    return {"contract": contract, "out": out, "result": result,
            "users": _read(out, "user_features"), "items": _read(out, "item_features")}


def test_result_and_layout(tiny: dict) -> None:
    res = tiny["result"]
    assert (res["first_day"], res["last_day"], res["days"]) == ("2024-12-31", "2025-01-04", 5)
    assert res["rows"] == {"user_features": 7, "item_features": 18}
    for table in ("user_features", "item_features"):
        files = _files(tiny["out"] / table)
        assert all(len(f) == 1 for f in files.values()), files  # one file per day
    assert list(_files(tiny["out"] / "item_features")) == [f"snapshot_date={d}" for d in DAYS]
    assert list(_files(tiny["out"] / "user_features")) == [f"snapshot_date={d}" for d in DAYS[1:]]


def test_written_parquet_schema(tiny: dict) -> None:
    """Timestamps are parquet TIMESTAMP(MICROS, UTC); snapshot_date lives only in the directory names."""
    for table, expected in (("user_features", USER_SCHEMA), ("item_features", ITEM_SCHEMA)):
        part = next((tiny["out"] / table).glob("snapshot_date=*/*.parquet"))
        schema = pq.read_schema(part)
        assert schema.names == list(expected), table
        for name, dtype in expected.items():
            assert schema.field(name).type == dtype, (table, name, schema.field(name).type)


def test_user_features_exact(tiny: dict) -> None:
    users = tiny["users"]
    assert users.groupby("user_id")["snapshot_date"].apply(list).to_dict() == {"u1": DAYS[1:], "u2": DAYS[2:]}
    r = _row(users, "user_id", "u1", "2025-01-01")
    assert r["event_timestamp"] == pd.Timestamp("2025-01-02T00:00:00Z")  # valid from the end of its day
    assert r["created_timestamp"] == pd.Timestamp(JOB_TIME)  # written by the job at its time
    assert (r["user_total_interactions"], r["user_unique_items"], r["user_n_view"], r["user_n_click"],
            r["user_n_add_to_cart"], r["user_n_purchase"], r["user_n_favorite"]) == (3, 2, 2, 1, 0, 0, 0)
    assert (r["user_ctr"], r["user_conversion_rate"], r["user_days_since_last_event"]) == (0.5, 0.0, 13 / 24)
    assert (r["user_top1_category"], r["user_top2_category"], r["user_top3_category"]) == ("a", "b", None)
    assert (r["user_top1_share"], r["user_top2_share"]) == (2 / 3, 1 / 3) and np.isnan(r["user_top3_share"])
    # Sessions: 10:00-10:10 (2 events, 10 min) and 11:00 (50 min later: a new session).
    assert (r["user_mean_session_events"], r["user_mean_session_minutes"]) == (1.5, 5.0)
    assert r["user_last_items"] == "i2|i1"
    # A day without events: the same figures, one more day since the last event.
    b = _row(users, "user_id", "u1", "2025-01-02")
    assert b["user_days_since_last_event"] == 37 / 24 and b["user_last_items"] == "i2|i1"
    assert b["user_top1_share"] == 2 / 3 and b["user_total_interactions"] == 3
    c = _row(users, "user_id", "u1", "2025-01-03")
    assert (c["user_total_interactions"], c["user_unique_items"], c["user_n_view"], c["user_n_purchase"]) == (
        5, 3, 3, 1)
    assert (c["user_ctr"], c["user_conversion_rate"], c["user_days_since_last_event"]) == (1 / 3, 0.5, 895 / 1440)
    assert (c["user_top1_category"], c["user_top1_share"], c["user_top2_category"], c["user_top2_share"]) == (
        "a", 0.8, "b", 0.2)
    assert (c["user_mean_session_events"], c["user_mean_session_minutes"]) == (5 / 3, 5.0)
    assert c["user_last_items"] == "i3|i1|i2"
    assert _row(users, "user_id", "u1", "2025-01-04")["user_days_since_last_event"] == (895 + 1440) / 1440


def test_user_sessions_split_at_midnight(tiny: dict) -> None:
    users = tiny["users"]
    b = _row(users, "user_id", "u2", "2025-01-02")
    assert (b["user_ctr"], b["user_days_since_last_event"], b["user_top1_share"]) == (0.0, 10 / 1440, 1.0)
    assert b["user_top2_category"] is None and np.isnan(b["user_top2_share"])
    # 23:50 and 00:10 are 20 minutes apart but on two days: two sessions, never straddling a snapshot.
    c = _row(users, "user_id", "u2", "2025-01-03")
    assert (c["user_total_interactions"], c["user_mean_session_events"], c["user_mean_session_minutes"]) == (
        2, 1.0, 0.0)
    assert (c["user_ctr"], c["user_unique_items"], c["user_last_items"]) == (1.0, 1, "i2")
    d = _row(users, "user_id", "u2", "2025-01-04")
    assert (d["user_unique_items"], d["user_n_favorite"], d["user_last_items"]) == (2, 1, "i1|i2")
    assert (d["user_top1_category"], d["user_top1_share"], d["user_top2_category"], d["user_top2_share"]) == (
        "b", 2 / 3, "a", 1 / 3)


def test_item_features_exact(tiny: dict) -> None:
    items = tiny["items"]
    assert items.groupby("item_id")["snapshot_date"].apply(list).to_dict() == {
        "i1": DAYS, "i2": DAYS[1:], "i3": DAYS[3:], "i4": DAYS[3:], "i6": DAYS}
    z = _row(items, "item_id", "i1", "2024-12-31")  # created, no events yet
    assert (z["item_total_interactions"], z["item_ctr"], z["item_popularity"], z["item_trending_score"]) == (0, 0, 0, 0)
    assert z["item_age_days"] == 14 / 24 and z["item_category"] == "a"
    a = _row(items, "item_id", "i1", "2025-01-01")
    assert (a["item_n_view"], a["item_n_click"], a["item_n_purchase"], a["item_total_interactions"],
            a["item_unique_users"], a["item_interactions_30d"]) == (1, 1, 0, 2, 1, 2)
    assert (a["item_ctr"], a["item_conversion_rate"], a["item_popularity"], a["item_trending_score"]) == (
        1.0, 0.0, 2 / 3, 2 / 3)
    assert _row(items, "item_id", "i1", "2025-01-02")["item_popularity"] == 2 / 4  # all events so far: 4
    c = _row(items, "item_id", "i1", "2025-01-03")
    assert (c["item_conversion_rate"], c["item_popularity"], c["item_trending_score"]) == (1 / 2, 3 / 7, 3 / 4)
    d = _row(items, "item_id", "i1", "2025-01-04")
    assert (d["item_total_interactions"], d["item_unique_users"], d["item_popularity"], d["item_age_days"]) == (
        4, 2, 4 / 8, 4 + 14 / 24)
    assert _row(items, "item_id", "i2", "2025-01-02")["item_age_days"] == 2.0
    assert _row(items, "item_id", "i3", "2025-01-03")["item_age_days"] == 895 / 1440  # no created_at: first event
    cold = _row(items, "item_id", "i4", "2025-01-03")
    assert (cold["item_age_days"], cold["item_total_interactions"], cold["item_category"]) == (0.5, 0, "c")
    old = _row(items, "item_id", "i6", "2024-12-31")
    assert (old["item_age_days"], old["item_category"]) == (214.0, "unknown")


def test_reads_timestamps_exactly(spark, tmp_path: Path) -> None:
    """pandas' nanosecond parquet timestamps become exact microseconds, floored (never rounded up
    into the next day), before 1970 too."""
    from pyspark.sql import functions as sf

    from pipeline_tasks.features.snapshots import read_contract_tables

    times = ["2025-01-03T23:59:59.999999999Z", "2025-06-30T12:34:56.789012345Z", "1969-12-31T23:59:59.999999500Z"]
    contract = _contract([("u", "i", t, "view") for t in times], [("i", "a", times[1])], tmp_path)
    inter, items = read_contract_tables(spark, contract)
    got = [r["us"] for r in inter.select(sf.unix_micros("timestamp").alias("us")).collect()]
    expected = [pd.Timestamp(t).value // 1000 for t in times]
    assert sorted(got) == sorted(expected) and expected[0] % 1_000_000 == 999_999
    assert items.select(sf.unix_micros("created_at")).first()[0] == expected[1]


def test_item_windows(spark) -> None:
    """30-day and 7-day windows count events in (event_timestamp - N days, event_timestamp)."""
    from pipeline_tasks.features.snapshots import compute_item_features

    ts = pd.to_datetime(["2025-01-01T12:00Z", "2025-01-11T12:00Z", "2025-02-10T12:00Z"])
    inter = spark.createDataFrame(pd.DataFrame({"user_id": ["u", "v", "w"], "item_id": "x", "timestamp": ts,
                                                "event_type": "view"}))
    items = spark.createDataFrame(pd.DataFrame({"item_id": ["x"], "category": ["k"], "created_at": [ts[0]]}))
    df = compute_item_features(spark, inter, items).toPandas().set_index("snapshot_date")
    assert len(df) == 41 and df.index.min() == "2025-01-01" and df.index.max() == "2025-02-10"
    assert (df.loc["2025-01-11", "item_interactions_30d"], df.loc["2025-01-11", "item_trending_score"]) == (2, 1 / 3)
    assert (df.loc["2025-01-17", "item_interactions_30d"], df.loc["2025-01-17", "item_trending_score"]) == (2, 1 / 3)
    assert (df.loc["2025-01-18", "item_interactions_30d"], df.loc["2025-01-18", "item_trending_score"]) == (2, 0.0)
    assert df.loc["2025-01-30", "item_interactions_30d"] == 2  # Jan 1 is the 30th day back
    assert df.loc["2025-01-31", "item_interactions_30d"] == 1
    assert (df.loc["2025-02-10", "item_interactions_30d"], df.loc["2025-02-10", "item_trending_score"]) == (1, 1 / 4)


def test_rerun_writes_nothing_and_rewrites_no_day(spark, tiny: dict) -> None:
    """Every day is recorded: a re-run writes nothing, and no file of a recorded day changes."""
    from pipeline_tasks.features.snapshots import build_features, recorded_partitions

    out = tiny["out"]
    files_before = {t: _files(out / t) for t in ("user_features", "item_features")}
    bytes_before = {f: f.read_bytes() for f in out.rglob("*.parquet")}
    again = build_features(spark, tiny["contract"], out, job_time=datetime(2025, 2, 1, tzinfo=UTC))
    assert again["rows"] == {"user_features": 0, "item_features": 0}
    assert again["written_days"] == {"user_features": [], "item_features": []}
    assert again["partitions"] == tiny["result"]["partitions"]  # the same days, the same checksums
    assert (again["first_day"], again["last_day"]) == ("2024-12-31", "2025-01-04")
    for table in ("user_features", "item_features"):
        assert _files(out / table) == files_before[table]
        assert sorted(recorded_partitions(out / table)) == [d.split("=")[1] for d in files_before[table]]
    assert {f: f.read_bytes() for f in out.rglob("*.parquet")} == bytes_before


def test_point_in_time(spark, tmp_path: Path) -> None:
    """Events at or after a row's event_timestamp never change it; one just before does."""
    from pipeline_tasks.features.snapshots import build_features

    later = [
        ("u1", "i4", "2025-01-04T00:00:00Z", "view"),  # exactly the event_timestamp of day C's rows
        ("u1", "i2", "2025-01-04T12:00:00Z", "purchase"),
        ("u2", "i3", "2025-01-03T23:59:59.999999Z", "view"),  # the last microsecond of day C
    ]
    base_out, new_out = tmp_path / "base", tmp_path / "new"
    build_features(spark, _contract(EVENTS, ITEMS, tmp_path / "c1"), base_out, end_date="2025-01-03",
                   job_time=JOB_TIME)
    res = build_features(spark, _contract(EVENTS + later, ITEMS, tmp_path / "c2"), new_out, end_date="2025-01-03",
                         job_time=JOB_TIME)
    assert (res["first_day"], res["last_day"], res["rows"]) == (
        "2024-12-31", "2025-01-03", {"user_features": 5, "item_features": 13})
    base_users, users = _read(base_out, "user_features"), _read(new_out, "user_features")
    base_items, items = _read(base_out, "item_features"), _read(new_out, "item_features")
    pd.testing.assert_series_equal(_row(users, "user_id", "u1", "2025-01-03"),
                                   _row(base_users, "user_id", "u1", "2025-01-03"), check_names=False)
    assert _row(users, "user_id", "u2", "2025-01-03")["user_total_interactions"] == 3
    pd.testing.assert_series_equal(_row(items, "item_id", "i4", "2025-01-03"),
                                   _row(base_items, "item_id", "i4", "2025-01-03"), check_names=False)
    assert _row(items, "item_id", "i3", "2025-01-03")["item_total_interactions"] == 2


def test_late_events_count_from_the_next_new_day(spark, tiny: dict, tmp_path: Path) -> None:
    """Run twice with late events in between: recorded days keep their bytes and checksums; the late
    events (older timestamps) and the new day's events appear in the next new day only."""
    from pipeline_tasks.features.snapshots import build_features, recorded_partitions

    out = tmp_path / "out"
    shutil.copytree(tiny["out"], out)
    before = {t: recorded_partitions(out / t) for t in ("user_features", "item_features")}
    late = [("u1", "i2", "2025-01-02T08:00:00Z", "purchase"),  # arrives after day 01-02 was written
            ("u2", "i3", "2025-01-03T10:00:00Z", "view")]
    new_day = [("u1", "i1", "2025-01-05T09:00:00Z", "view")]
    contract = _contract(EVENTS + late + new_day, ITEMS, tmp_path / "contract")
    second_job = datetime(2025, 1, 8, tzinfo=UTC)
    res = build_features(spark, contract, out, job_time=second_job)
    assert res["written_days"] == {"user_features": ["2025-01-05"], "item_features": ["2025-01-05"]}
    assert res["last_day"] == "2025-01-05"
    for table in ("user_features", "item_features"):
        after = recorded_partitions(out / table)
        assert {d: after[d]["sha256"] for d in before[table]} == {d: v["sha256"] for d, v in before[table].items()}
        assert res["partitions"][table] == {d: v["sha256"] for d, v in after.items()}
        assert set(after) == set(before[table]) | {"2025-01-05"}
    users = _read(out, "user_features")
    # Day 01-04 still says what serving saw then; day 01-05 counts the late events.
    pd.testing.assert_frame_equal(users[users["snapshot_date"] <= "2025-01-04"].reset_index(drop=True),
                                  tiny["users"], check_exact=True)
    u1 = _row(users, "user_id", "u1", "2025-01-05")
    assert (u1["user_total_interactions"], u1["user_n_purchase"]) == (7, 2)  # 5 + the late purchase + 01-05
    assert _row(users, "user_id", "u2", "2025-01-05")["user_total_interactions"] == 4  # 3 + the late view
    assert u1["created_timestamp"] == pd.Timestamp(second_job)


def test_days_not_over_yet_are_not_written(spark, tmp_path: Path) -> None:
    """Only complete UTC days: a run whose as_of falls in 2025-01-03 writes up to 2025-01-02."""
    from pipeline_tasks.features.snapshots import build_features

    res = build_features(spark, _contract(EVENTS, ITEMS, tmp_path / "c"), tmp_path / "out",
                         complete_before="2025-01-03T15:00:00Z", job_time=JOB_TIME)
    assert res["last_day"] == "2025-01-02"
    assert list(_files(tmp_path / "out" / "item_features"))[-1] == "snapshot_date=2025-01-02"


def test_local_cluster_matches_local(spark, synthetic_contract: Path, cluster_run: dict, tmp_path: Path) -> None:
    """The same job on local-cluster[2,1,1024] (two executor JVMs) writes exactly the local[*] output."""
    from pipeline_tasks.features.snapshots import build_features

    local = build_features(spark, synthetic_contract, tmp_path, job_time=CLUSTER_JOB_TIME)
    proc = cluster_run["proc"]
    stdout, _ = proc.communicate(timeout=900)
    tail = cluster_run["log"].read_text()[-3000:]
    assert proc.returncode == 0, f"local-cluster run failed:\n{tail}"
    remote = json.loads(stdout.strip().splitlines()[-1])
    assert remote["master"] == "local-cluster[2,1,1024]" and remote["executors"] == 2, remote
    assert remote["rows"] == local["rows"] and local["rows"]["user_features"] > 0
    for table in ("user_features", "item_features"):
        a, b = _read(tmp_path, table), _read(cluster_run["out"], table)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
