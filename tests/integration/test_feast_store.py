"""A real Feast repo (feature_repo/) over small hand-made daily snapshots, in a tmp RECSYS_HOME.

The snapshots have the layout build_features (pipeline_tasks/features.py, Spark) writes: parquet
partitioned by ``snapshot_date=YYYY-MM-DD``; day d's row is valid from ``event_timestamp`` = the end
of day d (midnight starting d + 1, UTC), ``created_timestamp`` the same. The dates are in 1998, like
MovieLens: far older than ``now - ttl``. Expected values come from a
brute-force point-in-time lookup over the same rows, never from Feast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.features import history
from pipeline_tasks.features import store as fs_store
from pipeline_tasks.online import feature_store as fs

pytestmark = pytest.mark.integration

DAYS = pd.date_range("1998-03-01", periods=5, freq="D", tz="UTC")
REDIS_URL = "127.0.0.1:6379"

USER_INT = ["user_total_interactions", "user_unique_items", "user_n_view", "user_n_click", "user_n_add_to_cart",
            "user_n_purchase", "user_n_favorite"]
USER_FLOAT = ["user_ctr", "user_conversion_rate", "user_days_since_last_event", "user_top1_share", "user_top2_share",
              "user_top3_share", "user_mean_session_events", "user_mean_session_minutes"]
USER_STR = ["user_top1_category", "user_top2_category", "user_top3_category", "user_last_items"]
ITEM_INT = ["item_n_view", "item_n_click", "item_n_purchase", "item_total_interactions", "item_unique_users",
            "item_interactions_30d"]
ITEM_FLOAT = ["item_ctr", "item_conversion_rate", "item_popularity", "item_trending_score", "item_age_days"]
ITEM_STR = ["item_category"]
# In the order of the feature views' schemas (= the brief's column order).
USER_FEATURES = [*USER_INT, "user_ctr", "user_conversion_rate", "user_days_since_last_event", "user_top1_category",
                 "user_top2_category", "user_top3_category", "user_top1_share", "user_top2_share", "user_top3_share",
                 "user_mean_session_events", "user_mean_session_minutes", "user_last_items"]
ITEM_FEATURES = ITEM_INT + ITEM_FLOAT + ITEM_STR

_KEYS = [("event_timestamp", pa.timestamp("us", tz="UTC")), ("created_timestamp", pa.timestamp("us", tz="UTC")),
         ("snapshot_date", pa.string())]
USER_SCHEMA = pa.schema([("user_id", pa.string()), *_KEYS, *((c, pa.int64()) for c in USER_INT),
                         *((c, pa.float64()) for c in USER_FLOAT), *((c, pa.string()) for c in USER_STR)])
ITEM_SCHEMA = pa.schema([("item_id", pa.string()), *_KEYS, *((c, pa.int64()) for c in ITEM_INT),
                         *((c, pa.float64()) for c in ITEM_FLOAT), *((c, pa.string()) for c in ITEM_STR)])

# Which days (indexes into DAYS) each entity has a snapshot for.
USER_DAYS = {"u_change": range(5), "u_late": range(3, 5), "u_gone": range(0, 1), "u_sparse": (0, 2, 4)}
ITEM_DAYS = {"i_pop": range(5), "i_new": range(2, 5), "i_old": range(0, 1)}


def end_of_day(day: pd.Timestamp) -> pd.Timestamp:
    """When day ``day``'s snapshot becomes valid: the midnight that ends it."""
    return day + pd.Timedelta(days=1)


def _stamp(day: pd.Timestamp) -> dict[str, Any]:
    return {"event_timestamp": end_of_day(day), "created_timestamp": end_of_day(day),
            "snapshot_date": day.strftime("%Y-%m-%d")}


def user_row(user_id: str, day: int) -> dict[str, Any]:
    """Every feature differs between days and users, so a wrong row is always visible."""
    v = 1000 * sorted(USER_DAYS).index(user_id) + 10 * day
    row = {"user_id": user_id, **_stamp(DAYS[day])}
    row |= {c: v + j for j, c in enumerate(USER_INT)}
    row |= {c: v / 7 + j for j, c in enumerate(USER_FLOAT)}
    row |= {"user_top1_category": f"cat{v}", "user_top2_category": f"cat{v + 1}" if day % 2 else None,
            "user_top3_category": None, "user_last_items": f"i{v}|i{v + 1}"}
    row["user_top2_share"] = row["user_top2_share"] if day % 2 else None
    row["user_top3_share"] = None
    return row


