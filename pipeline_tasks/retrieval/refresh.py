"""The hourly item refresh: new catalog items become retrievable in every live bundle without retraining.

What is served is decided by the registry's aliases alone (``champion``, ``challenger``; see
:mod:`pipeline_tasks.online.bundle`). A bundle is immutable, so the refresh never edits it: for every registered
version a live alias points at, it embeds the catalog items that the version's serving index lacks (from content,
category and genres: the item tower needs no interactions) with the bundle's own serving two-tower model and writes
the next *extension* of its index under ``$RECSYS_HOME/indexes/<model>/v<version>/r0001/``, ``r0002/`` ... with its
own checksums and a ``parent`` pointing back at what it extends (the bundle's ``index/`` or the previous
extension) and at the bundle. Serving loads the newest extension whose chain verifies
(:func:`pipeline_tasks.online.index.serving_index_dir`). Writers take the index lock, so two refreshes never
interleave.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID
from pipeline_tasks.core.errors import InvalidParamsError, VersionExistsError
from pipeline_tasks.core.locks import file_lock
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.bundle import ALIASES, Bundle, aliases_of, load_bundle, registered_models
from pipeline_tasks.online.index import META_FILE, extension_dir, extension_dirs, load_serving_index

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0
NO_MODEL = "no registered champion/challenger yet: run recsys_training first"


def index_lock(settings: Settings | None = None,
               timeout: float = LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[Path]:
    """Hold the index writers' lock (``$RECSYS_HOME/indexes/.lock``) across processes."""
    settings = settings or load_settings()
    return file_lock(settings.index_dir / ".lock", timeout, what="index", writers="item refresh")


def catalog_recipe(source: str, synthetic: dict[str, Any] | None = None) -> dict[str, Any]:
    """How to read a run's catalog again later, from any working directory: the source with absolute paths,
    and for ``synthetic`` the generator settings (another seed or size is another catalog)."""
    if source == "synthetic":
        return {"source": source, "synthetic": dict(synthetic or {})}
    if source.startswith("movielens:"):
        return {"source": "movielens:" + str(Path(source.removeprefix("movielens:")).expanduser().resolve())}
    return {"source": str(Path(source).expanduser().resolve())}


def catalog_items(source: str, synthetic: dict[str, Any] | None = None) -> pd.DataFrame:
    """The catalog's items table from a data source (a contract directory, an items file, or a built-in source;
    ``synthetic`` holds the generator settings when ``source`` is ``synthetic``)."""
    from pipeline_tasks.data.contract import normalise_items
    from pipeline_tasks.data.ingest import load_source

    path = Path(source)
    if path.is_file():
        raw = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
        return normalise_items(raw)
    return load_source(source, synthetic).items


def _item_id_rule() -> re.Pattern[str]:
    """The contract's id rule as the items suite states it (``expectations/items.json``): one definition."""
    from pipeline_tasks.data.validate import load_suite

    for exp in load_suite("items")["expectations"]:
        if exp["meta"].get("reason") == "invalid_item_id":
            return re.compile(exp["kwargs"]["regex"])
    raise RuntimeError("expectations/items.json has no 'invalid_item_id' expectation")


