"""Cross-process file locks for the long-lived state (feature store, index versions, run manifests)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def acquire_file_lock(path: Path, timeout: float, what: str = "feature store",
                       writers: str = "apply/materialize/build_features") -> IO[str]:
    """Take the exclusive ``fcntl`` lock on ``path``, waiting at most ``timeout`` seconds.

    The holder's pid and start time are written into the file, so a waiter can say who holds it.
    Raises TimeoutError naming the holder. Release with :func:`release_file_lock`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - closed when the lock is released
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not waited:
                fh.seek(0)
                log.info("waiting for the %s lock %s (held by %s)", what, path, fh.read().strip() or "?")
                waited = True
            if time.monotonic() >= deadline:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise TimeoutError(f"{what} lock {path} still held after {timeout:.0f}s by {holder}; another "
                                   f"{writers} is running (or hung: check that pid)") from None
            time.sleep(0.2)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(UTC).isoformat()}))
    fh.flush()
    return fh


def release_file_lock(fh: IO[str]) -> None:
    """Release a lock taken by :func:`acquire_file_lock`."""
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str, writers: str) -> Iterator[Path]:
    """Hold :func:`acquire_file_lock`'s lock for the ``with`` block."""
    fh = acquire_file_lock(path, timeout, what=what, writers=writers)
    try:
        yield path
    finally:
        release_file_lock(fh)
