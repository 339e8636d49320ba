"""One ``recsys run`` at a time per ``RECSYS_HOME``.

``airflow dags test`` ignores the DAG's ``max_active_runs``: two runs at once would both train and
publish, and what is served would come from whichever finished ``build_index`` last. ``recsys run``
holds this lock for the whole run; a second run is refused (naming the running one) or, with
``--wait``, queued behind it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline_tasks.core.locks import acquire_file_lock, release_file_lock

RUN_LOCK = "run.lock"
FOREVER = float("inf")


class RunInProgressError(RuntimeError):
    """Another ``recsys run`` holds the run lock of this home; ``holder`` says which."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def lock_path(home: Path) -> Path:
    """The run lock of a ``RECSYS_HOME``."""
    return home / RUN_LOCK


def read_holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file (pid, start, data source, log), or ``{}``."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    """``pid 123, started 2026-... (4 min ago), data synthetic, log ...`` for a message."""
    since = holder.get("since")
    age = ""
    if since:
        with contextlib.suppress(ValueError):
            seconds = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
            age = f" ({seconds:.0f} s ago)" if seconds < 120 else f" ({seconds / 60:.0f} min ago)"
    parts = [f"pid {holder.get('pid', '?')}", f"started {since or '?'}{age}", f"data {holder.get('source', '?')}"]
    if holder.get("log"):
        parts.append(f"log {holder['log']}")
    return ", ".join(parts)


@contextlib.contextmanager
def run_lock(home: Path, info: dict[str, Any], wait: bool = False,
             on_wait: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Path]:
    """Hold the run lock of ``home`` for the ``with`` block, recording ``info`` (source, log) as the holder.

    Without ``wait`` a held lock raises :class:`RunInProgressError` at once; with it, ``on_wait`` is told
    who holds it and the call waits until that run ends.
    """
    path = lock_path(home)
    try:
        fh = acquire_file_lock(path, 0, what="recsys run", writers="recsys run")
    except TimeoutError:
        holder = read_holder(path)
        if not wait:
            raise RunInProgressError(
                f"another `recsys run` is running on {home}: {describe(holder)}. Wait until it ends, or run "
                f"again with --wait to start when it is done (or stop it: kill {holder.get('pid', 'PID')}).",
                holder) from None
        if on_wait:
            on_wait(holder)
        fh = acquire_file_lock(path, FOREVER, what="recsys run", writers="recsys run")
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(UTC).isoformat(), **info}))
        fh.flush()
        yield path
    finally:
        release_file_lock(fh)