def item_row(item_id: str, day: int) -> dict[str, Any]:
    v = 1000 * sorted(ITEM_DAYS).index(item_id) + 10 * day
    row = {"item_id": item_id, **_stamp(DAYS[day])}
    row |= {c: v + j for j, c in enumerate(ITEM_INT)}
    row |= {c: v / 3 + j for j, c in enumerate(ITEM_FLOAT)}
    row["item_category"] = f"genre{v}"
    return row


def snapshots(days: range | tuple[int, ...] = range(5)) -> tuple[pd.DataFrame, pd.DataFrame]:
    users = [user_row(u, d) for u, ds in USER_DAYS.items() for d in ds if d in days]
    items = [item_row(i, d) for i, ds in ITEM_DAYS.items() for d in ds if d in days]
    return pd.DataFrame(users), pd.DataFrame(items)


def write_snapshots(settings: Settings, users: pd.DataFrame, items: pd.DataFrame) -> None:
    """Write as build_features does: one partition per snapshot_date, replacing that partition."""
    with fs_store.feature_store_lock(settings):
        for table, df, schema in (("user_features", users, USER_SCHEMA), ("item_features", items, ITEM_SCHEMA)):
            pq.write_to_dataset(pa.Table.from_pandas(df, schema=schema, preserve_index=False),
                                fs.offline_table_dir(table, settings), partition_cols=["snapshot_date"],
                                existing_data_behavior="delete_matching")


def expected_row(offline: pd.DataFrame, key: str, entity: str, at: pd.Timestamp,
                 ttl: timedelta) -> pd.Series | None:
    """Brute-force point-in-time lookup: the newest row valid at ``at`` and not older than the TTL."""
    rows = offline[(offline[key] == entity) & (offline["event_timestamp"] <= at)
                   & (offline["event_timestamp"] >= at - ttl)]
    return None if rows.empty else rows.sort_values(["event_timestamp", "created_timestamp"]).iloc[-1]


def assert_features_equal(actual: Any, expected: pd.Series | None, features: list[str], what: str) -> None:
    """``actual`` maps feature -> value; ``expected`` None means every feature must be null."""
    for feature in features:
        got = actual[feature]
        if expected is None or pd.isna(expected[feature]):
            assert pd.isna(got), f"{what}: {feature} should be null, got {got!r}"
        elif isinstance(expected[feature], float):
            assert got == pytest.approx(expected[feature]), f"{what}: {feature}"
        else:
            assert got == expected[feature], f"{what}: {feature}"


def settings_for(home: Path, monkeypatch: pytest.MonkeyPatch, profile: str = "embedded") -> Settings:
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("RECSYS_PROFILE", profile)
    monkeypatch.setenv("RECSYS_REDIS_URL", REDIS_URL)
    monkeypatch.delenv("RECSYS_ARTIFACT_ROOT", raising=False)
    return load_settings()


@pytest.fixture(scope="module")
def pit_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One applied repo with five days of snapshots, shared by the read-only tests of this module."""
    with pytest.MonkeyPatch.context() as mp:
        settings = settings_for(tmp_path_factory.mktemp("feast-pit"), mp)
        write_snapshots(settings, *snapshots())
        fs_store.apply_repo(settings)
        yield settings


@pytest.fixture(scope="module")
def pit_store(pit_settings: Settings) -> Any:
    return fs.get_store(pit_settings)


def test_apply_repo_registers_objects_and_is_idempotent(pit_settings: Settings, pit_store: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    assert {fv.name for fv in pit_store.list_feature_views()} == {"user_stats_fv", "item_stats_fv"}
    assert {s.name for s in pit_store.list_feature_services()} == {"ranker_v1", "two_tower_v1"}
    assert {e.name for e in pit_store.list_entities()} >= {"user", "item"}
    user_fv = pit_store.get_feature_view("user_stats_fv")
    assert fs.source_dir(user_fv.batch_source.path) == fs.offline_table_dir("user_features", pit_settings)
    assert user_fv.ttl == timedelta(days=3)

    with caplog.at_level("INFO", logger="pipeline_tasks.features.store"):
        again = fs_store.apply_repo(pit_settings)
    assert again["feature_views"] == ["item_stats_fv", "user_stats_fv"]
    assert "No changes to registry" in caplog.text


def test_apply_repo_registers_the_given_settings_paths_whatever_the_environment(pit_settings: Settings,
                                                                             tmp_path: Path) -> None:
    """feature_repo/ resolves its source paths from the settings being applied (home, namespace), not from a
    RECSYS_HOME that says otherwise: two sources never register each other's tables."""
    other = Settings(home=tmp_path / "elsewhere", artifact_root=tmp_path / "runs", namespace="shop_0123456789")
    assert os.environ["RECSYS_HOME"] != str(other.home)
    fs_store.apply_repo(other)
    store = fs.get_store(other)
    assert store.project == "recsys_shop_0123456789"
    assert other.feature_store_dir == tmp_path / "elsewhere" / "feature_store" / "shop_0123456789"
    for view in store.list_feature_views():
        assert fs.source_dir(view.batch_source.path).is_relative_to(other.feature_store_dir / "offline")
    # ... and the shared store of this module still points at its own tables.
    user_fv = fs.get_store(pit_settings).get_feature_view("user_stats_fv")
    assert fs.source_dir(user_fv.batch_source.path) == fs.offline_table_dir("user_features", pit_settings)


