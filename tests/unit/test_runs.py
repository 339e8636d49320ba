"""Run directories, manifest and stage wrapper: path-safe, idempotent, traceable."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline_tasks.core.runs import (
    MANIFEST,
    run_dir,
    run_stage,
    safe_run_id,
    snapshot_hash,
    start_run,
    update_manifest,
)
from pipeline_tasks.data.contract import ContractTables, normalise_interactions, normalise_items, write_contract_dir


@pytest.mark.parametrize(
    ("run_id", "expected"),
    [
        ("manual__2025-01-01T00:00:00+00:00", "manual__2025-01-01T00_00_00_00_00"),
        ("scheduled__2025-01-01T00:00:00.123456+00:00", "scheduled__2025-01-01T00_00_00.123456_00_00"),
        ("a/../b", "a_.._b"),
    ],
)
def test_safe_run_id(run_id, expected):
    safe = safe_run_id(run_id)
    assert safe == expected
    assert not set(safe) & set(":+/ ")


def test_safe_run_id_rejects_empty():
    with pytest.raises(ValueError):
        safe_run_id("::")


def test_run_stage_overwrites_its_own_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_ARTIFACT_ROOT", str(tmp_path))
    calls = []

    def stage(out_dir, n):
        calls.append(n)
        (out_dir / f"file{n}.txt").write_text(str(n))
        return {"n": n, "dir": str(out_dir)}

    start_run("manual__x", config={"a": 1})
    run_stage("manual__x", "work", stage, n=1)
    out = run_stage("manual__x", "work", stage, n=2)
    files = sorted(p.name for p in (tmp_path / "manual__x" / "work").iterdir())
    assert files == ["file2.txt"]  # the first attempt's outputs are gone, not duplicated
    manifest = json.loads((tmp_path / "manual__x" / MANIFEST).read_text())
    assert manifest["tasks"]["work"]["outputs"] == out and manifest["config"] == {"a": 1}
    assert "git_sha" in manifest["code"]


def test_run_stage_records_failures(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_ARTIFACT_ROOT", str(tmp_path))

    def broken(out_dir):
        raise ValueError("bad input: column x")

    with pytest.raises(ValueError):
        run_stage("r1", "work", broken)
    manifest = json.loads((run_dir("r1") / MANIFEST).read_text())
    assert manifest["tasks"]["work"] == {**manifest["tasks"]["work"], "status": "failed",
                                         "error": "bad input: column x"}


def test_update_manifest_merges_sections(tmp_path):
    update_manifest(tmp_path, tasks={"a": 1}, data={"x": 1})
    m = update_manifest(tmp_path, tasks={"b": 2}, data={"y": 2}, other=3)
    assert m["tasks"] == {"a": 1, "b": 2} and m["data"] == {"x": 1, "y": 2} and m["other"] == 3


def _tables(values):
    inter = normalise_interactions(pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"],
                                                 "timestamp": [1_700_000_000, 1_700_000_100],
                                                 "event_type": ["view", "click"], "value": values}))
    return ContractTables(inter, normalise_items(pd.DataFrame({"item_id": ["i1", "i2"]})),
                          pd.DataFrame({"user_id": []}))


def test_snapshot_hash_depends_on_content_only(tmp_path):
    write_contract_dir(_tables([1.0, None]), tmp_path / "a")
    write_contract_dir(_tables([1.0, None]), tmp_path / "b")
    write_contract_dir(_tables([1.0, 2.0]), tmp_path / "c")
    assert snapshot_hash(tmp_path / "a") == snapshot_hash(tmp_path / "b")
    assert snapshot_hash(tmp_path / "a") != snapshot_hash(tmp_path / "c")


def test_run_config_is_resolved_once_and_read_back_from_the_manifest(tmp_path, monkeypatch, ml100k):
    """Later tasks read the config the run started with, even if the environment changed since."""
    from pipeline_tasks.core.runs import start_run
    from pipeline_tasks.stages.common import resolve_config, run_config, validation_config

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_QUALITY_THRESHOLD", "0.8")
    config = resolve_config({"source": f"movielens:{ml100k}", "horizon_days": 9000, "two_tower": None})
    assert config["quality_threshold"] == 0.8 and config["horizon_days"] == 9000  # settings, then params
    assert config["two_tower"] == {} and config["drift_mode"] == "warn"  # defaults where params are null
    start_run("manual__cfg", config=dict(config))
    monkeypatch.setenv("RECSYS_QUALITY_THRESHOLD", "0.99")
    assert run_config("manual__cfg") == config
    assert validation_config(run_config("manual__cfg")).quality_threshold == 0.8


def test_unknown_or_invalid_run_params_are_permanent_errors():
    from pipeline_tasks.core.errors import InvalidParamsError, PermanentError
    from pipeline_tasks.stages.common import resolve_config

    with pytest.raises(InvalidParamsError, match=r"unknown run params \['sourse'\]") as err:
        resolve_config({"sourse": "synthetic"})
    assert isinstance(err.value, PermanentError)
    with pytest.raises(InvalidParamsError, match="drift_mode='banana'"):
        resolve_config({"drift_mode": "banana"})


def test_manifest_lock_wait_is_bounded_and_names_the_holder(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    from pipeline_tasks.core import runs

    root = tmp_path / "run"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline_tasks.core.locks import file_lock\n"
        "with file_lock(Path(sys.argv[1]), 5, 'run manifest', 'test'):\n"
        "    print('held', flush=True); time.sleep(30)"), str(root / "manifest.lock")], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(runs, "MANIFEST_LOCK_TIMEOUT_S", 0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"run manifest lock .* by .*\"pid\": {holder.pid}"):
            runs.update_manifest(root, x=1)
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_stage_modules_load_no_spark_until_the_spark_task_runs():
    """Every DAG task imports its stage module; only build_features' body may start pyspark."""
    import subprocess
    import sys

    code = ("import sys; import pipeline_tasks.stages.data, pipeline_tasks.stages.features, "
            "pipeline_tasks.stages.evaluation, pipeline_tasks.stages.retrieval; print('pyspark' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert res.stdout.strip() == "False"
