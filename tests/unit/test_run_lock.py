"""One `recsys run` per RECSYS_HOME: a second is refused naming the first, or queued with --wait."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from pipeline_tasks.core.run_lock import RunInProgressError, lock_path, read_holder, run_lock

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline_tasks.core.run_lock import run_lock
    with run_lock(Path(sys.argv[1]), {"source": "movielens:/data/ml-100k", "log": "/tmp/first.log"}):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(home, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    first = _holder(tmp_path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(RunInProgressError) as err, run_lock(tmp_path, {"source": "synthetic"}):
            pass
        assert time.monotonic() - started < 2  # at once, no waiting
        message = str(err.value)
        assert f"pid {first.pid}" in message and "data movielens:/data/ml-100k" in message
        assert "log /tmp/first.log" in message and "--wait" in message and f"kill {first.pid}" in message
        assert err.value.holder["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


def test_wait_queues_behind_the_running_one_then_records_itself(tmp_path):
    import os

    first = _holder(tmp_path, 2)
    told = []
    started = time.monotonic()
    with run_lock(tmp_path, {"source": "synthetic"}, wait=True, on_wait=told.append):
        waited = time.monotonic() - started
        assert read_holder(lock_path(tmp_path))["pid"] == os.getpid()
    first.wait()
    assert told and told[0]["pid"] == first.pid and waited > 1  # it waited for the first to end
    with run_lock(tmp_path, {"source": "synthetic"}):  # released on exit
        pass