def test_training_set_is_point_in_time_correct(pit_store: Any) -> None:
    """The value valid at the label time, never a later one; valid from its event_timestamp on."""
    day = DAYS[2]
    at = [day + pd.Timedelta(hours=12), end_of_day(day), end_of_day(day) - pd.Timedelta(microseconds=1)]
    rows = pd.DataFrame({"user_id": "u_change", "item_id": "i_pop", "event_timestamp": at, "label": [1, 0, 1]})

    out = history.training_set(rows, "ranker_v1", store=pit_store)

    # Mid-day 2: day 1's snapshot (day 2's is stamped at the end of day 2; days 3-4 come later).
    assert out["user_total_interactions"].tolist() == [user_row("u_change", 1)["user_total_interactions"],
                                                       user_row("u_change", 2)["user_total_interactions"],
                                                       user_row("u_change", 1)["user_total_interactions"]]
    users, items = snapshots()
    ttl = pit_store.get_feature_view("user_stats_fv").ttl
    for i, t in enumerate(at):
        assert_features_equal(out.iloc[i], expected_row(users, "user_id", "u_change", t, ttl), USER_FEATURES, f"{i}")
        assert_features_equal(out.iloc[i], expected_row(items, "item_id", "i_pop", t, ttl), ITEM_FEATURES, f"{i}")


def mixed_requests() -> pd.DataFrame:
    """Requests out of time order, unknown entities, rows before any snapshot, past the TTL, duplicates."""
    t = DAYS
    requests = pd.DataFrame(
        [
            ("u_change", "i_pop", t[4] + pd.Timedelta(hours=6), 1),      # newest first: out of time order
            ("u_late", "i_pop", t[1] + pd.Timedelta(hours=12), 0),       # u_late's first row is later
            ("u_unknown", "i_pop", t[3], 1),                             # entity never seen
            ("u_change", "i_unknown", t[0] + pd.Timedelta(hours=12), 0),  # before any row / unknown item
            ("u_gone", "i_new", t[4] + pd.Timedelta(hours=12), 1),       # u_gone's only row is past the TTL
            ("u_change", "i_pop", t[4] + pd.Timedelta(hours=6), 0),      # duplicate key + time, other label
            ("u_sparse", "i_old", t[4] + pd.Timedelta(hours=1), 1),      # no day-3 row: day 2's, within TTL
            ("u_late", "i_new", t[4].tz_localize(None) + pd.Timedelta(hours=12), 0),  # naive = UTC
        ],
        columns=["user_id", "item_id", "event_timestamp", "label"],
        index=[70, 10, 60, 20, 50, 30, 40, 0],
    )
    return requests


