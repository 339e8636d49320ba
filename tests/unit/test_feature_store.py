"""Pure helpers of pipeline_tasks.features.store: config rendering, time bounds, alignment, the lock.

None of these imports Feast (it takes seconds); the real repo is exercised in
tests/integration/test_feature_store.py.
"""

from __future__ import annotations

import fcntl
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_tasks.core.settings import Settings
from pipeline_tasks.features import history
from pipeline_tasks.features import store as fs_store
from pipeline_tasks.online import feature_store as fs


def make_settings(home: Path, profile: str = "embedded", **extra: str) -> Settings:
    return Settings(home=home, artifact_root=home / "runs", profile=profile,
                    extra={"redis_url": "redis.example:6380,db=2", **extra})


# --- config ---------------------------------------------------------------------------------

def test_render_config_substitutes_variables_and_leaves_comments() -> None:
    template = "# uses ${RECSYS_HOME} and ${UNDOCUMENTED}\nregistry: ${RECSYS_HOME}/fs/registry.db\nport: $PORT\n"
    out = fs.render_config(template, {"RECSYS_HOME": "/data/home"})
    assert out == "# uses ${RECSYS_HOME} and ${UNDOCUMENTED}\nregistry: /data/home/fs/registry.db\nport: $PORT\n"


def test_render_config_names_missing_variables() -> None:
    with pytest.raises(KeyError, match=r"\['A', 'B'\]"):
        fs.render_config("x: ${B}\ny: ${A}\nz: ${C}\n", {"C": "1"})


