"""Run-scoped directories and the run manifest.

Every DAG run writes under ``<artifact_root>/<run>/<task>/``, ``<run>`` being a path-safe form of
the run id (Spark and some URI parsers reject ``:`` and ``+``). A task's directory is replaced
when the task re-runs, so re-running overwrites and never duplicates. ``manifest.json`` collects
the config, the code version, input counts, the data snapshot hash and every task's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.constants import TABLES
from pipeline_tasks.core.locks import file_lock
from pipeline_tasks.core.settings import Settings, load_settings, project_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def safe_run_id(run_id: str) -> str:
    """A path- and URI-safe directory name for a run id (``manual__2025-01-01T00:00:00+00:00``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not safe:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return safe


def run_dir(run_id: str, settings: Settings | None = None) -> Path:
    """The artifact directory of one run."""
    settings = settings or load_settings()
    return settings.artifact_root / safe_run_id(run_id)


def code_version() -> dict[str, Any]:
    """The git commit of the code that runs (and whether the tree had local changes)."""
    root = project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "dirty": None}
    return {"git_sha": sha, "dirty": dirty}


def snapshot_hash(contract_dir: str | Path) -> str:
    """SHA-256 of the contract tables' content (column names and row values, in row order).

    Hashes values, not file bytes, so the same data written by another parquet version hashes the same.
    """
    digest = hashlib.sha256()
    for table in TABLES:
        path = Path(contract_dir) / f"{table}.parquet"
        if not path.exists():
            continue
        df = pd.read_parquet(path)
        digest.update(f"{table}:{','.join(map(str, df.columns))}:{len(df)}".encode())
        if len(df):
            digest.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return digest.hexdigest()


MANIFEST_LOCK_TIMEOUT_S = 300.0  # a manifest update takes milliseconds: a longer wait means a hung writer


def _locked(path: Path) -> contextlib.AbstractContextManager[Path]:
    """The run manifest's lock: a bounded wait that names the holder (tasks of one run update it in turn)."""
    return file_lock(path.with_suffix(".lock"), MANIFEST_LOCK_TIMEOUT_S, what="run manifest",
                     writers="task of this run")


def update_manifest(root: Path, **sections: Any) -> dict[str, Any]:
    """Merge ``sections`` into ``<root>/manifest.json`` (dict sections are merged one level deep)."""
    path = root / MANIFEST
    with _locked(path):
        manifest = json.loads(path.read_text()) if path.exists() else {}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        manifest["updated_at"] = datetime.now(UTC).isoformat()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(path)
    return manifest


def run_stage(run_id: str, task: str, fn: Callable[..., dict[str, Any]], /, **kwargs: Any) -> dict[str, Any]:
    """Run one stage into a fresh ``<run>/<task>/`` directory and record its outputs in the manifest.

    ``fn`` takes ``out_dir`` plus ``kwargs`` and returns a small dict of URIs and figures.
    """
    root = run_dir(run_id)
    out_dir = root / task
    if out_dir.exists():  # idempotent: a retry or a re-run replaces this task's outputs
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    started = datetime.now(UTC)
    try:
        outputs = fn(out_dir=out_dir, **kwargs)
    except Exception as exc:
        update_manifest(root, tasks={task: {"status": "failed", "error": str(exc), "started_at": started.isoformat()}})
        raise
    update_manifest(root, tasks={task: {"status": "success", "outputs": outputs, "started_at": started.isoformat(),
                                        "seconds": round((datetime.now(UTC) - started).total_seconds(), 2)}})
    return outputs


def start_run(run_id: str, config: dict[str, Any]) -> Path:
    """Open a run's manifest with its id, config and code version; returns the run directory."""
    root = run_dir(run_id)
    root.mkdir(parents=True, exist_ok=True)
    update_manifest(root, run_id=run_id, run_dir=str(root), config=config, code=code_version(),
                    started_at=datetime.now(UTC).isoformat())
    return root