def test_training_set_keeps_every_requested_row_in_order(pit_store: Any) -> None:
    """Feast 0.67's file store dropped, reordered, deduped and (for unknown entities) crashed; none of it here."""
    requests = mixed_requests()
    out = history.training_set(requests, "ranker_v1", store=pit_store)

    assert len(out) == len(requests)
    assert out.index.tolist() == requests.index.tolist()
    pd.testing.assert_frame_equal(out[requests.columns], requests)
    assert list(out.columns) == [*requests.columns, *USER_FEATURES, *ITEM_FEATURES]
    users, items = snapshots()
    ttl = pit_store.get_feature_view("user_stats_fv").ttl
    expected_user_rows = 0
    for i, (_, row) in enumerate(requests.iterrows()):
        at = pd.Timestamp(row["event_timestamp"])
        at = at.tz_localize("UTC") if at.tzinfo is None else at
        user = expected_row(users, "user_id", row["user_id"], at, ttl)
        expected_user_rows += user is not None
        assert_features_equal(out.iloc[i], user, USER_FEATURES, f"request {i} ({row['user_id']})")
        assert_features_equal(out.iloc[i], expected_row(items, "item_id", row["item_id"], at, ttl), ITEM_FEATURES,
                              f"request {i} ({row['item_id']})")
    assert expected_user_rows == 4  # the fixture exercises both outcomes
    assert out["user_total_interactions"].dtype == "Int64" and out["item_ctr"].dtype == "float64"
    # Asked in chunks of 3 rows (how millions of rows stay within memory): the very same answer.
    pd.testing.assert_frame_equal(history.training_set(requests, "ranker_v1", store=pit_store, chunk_rows=3), out)


