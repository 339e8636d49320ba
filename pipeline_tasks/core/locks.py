"""Cross-process file locks for the long-lived state (feature store, index versions, run manifests)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def acquire_file_lock(path: Path, timeout: float, what: str = "feature store",
                       writers: str = "apply/materialize/build_features") -> IO[str]:
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
                fh.close()
                raise TimeoutError(f"{what} lock {path} still held after {timeout:.0f}s; another "
                                   f"{writers} is running (or hung: see the pid in the file)") from None
            time.sleep(0.2)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "since": datetime.now(UTC).isoformat()}))
    fh.flush()
    return fh
