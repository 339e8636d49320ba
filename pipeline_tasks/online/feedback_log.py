"""The service's append-only log of impressions and feedback events, partitioned by table and UTC day.

Layout: ``<root>/<table>/date=YYYY-MM-DD/part-<host>-<pid>.jsonl``, one JSON object per line; tables
``feedback`` (every ``/feedback`` event) and ``impressions`` (every served item: request id, user, item,
position, model version, variant); the canary router writes ``ab_requests`` and ``ab_feedback`` (each with its
variant) to a log of its own. Each process appends to its own files, so workers never interleave lines.

Flush policy: a call to :meth:`FeedbackLog.append` hands its lines to the operating system in one ``write``
on an ``O_APPEND`` descriptor before it returns, so an acknowledged event survives ``kill -9`` of the service
(the kernel holds it). ``feedback`` lines are also ``fsync``-ed before the call returns (they survive a machine
crash); ``impressions`` are ``fsync``-ed at most ``sync_interval_s`` later by a background thread. A line cut
short by a crash mid-write is skipped, and counted, when the log is read.

:func:`feedback_interactions` turns logged feedback with contract event types into interactions rows, which a
training run ingests beside its source (``recsys run --feedback-log``); impressions never become interactions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.constants import EVENT_TYPE, EVENT_TYPES, ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.core.settings import Settings, load_settings

log = logging.getLogger(__name__)

TABLES = ("feedback", "impressions", "ab_requests", "ab_feedback")  # ab_*: the canary router's own log
DURABLE = frozenset({"feedback", "ab_feedback"})  # fsync-ed before append returns


def feedback_dir(namespace: str, settings: Settings | None = None) -> Path:
    """Where the services of a namespace log impressions and feedback (``RECSYS_FEEDBACK_DIR`` overrides it)."""
    override = os.environ.get("RECSYS_FEEDBACK_DIR")
    return Path(override) if override else (settings or load_settings()).home / "feedback" / namespace


class FeedbackLog:
    """Appends JSON lines to day partitions (see the module docstring)."""

    def __init__(self, root: str | Path, sync_interval_s: float = 1.0) -> None:
        self.root = Path(root)
        self._fds: dict[tuple[str, str], int] = {}
        self._dirty: set[int] = set()
        self._lock = threading.Lock()
        self._part = f"part-{socket.gethostname()}-{os.getpid()}.jsonl"
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, args=(sync_interval_s,), daemon=True,
                                        name="feedback-log-fsync")
        self._syncer.start()

    def _fd(self, table: str, day: str) -> int:
        key = (table, day)
        fd = self._fds.get(key)
        if fd is None:
            directory = self.root / table / f"date={day}"
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / self._part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fds[key] = fd
        return fd

    def append(self, table: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Write ``records`` to ``table``'s partition of their ``timestamp``'s day (now when missing)."""
        if table not in TABLES:
            raise ValueError(f"table={table!r}: use one of {TABLES}")
        by_day: dict[str, list[str]] = {}
        now = datetime.now(UTC)
        logged_at, today = now.isoformat(), now.strftime("%Y-%m-%d")
        for record in records:
            rec = dict(record)
            rec.setdefault("logged_at", logged_at)
            if rec.get(TIMESTAMP) or rec["logged_at"] != logged_at:
                ts = pd.Timestamp(rec.get(TIMESTAMP) or rec["logged_at"])
                day = (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).strftime("%Y-%m-%d")
            else:  # logged now: today's partition
                day = today
            by_day.setdefault(day, []).append(json.dumps(rec, default=str, separators=(",", ":")))
        with self._lock:
            for day, lines in by_day.items():
                fd = self._fd(table, day)
                data = ("\n".join(lines) + "\n").encode()
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                if table in DURABLE:
                    os.fsync(fd)
                else:
                    self._dirty.add(fd)

    def _sync_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sync()

    def sync(self) -> None:
        """fsync every file written since the last sync."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            try:
                os.fsync(fd)
            except OSError as exc:  # closed meanwhile
                log.debug("fsync skipped: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self.sync()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_log(root: str | Path, table: str) -> tuple[pd.DataFrame, int]:
    """All lines of ``table`` under ``root`` as a frame, and how many torn (unparseable) lines were skipped."""
    rows, torn = [], 0
    for path in sorted((Path(root) / table).glob("date=*/*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    torn += 1
    if torn:
        log.warning("%s log under %s: skipped %d torn line(s) (a crash mid-write)", table, root, torn)
    return pd.DataFrame(rows), torn


INTERACTION_COLUMNS = [USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE, "device", "location"]


def as_interactions(feedback: pd.DataFrame) -> pd.DataFrame:
    """Feedback lines (:func:`read_log`) with contract event types as interactions rows (``user_id, item_id,
    timestamp, event_type, device, location``); other event types are left out (they are not interactions)."""
    if not len(feedback):
        return pd.DataFrame(columns=INTERACTION_COLUMNS)
    df = feedback[feedback[EVENT_TYPE].isin(EVENT_TYPES)].copy()
    for col in INTERACTION_COLUMNS:
        if col not in df:
            df[col] = None
    df[TIMESTAMP] = pd.to_datetime(df[TIMESTAMP], utc=True, format="ISO8601")
    return df[INTERACTION_COLUMNS].reset_index(drop=True)


def feedback_interactions(root: str | Path) -> pd.DataFrame:
    """Every logged feedback event of a contract type under ``root``, as interactions rows (:func:`as_interactions`)."""
    df, _ = read_log(root, "feedback")
    return as_interactions(df)