@pytest.mark.spark
@pytest.mark.redis
def test_production_spark_offline_store_gives_the_same_training_set(pit_settings: Settings, pit_store: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The production profile reads the same snapshots through Feast's Spark store: same rows, same values."""
    _redis_client()
    settings = settings_for(pit_settings.home, monkeypatch, "production")
    settings = dataclasses.replace(settings, extra={**settings.extra,
                                                    "feast_project": f"recsys_test_{uuid.uuid4().hex[:10]}"})
    fs_store.apply_repo(settings)
    store = fs.get_store(settings)
    assert store.config.offline_store.type == "spark"
    assert type(store.get_feature_view("user_stats_fv").batch_source).__name__ == "SparkSource"
    requests = mixed_requests()
    expected = history.training_set(requests, "ranker_v1", store=pit_store)
    got = history.training_set(requests, "ranker_v1", store=store)
    pd.testing.assert_frame_equal(got, expected)


def test_a_run_reads_only_the_partitions_it_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads capped at the run's last day (``until``) give the same answer after a later partition lands."""
    settings = settings_for(tmp_path, monkeypatch)
    write_snapshots(settings, *snapshots(range(4)))  # the run recorded days 0..3
    fs_store.apply_repo(settings)
    store = fs.get_store(settings)
    until = history.end_of_day(DAYS[3].date().isoformat())
    assert until == end_of_day(DAYS[3])
    rows = pd.DataFrame({"user_id": ["u_change", "u_late"], "item_id": ["i_pop", "i_new"],
                         "event_timestamp": [DAYS[4] + pd.Timedelta(hours=36)] * 2})
    before = history.training_set(rows, "ranker_v1", store=store, until=until)
    assert before["user_total_interactions"].tolist() == [user_row("u_change", 3)["user_total_interactions"],
                                                          user_row("u_late", 3)["user_total_interactions"]]
    write_snapshots(settings, *snapshots((4,)))  # a later run adds day 4
    after = history.training_set(rows, "ranker_v1", store=store, until=until)
    pd.testing.assert_frame_equal(after, before)
    uncapped = history.training_set(rows, "ranker_v1", store=store)
    assert uncapped["user_total_interactions"].tolist()[0] == user_row("u_change", 4)["user_total_interactions"]


def test_training_sets_evaluation_and_index_reads_agree(pit_store: Any) -> None:
    """The evaluation windows' and the index build's reads (features_at) are the training set's read."""
    at = DAYS[4] + pd.Timedelta(hours=2)
    users, items = ["u_change", "u_late", "u_sparse", "u_unknown"], ["i_pop", "i_new", "i_old"]
    user_rows, item_rows = history.features_at(at, user_ids=users, item_ids=items, feature_service="ranker_v1",
                                               store=pit_store)
    pairs = pd.DataFrame({"user_id": users + ["u_change"] * 3, "item_id": ["i_pop"] * 4 + items,
                          "event_timestamp": at})
    both = history.training_set(pairs, "ranker_v1", store=pit_store)
    assert user_rows["user_id"].tolist() == users and item_rows["item_id"].tolist() == items
    pd.testing.assert_frame_equal(user_rows[USER_FEATURES].reset_index(drop=True),
                                  both[USER_FEATURES].iloc[:4].reset_index(drop=True))
    pd.testing.assert_frame_equal(item_rows[ITEM_FEATURES].reset_index(drop=True),
                                  both[ITEM_FEATURES].iloc[4:].reset_index(drop=True))
    assert user_rows["user_total_interactions"].notna().sum() == 3  # u_unknown: null, not dropped


def test_training_set_rejects_incomplete_entity_rows(pit_store: Any) -> None:
    with pytest.raises(ValueError, match="missing \\['event_timestamp'\\]"):
        history.training_set(pd.DataFrame({"user_id": ["u_change"], "item_id": ["i_pop"]}), "ranker_v1",
                             store=pit_store)
    with pytest.raises(ValueError, match="1 entity rows have a null"):
        history.training_set(pd.DataFrame({"user_id": [None], "item_id": ["i_pop"], "event_timestamp": [DAYS[2]]}),
                        "ranker_v1", store=pit_store)


def test_training_set_stage_writes_parquet(pit_settings: Settings, tmp_path: Path) -> None:
    entity_path = tmp_path / "entities.parquet"
    requests = pd.DataFrame({"user_id": ["u_late", "u_change", "nobody"], "item_id": ["i_new", "i_pop", "i_pop"],
                             "event_timestamp": [DAYS[4] + pd.Timedelta(hours=1)] * 3, "label": [1, 0, 1]})
    requests.to_parquet(entity_path)

    out = history.training_set_stage(entity_path, tmp_path / "out", feature_service="two_tower_v1",
                                     settings=pit_settings)

    written = pd.read_parquet(out["training_set"])
    assert out["rows"] == out["entity_rows"] == len(written) == 3
    assert written["user_id"].tolist() == ["u_late", "u_change", "nobody"]
    assert written["user_last_items"].tolist()[:2] == [user_row("u_late", 3)["user_last_items"],
                                                       user_row("u_change", 3)["user_last_items"]]
    assert written["user_last_items"].isna().tolist()[2]
    assert out["coverage"] == {"user_stats_fv": pytest.approx(2 / 3, abs=1e-4), "item_stats_fv": 1.0}


def _redis_client() -> Any:
    import redis

    host, port = REDIS_URL.split(":")
    client = redis.Redis(host=host, port=int(port), socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({exc}); the production-profile test needs it "
                    "(start redis-server; CI runs one)")
    return client


@pytest.mark.parametrize("profile", ["embedded", pytest.param("production", marks=pytest.mark.redis)])
def test_materialize_online_matches_latest_offline(profile: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Incremental materialization of 1998 data; online values = newest offline values at the end date."""
    settings = settings_for(tmp_path, monkeypatch, profile)
    project = f"recsys_test_{uuid.uuid4().hex[:10]}"
    settings = dataclasses.replace(settings, extra={**settings.extra, "feast_project": project})
    client = _redis_client() if profile == "production" else None
    try:
        write_snapshots(settings, *snapshots(range(4)))
        fs_store.apply_repo(settings)
        store = fs.get_store(settings)
        assert store.config.online_store.type == ("redis" if profile == "production" else "sqlite")

        first = fs_store.materialize(DAYS[3].date(), settings)
        assert {v["mode"] for v in first["feature_views"].values()} == {"initial"}
        # The interval comes from the data: end of day 3 minus the 3-day TTL, not from the wall clock.
        assert first["feature_views"]["user_stats_fv"]["start"] == (DAYS[4] - pd.Timedelta(days=3)).isoformat()
        # u_gone's day-0 row is exactly 3 days old at the end: still valid (both TTL bounds are inclusive).
        assert first["feature_views"]["user_stats_fv"]["entities"] == 4
        assert first["feature_views"]["item_stats_fv"]["entities"] == 3
        since = pd.Timestamp(first["feature_views"]["user_stats_fv"]["start"])
        _assert_online_is_latest_offline(settings, DAYS[3], since)

        write_snapshots(settings, *snapshots((4,)))  # the next day's job
        second = fs_store.materialize(DAYS[4].strftime("%Y-%m-%d"), settings)
        assert {v["mode"] for v in second["feature_views"].values()} == {"incremental"}
        assert second["feature_views"]["user_stats_fv"]["entities"] == 3  # u_change, u_late, u_sparse
        _assert_online_is_latest_offline(settings, DAYS[4], since)

        rerun = fs_store.materialize(DAYS[2].date(), settings)  # an older re-run never puts older values back
        assert {v["mode"] for v in rerun["feature_views"].values()} == {"up_to_date"}
        _assert_online_is_latest_offline(settings, DAYS[4], since)
    finally:
        if client is not None:
            fs.get_store(settings).teardown()
            leftover = list(client.scan_iter(match=b"*" + project.encode()))
            if leftover:
                client.delete(*leftover)
            assert not list(client.scan_iter(match=b"*" + project.encode()))


def _assert_online_is_latest_offline(settings: Settings, day: pd.Timestamp, since: pd.Timestamp) -> None:
    """Online = the newest offline row up to the end of ``day`` among rows materialized (since ``since``).

    The online store does not apply the TTL when read: an entity whose snapshots stopped keeps its
    last materialized values (u_gone after the second run).
    """
    store = fs.get_store(settings)
    users, items = snapshots(range(DAYS.get_loc(day) + 1))
    at = end_of_day(day)
    item_ids = [*ITEM_DAYS, "i_unknown"]
    for user_id in [*USER_DAYS, "u_unknown"]:
        user, item_df = fs.online_features(user_id, item_ids, store=store)
        latest = expected_row(users, "user_id", user_id, at, at - since)
        assert user["user_id"] == user_id
        assert_features_equal(user, latest, USER_FEATURES, f"online {user_id} at {day.date()}")
        assert item_df["item_id"].tolist() == item_ids
        for i, item_id in enumerate(item_ids):
            latest = expected_row(items, "item_id", item_id, at, at - since)
            assert_features_equal(item_df.iloc[i], latest, ITEM_FEATURES, f"online {item_id} at {day.date()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - localhost only
            return response.status, response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def test_feast_cli_apply_and_ui(pit_settings: Settings, tmp_path: Path) -> None:
    """What a user runs: ``feast -c feature_repo apply`` and ``feast -c feature_repo ui`` with RECSYS_HOME and
    RECSYS_NAMESPACE set (the store of one source)."""
    if importlib.util.find_spec("grpc_health") is None:
        pytest.fail("`feast ui` imports grpc_health (Feast 0.67's REST registry API) but it is not installed: "
                    "depend on feast[redis,spark,grpcio] (adds grpcio-health-checking, grpcio-reflection)")
    feast = str(Path(sys.executable).with_name("feast"))
    repo = str(fs.feature_repo_dir())
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    base_env["FEAST_USAGE"] = "False"
    port = _free_port()
    # The UI serves the registry apply_repo wrote (pit_settings); it starts while the CLI applies elsewhere.
    ui = subprocess.Popen([feast, "-c", repo, "ui", "-h", "127.0.0.1", "-p", str(port)],
                          env={**base_env, "RECSYS_HOME": str(pit_settings.home),
                               "RECSYS_NAMESPACE": pit_settings.namespace}, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        cli_home = tmp_path / "cli-home"
        (cli_home / "feature_store").mkdir(parents=True)  # Feast's file registry creates one directory level only
        applied = subprocess.run([feast, "-c", repo, "apply"],
                                 env={**base_env, "RECSYS_HOME": str(cli_home), "RECSYS_NAMESPACE": "cli_source"},
                                 cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "Created feature service ranker_v1" in applied.stdout, applied.stdout
        cli_settings = Settings(home=cli_home, artifact_root=cli_home / "runs", namespace="cli_source")
        assert (cli_settings.feature_store_dir / "registry.db").exists()
        assert {fv.name for fv in fs.get_store(cli_settings).list_feature_views()} == {"user_stats_fv",
                                                                                      "item_stats_fv"}

        deadline = time.monotonic() + 90
        status, body = 0, ""
        while time.monotonic() < deadline and ui.poll() is None:
            status, body = _get(f"http://127.0.0.1:{port}/")
            if status == 200:
                break
            time.sleep(1)
        if status != 200:
            os.killpg(ui.pid, signal.SIGTERM)
            pytest.fail(f"feast ui did not answer 200 (last: {status} {body[:200]}); output:\n"
                        f"{ui.communicate(timeout=30)[0][-3000:]}")
        assert "<html" in body.lower()
        project = f"recsys_{pit_settings.namespace}"
        status, body = _get(f"http://127.0.0.1:{port}/api/v1/feature_services?project={project}")
        assert status == 200 and "ranker_v1" in body and "two_tower_v1" in body, body[:500]
        status, body = _get(f"http://127.0.0.1:{port}/projects-list.json")
        assert status == 200 and f'"{project}"' in body, body[:500]
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
