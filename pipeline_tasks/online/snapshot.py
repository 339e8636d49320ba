"""A serving snapshot: what a service loads besides the fit, written once per (bundle version, moment).

``recsys serve`` and ``build_bento`` write it from the bundle's accepted data and the Feast offline store
(:func:`pipeline_tasks.bundle.recommend.write_snapshot`, the same reads as ``recsys recommend --as-of``), so a
serving process needs neither the contract reader nor Feast: it reads five parquet files and builds the
in-memory state (:func:`pipeline_tasks.online.two_stage.prepare`).

Files: ``history.parquet`` (interactions before the moment), ``items.parquet``, ``users.parquet`` (optional),
``user_rows.parquet`` / ``item_rows.parquet`` (Feast ``ranker_v1`` rows at the moment; optional) and
``snapshot.json`` (moment, bundle version, counts, checksums).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.online.two_stage import Moment

SNAPSHOT_FILE = "snapshot.json"
_TABLES = ("history", "items", "users", "user_rows", "item_rows")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_snapshot(moment: Moment, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``moment``'s tables and ``snapshot.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in _TABLES:
        frame = getattr(moment, name)
        if frame is None:
            continue
        path = out / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        files[name] = {"rows": len(frame), "sha256": _sha256(path)}
    info = {**meta, "at": moment.at.isoformat(), "files": files}
    (out / SNAPSHOT_FILE).write_text(json.dumps(info, indent=2, default=str))
    return out


def load_snapshot(path: str | Path, verify: bool = True) -> tuple[Moment, dict[str, Any]]:
    """The moment written by :func:`save_snapshot` and its ``snapshot.json``; with ``verify``, checksums are
    checked (a mismatch raises, naming the file)."""
    d = Path(path)
    info = json.loads((d / SNAPSHOT_FILE).read_text())
    frames: dict[str, pd.DataFrame | None] = {}
    for name in _TABLES:
        entry = info["files"].get(name)
        if entry is None:
            frames[name] = None
            continue
        file = d / f"{name}.parquet"
        if verify and _sha256(file) != entry["sha256"]:
            raise ValueError(f"serving snapshot {file} does not match its checksum in {d / SNAPSHOT_FILE}; "
                             "rebuild it (`recsys serve --rebuild-snapshot`)")
        frames[name] = pd.read_parquet(file)
    at = pd.Timestamp(info["at"])
    return Moment(at, frames["history"], frames["items"], frames["users"], frames["user_rows"],
                  frames["item_rows"]), info
