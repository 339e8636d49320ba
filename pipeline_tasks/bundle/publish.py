"""Serving snapshots a running service swaps in on its own: written and pointed at, per bundle version.

A service (``recsys serve``, or a Bento with ``RECSYS_HOME`` set) reads ``current.json`` in its version's serving
directory, ``$RECSYS_HOME/serving/<model>/v<version>/``, every ``RECSYS_REFRESH_S`` seconds and swaps in the
snapshot it names (see ``serving/service.py``). :func:`publish_snapshots` is what the hourly
``recsys_item_refresh`` DAG runs after extending the indexes: for every version a live alias points at, it writes a
new snapshot whenever one of what the snapshot is made of changed since the one pointed at --

- ``as_of``: the newest event of the version's data + 1 s (never before the bundle's own ``as_of``), so the
  history, the trending windows and the recently-seen filter move with the data;
- ``features_end``: the newest materialised feature day of the namespace (a later training run's features);
- ``index_dir``: the newest verified index extension (the items the refresh just made retrievable);
- ``data_dir``: where the history and the catalog are read --

and points ``current.json`` at it (atomic rename). Nothing changed: nothing is written. Old snapshots beyond the
newest :data:`KEEP` are removed (never the one pointed at).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.bundle.recommend import newest_snapshot_end, snapshot_moment, write_snapshot
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.bundle import Bundle, load_bundle
from pipeline_tasks.online.index import serving_index_dir
from pipeline_tasks.online.snapshot import SNAPSHOT_FILE

log = logging.getLogger(__name__)

POINTER = "current.json"
KEEP = 3  # published snapshots kept per version (the pointed one always)
KEY_FIELDS = ("as_of", "data_dir", "features_end", "index_dir")


def serving_dir(bundle: Bundle, settings: Settings | None = None) -> Path:
    """``$RECSYS_HOME/serving/<model>/v<version>``: the version's snapshots and its ``current.json``."""
    return (settings or load_settings()).home / "serving" / bundle.name / f"v{bundle.version}"


def point_snapshot(snapshot_dir: Path) -> Path:
    """Make ``snapshot_dir`` the one its version's services serve: ``current.json`` beside it, replaced atomically
    (a running service swaps to it within ``RECSYS_REFRESH_S``). Returns the pointer's path."""
    pointer = snapshot_dir.parent / POINTER
    tmp = pointer.with_name(f".{POINTER}.{os.getpid()}")
    tmp.write_text(json.dumps({"snapshot": str(snapshot_dir)}))
    os.replace(tmp, pointer)
    return pointer


