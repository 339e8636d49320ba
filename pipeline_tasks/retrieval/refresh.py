"""Serving index versions and the hourly item refresh.

Index versions live under ``$RECSYS_HOME/indexes/<model run>/v0001/``, ``v0002/`` ...; each is
immutable (files + SHA-256 in ``index.json``). ``current.json`` names the version serving should
load and the model that embedded it. The training DAG publishes ``v0001`` of a new model; the
refresh embeds catalog items that the current version lacks (from content, category and genres:
the item tower needs no interactions) and publishes the next version, pointing back at its parent.
Writers take the index lock, so the training DAG and the refresh never interleave.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID
from pipeline_tasks.core.errors import VersionExistsError
from pipeline_tasks.core.locks import file_lock
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.index import CURRENT, current_index, version_dir

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0


def index_lock(settings: Settings | None = None,
               timeout: float = LOCK_TIMEOUT_S) -> contextlib.AbstractContextManager[Path]:
    """Hold the index writers' lock (``$RECSYS_HOME/indexes/.lock``) across processes."""
    settings = settings or load_settings()
    return file_lock(settings.index_dir / ".lock", timeout, what="index", writers="build_index / item refresh")


def _write_current(pointer: dict[str, Any], settings: Settings) -> None:
    path = settings.index_dir / CURRENT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pointer, indent=2, default=str))
    tmp.replace(path)


def publish(pointer: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Make ``pointer`` (index_dir, model_dir, version, sha256, ...) the current index version."""
    settings = settings or load_settings()
    pointer = {**pointer, "published_at": datetime.now(UTC).isoformat()}
    _write_current(pointer, settings)
    log.info("serving index is now %s (version %s)", pointer["index_dir"], pointer["version"])
    return pointer


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


def refresh_items(out_dir: str | Path, source: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Embed catalog items missing from the current index and publish a new index version.

    ``source`` defaults to the catalog of the training run that built the current model (its recorded
    :func:`catalog_recipe`: the same directory, or the same generator settings).
    No new items: nothing is written and the current version stays.
    """
    from pipeline_tasks.online.index import load_index
    from pipeline_tasks.online.two_tower import load_model
    from pipeline_tasks.retrieval.content import embed_texts, item_texts
    from pipeline_tasks.retrieval.index_build import add_items

    settings = settings or load_settings()
    out = Path(out_dir)
    with index_lock(settings):
        current = current_index(settings)
        if current is None:
            return {"status": "no_index", "message": "no index has been built yet: run recsys_training first"}
        # Default: the catalog the serving model was trained from, as its training run recorded it.
        synthetic = None if source else current.get("synthetic")
        source = source or current["source"]
        base = load_index(current["index_dir"])  # refuses a corrupted base by its checksum
        items, rejected = _valid_ids(catalog_items(source, synthetic))
        if len(rejected):
            rejected.to_parquet(out / "rejected_items.parquet", index=False)
            log.warning("%d catalog rows rejected (invalid or duplicate item id): %s", len(rejected),
                        out / "rejected_items.parquet")
        known = set(base.item_ids.tolist())
        new = items[~items[ITEM_ID].astype(str).isin(known)].reset_index(drop=True)
        result: dict[str, Any] = {"source": source, "catalog_items": int(len(items)), "rejected": int(len(rejected)),
                                  "base_index_dir": current["index_dir"], "base_sha256": current["sha256"],
                                  "added": int(len(new))}
        if not len(new):
            log.info("no new items in %s: index %s stays current", source, current["index_dir"])
            return {**result, "status": "up_to_date", "index_dir": current["index_dir"]}
        model = load_model(current["model_dir"])
        content, method = embed_texts(item_texts(new), method=model.encoder.content_method)
        vectors = model.new_item_embeddings(new, content)
        version = int(current["version"]) + 1
        target = version_dir(current["model_key"], version, settings)
        if target.exists():
            raise VersionExistsError(f"index version {target} exists but is not current; published versions are "
                                     "never overwritten: move it away and retry")
        meta = add_items(current["index_dir"], vectors, new[ITEM_ID].astype(str).tolist(), target)
        new[[ITEM_ID]].to_parquet(out / "added_items.parquet", index=False)
        pointer = publish({**current, "index_dir": str(target), "version": version, "sha256": meta["sha256"],
                           "parent": {"index_dir": current["index_dir"], "sha256": current["sha256"]},
                           "n_items": meta["n_items"]}, settings)
    log.info("item refresh: %d new items embedded with %s -> %s", len(new), method, target)
    return {**result, "status": "published", "index_dir": str(target), "version": version,
            "sha256": pointer["sha256"], "n_items": meta["n_items"], "added_items": str(out / "added_items.parquet")}