def _valid_ids(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split items into those with a valid id (contract id rule) and the rest, with a reason."""
    rule = _item_id_rule()
    ids = items[ITEM_ID]
    ok = ids.notna() & ids.astype(str).map(lambda s: bool(rule.match(s)))
    dup = items[ITEM_ID].duplicated(keep="first") & ok
    bad = items[~ok | dup].assign(reason=np.where(dup[~ok | dup], "duplicate_item_id", "invalid_item_id"))
    return items[ok & ~dup].reset_index(drop=True), bad.reset_index(drop=True)


def live_versions(settings: Settings | None = None) -> list[tuple[str, int, list[str]]]:
    """(model, version, aliases) of every registered recsys model version a live alias points at."""
    out = []
    for name in registered_models(settings):
        by_version: dict[int, list[str]] = {}
        for alias, version in sorted(aliases_of(name, settings).items()):
            if alias in ALIASES:
                by_version.setdefault(version, []).append(alias)
        out.extend((name, version, aliases) for version, aliases in sorted(by_version.items()))
    return out


def bundle_catalog(bundle: Bundle) -> dict[str, Any]:
    """The catalog recipe a bundle was trained from: its index's provenance (``index/index.json`` ``parent``), else
    the run config recorded in ``bundle.json``."""
    meta_path = Path(bundle.path) / "index" / META_FILE
    provenance = (json.loads(meta_path.read_text()).get("parent") or {}) if meta_path.exists() else {}
    if provenance.get("source"):
        return {k: provenance[k] for k in ("source", "synthetic") if k in provenance}
    config = (bundle.meta or {}).get("config") or {}
    if config.get("source"):
        return catalog_recipe(config["source"], config.get("synthetic"))
    raise InvalidParamsError(f"{bundle.name} version {bundle.version} records no catalog source (neither "
                             f"{meta_path} nor bundle.json); pass one: `recsys refresh --source DIR`")


def write_extension(bundle: Bundle, base_dir: str | Path, vectors: np.ndarray, item_ids: list[str],
                    settings: Settings | None = None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the next extension of ``bundle``'s index: ``base_dir`` (the chain's newest link) plus ``item_ids``.

    The new directory is assembled under a temporary name (the base is only read), its ``parent`` set to
    ``{"index_dir", "sha256", "bundle": {"name", "version"}}``, and then renamed to ``r<n>`` in one step, so an
    extension is complete or absent. Call it under :func:`index_lock`.

    Raises:
        ValueError: ``base_dir`` is not the newest link of the bundle's chain.
        VersionExistsError: the target directory exists already (extensions are never overwritten).
    """
    from pipeline_tasks.retrieval.index_build import add_items

    settings = settings or load_settings()
    chain = extension_dirs(bundle.name, bundle.version, settings)
    newest = chain[-1] if chain else Path(bundle.path) / "index"
    if Path(base_dir).resolve() != newest.resolve():
        raise ValueError(f"{base_dir} is not the newest index of {bundle.name} version {bundle.version} ({newest}); "
                         "extend the newest link (serving_index_dir) so the chain stays linear")
    n = len(chain) + 1
    target = extension_dir(bundle.name, bundle.version, n, settings)
    if target.exists():
        raise VersionExistsError(f"index extension {target} exists but is not part of the chain of {bundle.name} "
                                 f"version {bundle.version} that was read; extensions are never overwritten: if no "
                                 "other refresh is running, move it away and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        add_items(base_dir, vectors, item_ids, staging)
        # Provenance is recorded before the directory appears under its final name: nothing visible is edited.
        meta_path = staging / META_FILE
        meta = json.loads(meta_path.read_text())
        base_sha = json.loads((Path(base_dir) / META_FILE).read_text())["sha256"]  # add_items verified it
        meta["parent"] = {**meta.get("parent", {}), "index_dir": str(base_dir), "sha256": base_sha,
                          "bundle": {"name": bundle.name, "version": int(bundle.version)}}
        meta["extension"] = n
        meta["refresh"] = {**(provenance or {}), "added_items": len(item_ids)}
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
        staging.rename(target)  # atomic: the extension appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**meta, "index_dir": str(target)}


def _extend(bundle: Bundle, aliases: list[str], items: pd.DataFrame, source: str,
            settings: Settings) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Write the next extension of ``bundle``'s serving index with the catalog items it lacks (if any)."""
    from pipeline_tasks.online.two_tower import load_model
    from pipeline_tasks.retrieval.content import embed_texts, item_texts

    base = load_serving_index(bundle, settings, use_gpu=False)  # refuses a broken chain or a corrupted file
    base_dir = base.index_dir
    known = set(base.item_ids.tolist())
    new = items[~items[ITEM_ID].astype(str).isin(known)].reset_index(drop=True)
    entry: dict[str, Any] = {"name": bundle.name, "aliases": aliases, "version": bundle.version, "source": source,
                             "base_index_dir": str(base_dir), "base_sha256": base.sha256, "added": int(len(new))}
    if not len(new):
        log.info("%s version %d (%s): no new items in %s; %s stays", bundle.name, bundle.version, ", ".join(aliases),
                 source, base_dir)
        return {**entry, "status": "up_to_date", "index_dir": str(base_dir), "sha256": base.sha256,
                "n_items": len(base.item_ids)}, None
    model_dir = Path(bundle.path) / "serving" / "two_tower"
    if not model_dir.exists():
        raise InvalidParamsError(f"{bundle.name} version {bundle.version} has no serving two-tower model at "
                                 f"{model_dir}, so new items cannot be embedded; re-register it (run recsys_training)")
    model = load_model(model_dir)
    content, method = embed_texts(item_texts(new), method=model.encoder.content_method)
    vectors = model.new_item_embeddings(new, content)
    meta = write_extension(bundle, base_dir, vectors, new[ITEM_ID].astype(str).tolist(), settings,
                           {"source": source, "content_method": method, "model_dir": str(model_dir)})
    target = Path(meta["index_dir"])
    log.info("%s version %d (%s): %d new items embedded with %s -> %s", bundle.name, bundle.version,
             ", ".join(aliases), len(new), method, target)
    added = new[[ITEM_ID]].assign(model=bundle.name, version=int(bundle.version))
    return {**entry, "status": "published", "index_dir": str(target), "extension": meta["extension"],
            "sha256": meta["sha256"], "n_items": meta["n_items"]}, added


def refresh_items(out_dir: str | Path, source: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Extend the serving index of every live alias (champion, challenger) with the catalog items it lacks.

    ``source`` defaults, per bundle, to the catalog its training run read (the recorded :func:`catalog_recipe`:
    the same directory, or the same generator settings). Versions without new items get nothing written.
    Returns the overall ``status`` (``published`` when any version got a new extension, ``up_to_date``, or
    ``no_model`` when no alias exists yet), ``added`` (the most items any version got) and one entry per
    version under ``aliases``. If one version fails, the others are still refreshed and the first error is raised.
    """
    settings = settings or load_settings()
    out = Path(out_dir)
    entries: list[dict[str, Any]] = []
    added_frames: list[pd.DataFrame] = []
    rejected_frames: list[pd.DataFrame] = []
    errors: list[tuple[str, Exception]] = []
    catalogs: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    with index_lock(settings):
        live = live_versions(settings)
        if not live:
            log.warning(NO_MODEL)
            return {"status": "no_model", "message": NO_MODEL, "added": 0, "aliases": []}
        for name, version, aliases in live:
            what = f"{name} version {version} ({', '.join(aliases)})"
            try:
                bundle = load_bundle(name, version=version, settings=settings)
                recipe = catalog_recipe(source) if source else bundle_catalog(bundle)
                key = json.dumps(recipe, sort_keys=True, default=str)
                if key not in catalogs:
                    catalogs[key] = _valid_ids(catalog_items(recipe["source"], recipe.get("synthetic")))
                    if len(catalogs[key][1]):
                        rejected_frames.append(catalogs[key][1].assign(source=recipe["source"]))
                items, rejected = catalogs[key]
                entry, added = _extend(bundle, aliases, items, recipe["source"], settings)
            except Exception as exc:  # one broken bundle must not keep new items from the others
                log.error("item refresh of %s failed: %s", what, exc)
                errors.append((what, exc))
                continue
            entries.append({**entry, "catalog_items": int(len(items)), "rejected": int(len(rejected))})
            if added is not None:
                added_frames.append(added)
    result: dict[str, Any] = {"aliases": entries, "added": max((e["added"] for e in entries), default=0)}
    if rejected_frames:
        pd.concat(rejected_frames, ignore_index=True).to_parquet(out / "rejected_items.parquet", index=False)
        result["rejected_items"] = str(out / "rejected_items.parquet")
        log.warning("%d catalog rows rejected (invalid or duplicate item id): %s",
                    sum(len(f) for f in rejected_frames), out / "rejected_items.parquet")
    published = [e for e in entries if e["status"] == "published"]
    if published:
        pd.concat(added_frames, ignore_index=True).to_parquet(out / "added_items.parquet", index=False)
        result["added_items"] = str(out / "added_items.parquet")
    if errors:
        first = errors[0][1]
        done = ", ".join(f"{e['name']} version {e['version']}: {e['status']}" for e in entries) or "none"
        first.add_note(f"item refresh failed for {'; '.join(w for w, _ in errors)}; refreshed: {done}")
        raise first
    return {"status": "published" if published else "up_to_date", **result}