def pointed_snapshot(version_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The snapshot ``current.json`` names and its ``snapshot.json`` (None when there is none or it is gone)."""
    pointer = version_dir / POINTER
    if not pointer.exists():
        return None
    target = Path(json.loads(pointer.read_text())["snapshot"])
    info = target / SNAPSHOT_FILE
    return (target, json.loads(info.read_text())) if info.exists() else None


def data_moment(bundle: Bundle, data_dir: Path | None) -> pd.Timestamp:
    """The moment a fresh snapshot answers at: 1 s after the data's newest event, never before the bundle's as_of."""
    from pipeline_tasks.data.contract import newest_event

    newest = newest_event(data_dir if data_dir is not None else Path(bundle.meta["accepted_dir"]))
    base = snapshot_moment(bundle)
    return base if newest is None else max(base, newest + pd.Timedelta(seconds=1))


def snapshot_key(bundle: Bundle, data_dir: Path | None, settings: Settings | None = None) -> dict[str, str]:
    """What a snapshot of ``bundle`` published now would be made of (:data:`KEY_FIELDS`)."""
    import dataclasses

    settings = settings or load_settings()
    ns = dataclasses.replace(settings, namespace=bundle.meta["namespace"])
    features = newest_snapshot_end(ns)
    return {"as_of": data_moment(bundle, data_dir).isoformat(),
            "data_dir": str(data_dir or bundle.meta.get("accepted_dir")),
            "features_end": features.isoformat() if features is not None else "",
            "index_dir": str(serving_index_dir(bundle, settings))}


def changed(current: dict[str, Any] | None, key: dict[str, str]) -> list[str]:
    """The fields of ``key`` that differ from the pointed snapshot's record (all of them when there is none)."""
    recorded = (current or {}).get("published") or {}
    return [f for f in KEY_FIELDS if str(recorded.get(f)) != str(key.get(f))]


def publish_snapshot(bundle: Bundle, data_dir: Path | None = None, settings: Settings | None = None,
                     force: bool = False) -> dict[str, Any]:
    """Write and point at a new serving snapshot of ``bundle`` if anything it is made of changed (see the module
    docstring). Returns ``status`` (``published`` / ``up_to_date``), the snapshot, the pointer and what changed."""
    settings = settings or load_settings()
    root = serving_dir(bundle, settings)
    key = snapshot_key(bundle, data_dir, settings)
    current = pointed_snapshot(root)
    diff = changed(current[1] if current else None, key)
    entry: dict[str, Any] = {"name": bundle.name, "version": bundle.version, **key, "pointer": str(root / POINTER)}
    if not diff and not force:
        log.info("%s version %d: serving snapshot %s is up to date", bundle.name, bundle.version, current[0])
        return {**entry, "status": "up_to_date", "snapshot": str(current[0]), "changed": []}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    target = root / f"published-{pd.Timestamp(key['as_of']).strftime('%Y%m%dT%H%M%S')}-{digest}"
    if target.exists():  # an interrupted earlier publish of the same key, or a retry: write it again
        shutil.rmtree(target)
    tmp = root / f".{target.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fit = (current[1].get("fit") if current else None) or "serving"  # the fit the version's services load
    write_snapshot(bundle, tmp, key["as_of"], data_dir=data_dir, fit=fit, settings=settings,
                   extra={"published": key})
    os.replace(tmp, target)
    pointer = point_snapshot(target)
    _prune(root, keep=target)
    log.info("%s version %d: published serving snapshot %s (changed: %s); running services swap it in within "
             "RECSYS_REFRESH_S", bundle.name, bundle.version, target, ", ".join(diff))
    return {**entry, "status": "published", "snapshot": str(target), "pointer": str(pointer), "changed": diff}


def _prune(root: Path, keep: Path) -> None:
    """Remove published snapshots beyond the newest :data:`KEEP` (by modification time), never ``keep``."""
    published = sorted(root.glob("published-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in published[KEEP:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _contract_dir(source: str | None) -> Path | None:
    """``source`` as a contract directory (one holding an interactions table), else None."""
    from pipeline_tasks.data.contract import find_table

    if not source or not Path(source).is_dir():
        return None
    return Path(source) if find_table(Path(source), "interactions") else None


def _training_dir(bundle: Bundle) -> Path | None:
    """The version's training source when it is a contract directory (None when it records none)."""
    from pipeline_tasks.core.errors import InvalidParamsError
    from pipeline_tasks.retrieval.refresh import bundle_catalog

    try:
        return _contract_dir(bundle_catalog(bundle).get("source"))
    except InvalidParamsError:
        return None


def _served_data(bundle: Bundle, settings: Settings) -> Path | None:
    """The contract directory the version's services were started on (``recsys serve --data``), if any."""
    current = pointed_snapshot(serving_dir(bundle, settings))
    recorded = (current[1].get("data_dir") if current else None) or ""
    if recorded and recorded != str(bundle.meta.get("accepted_dir")):
        return _contract_dir(recorded)
    return None


def publish_snapshots(out_dir: str | Path, source: str | None = None,
                      settings: Settings | None = None) -> dict[str, Any]:
    """:func:`publish_snapshot` for every version a live alias points at. The data is ``source`` when it is a
    contract directory, else the one the version's services were started on (``recsys serve --data``), else the
    version's training source when that is a contract directory, else the bundle's accepted data.
    If one version fails, the others are still published and the first error is raised."""
    from pipeline_tasks.retrieval.refresh import live_versions

    settings = settings or load_settings()
    entries, errors = [], []
    live = live_versions(settings)
    if not live:
        return {"status": "no_model", "snapshots": []}
    for name, version, aliases in live:
        try:
            bundle = load_bundle(name, version=version, settings=settings)
            data_dir = _contract_dir(source) or _served_data(bundle, settings) or _training_dir(bundle)
            entries.append({**publish_snapshot(bundle, data_dir, settings), "aliases": aliases})
        except Exception as exc:  # one broken version must not keep the others stale
            log.error("publishing the serving snapshot of %s version %d failed: %s", name, version, exc)
            errors.append((f"{name} version {version}", exc))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "snapshots.json").write_text(json.dumps(entries, indent=2))
    if errors:
        first = errors[0][1]
        first.add_note(f"snapshot publishing failed for {'; '.join(w for w, _ in errors)}")
        raise first
    status = "published" if any(e["status"] == "published" for e in entries) else "up_to_date"
    return {"status": status, "snapshots": entries, "published": sum(e["status"] == "published" for e in entries)}