def test_embedded_config_puts_all_state_under_the_feature_store_dir(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    config = fs.repo_config_dict(settings)
    assert config["project"] == "recsys_default"  # the settings' namespace (RECSYS_NAMESPACE)
    assert config["provider"] == "local"
    assert config["offline_store"] == {"type": "duckdb"}  # exact point-in-time joins at millions of rows
    assert config["online_store"] == {"type": "sqlite", "path": str(settings.feature_store_dir / "online_store.db")}
    assert config["registry"] == str(settings.feature_store_dir / "registry.db")


def test_production_config_uses_redis_from_settings(tmp_path: Path) -> None:
    config = fs.repo_config_dict(make_settings(tmp_path, profile="production", feast_project="recsys_ci_1"))
    assert config["online_store"] == {"type": "redis", "connection_string": "redis.example:6380,db=2"}
    assert config["project"] == "recsys_ci_1"
    assert config["registry"] == str(tmp_path / "feature_store" / "default" / "registry.db")
    assert config["offline_store"]["type"] == "spark"
    assert config["offline_store"]["spark_conf"]["spark.master"] == "local[*]"  # RECSYS_SPARK_MASTER's default


def test_profiles_share_everything_but_the_stores() -> None:
    """The production yaml differs from the default only where the architecture says it should."""
    default = yaml.safe_load((fs.feature_repo_dir() / "feature_store.yaml").read_text())
    production = yaml.safe_load((fs.feature_repo_dir() / "feature_store.production.yaml").read_text())
    stores = ("online_store", "offline_store")
    assert {k: v for k, v in default.items() if k not in stores} == {
        k: v for k, v in production.items() if k not in stores}
    assert (default["offline_store"]["type"], production["offline_store"]["type"]) == ("duckdb", "spark")
    # plain `feast` CLI: env expansion of the home and the source's namespace
    assert default["registry"] == "${RECSYS_HOME}/feature_store/${RECSYS_NAMESPACE}/registry.db"
    assert default["project"] == "recsys_${RECSYS_NAMESPACE}"
    assert production["online_store"]["connection_string"] == "${RECSYS_REDIS_URL}"


def test_each_namespace_has_its_own_store_and_project(tmp_path: Path) -> None:
    shop = Settings(home=tmp_path, artifact_root=tmp_path / "runs", namespace="shop_0123456789")
    config = fs.repo_config_dict(shop)
    assert config["project"] == "recsys_shop_0123456789"
    assert config["registry"] == str(tmp_path / "feature_store" / "shop_0123456789" / "registry.db")
    assert fs.offline_table_dir("item_features", shop).parent.parent == tmp_path / "feature_store" / "shop_0123456789"


def test_source_namespaces_follow_the_source_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A growing directory is one source; other generator settings, paths or sources are others."""
    from pipeline_tasks.core.namespace import source_namespace

    monkeypatch.chdir(tmp_path)
    shop = tmp_path / "Shop Export"
    shop.mkdir()
    first = source_namespace(str(shop))
    (shop / "interactions.csv").write_text("more rows")
    assert source_namespace(str(shop)) == first == source_namespace("Shop Export")  # same place, same source
    assert first.startswith("shop_export_")
    assert source_namespace("synthetic", {"seed": 1}) != source_namespace("synthetic", {"seed": 2})
    assert source_namespace("synthetic", {"seed": 1, "n_users": 5}) == source_namespace("synthetic",
                                                                                         {"n_users": 5, "seed": 1})
    names = {first, source_namespace("synthetic"), source_namespace("movielens:ml-100k"),
             source_namespace(str(tmp_path / "other"))}
    assert len(names) == 4
    assert all(n.replace("_", "").isalnum() and n == n.lower() for n in names)  # a Feast project suffix


def test_unknown_profile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RECSYS_PROFILE='staging'"):
        fs.config_template(make_settings(tmp_path, profile="staging"))


def test_offline_table_dirs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert (fs.offline_table_dir("user_features", settings)
            == tmp_path / "feature_store" / "default" / "offline" / "user_features")
    with pytest.raises(ValueError, match="unknown offline table"):
        fs.offline_table_dir("users", settings)


# --- materialization bounds -------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    (date(1998, 3, 4), datetime(1998, 3, 5, tzinfo=UTC)),
    ("1998-03-04", datetime(1998, 3, 5, tzinfo=UTC)),
    (datetime(1998, 3, 4, 12, 30), datetime(1998, 3, 4, 12, 30, tzinfo=UTC)),
    ("1998-03-04T12:30:00+02:00", datetime(1998, 3, 4, 10, 30, tzinfo=UTC)),
])
def test_materialize_end(given: object, expected: datetime) -> None:
    """A day means the whole day, so it includes that day's snapshot stamped at its end."""
    end = fs_store.materialize_end(given)  # type: ignore[arg-type]
    assert end == expected
    assert end.tzinfo is not None and end.utcoffset() == timedelta(0)


# --- restoring the request order from the store's answer -------------------------------------------------

def _ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def test_attach_by_row_id_keeps_order_index_duplicates_and_missing_rows() -> None:
    requests = pd.DataFrame({
        "user_id": ["b", "a", "c", "b", "a"],
        "event_timestamp": [_ts("2024-01-03"), _ts("2024-01-01"), _ts("2024-01-02"), _ts("2024-01-03"),
                            _ts("2024-01-02")],
        "label": [1, 0, 1, 0, 1],
    }, index=[9, 7, 5, 3, 1])
    # The store's answer: in its own order (by time), no row for positions 2 ("c") and 4.
    features = pd.DataFrame({history.ROW_ID: [1, 3, 0], "f": [10.0, 30.0, 30.0], "g": ["x", "y", "y"]})
    out = history.attach_by_row_id(requests, features, ["f", "g"])
    assert out.index.tolist() == [9, 7, 5, 3, 1]
    pd.testing.assert_frame_equal(out[requests.columns], requests)
    assert out["f"].tolist()[:2] == [30.0, 10.0] and out["f"].isna().tolist() == [False, False, True, False, True]
    assert out["g"].tolist()[:2] == ["y", "x"] and out["g"].tolist()[3] == "y"


def test_attach_by_row_id_refuses_a_duplicated_row() -> None:
    requests = pd.DataFrame({"user_id": ["a", "b"], "event_timestamp": [_ts("2024-01-01")] * 2})
    features = pd.DataFrame({history.ROW_ID: [0, 0, 1], "f": [1, 2, 3]})
    with pytest.raises(RuntimeError, match="1 duplicate rows"):
        history.attach_by_row_id(requests, features, ["f"])


def test_attach_by_row_id_refuses_to_overwrite_caller_columns() -> None:
    requests = pd.DataFrame({"user_id": ["a"], "event_timestamp": [_ts("2024-01-01")], "f": [1]})
    with pytest.raises(ValueError, match=r"\['f'\]"):
        history.attach_by_row_id(requests, requests.assign(**{history.ROW_ID: [0]}), ["f"])


def test_with_dtypes_is_stable_with_and_without_nulls() -> None:
    view = fs.ViewFeatures(view="v", join_key="user_id", features=("n", "x", "s"),
                           dtypes=("Int64", "float64", object), source_path="")
    df = pd.DataFrame({"n": [1.0, float("nan")], "x": [None, 0.5], "s": ["a", float("nan")]})
    out = fs.with_dtypes(df, [view])
    assert out["n"].dtype == "Int64" and out["n"].isna().tolist() == [False, True]
    assert out["x"].dtype == "float64"
    assert out["s"].tolist() == ["a", None]


# --- the writers' lock ------------------------------------------------------------------------

def _try_flock(path: Path) -> bool:
    """Another open file description: what another process would get."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_lock_excludes_other_processes_and_is_reentrant(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with fs_store.feature_store_lock(settings) as path:
        assert path == settings.feature_store_dir / ".lock"
        assert not _try_flock(path)
        with fs_store.feature_store_lock(settings):  # apply inside a caller's locked block must not deadlock
            assert not _try_flock(path)
        assert not _try_flock(path)
        assert '"pid"' in path.read_text()
    assert _try_flock(path)


def test_lock_times_out_with_a_useful_message(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    path = settings.feature_store_dir / ".lock"
    path.parent.mkdir(parents=True)
    with open(path, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="still held after"), fs_store.feature_store_lock(settings, timeout=0.3):
            pass


def test_lock_serialises_threads(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    inside: list[int] = []
    overlaps: list[bool] = []

    def work() -> None:
        for _ in range(20):
            with fs_store.feature_store_lock(settings):
                inside.append(1)
                overlaps.append(len(inside) > 1)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 80 and not any(overlaps)
