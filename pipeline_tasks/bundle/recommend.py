"""Batch recommendations from a registered bundle (``recsys recommend``): the same candidates, feature assembly
and rules as the ``evaluate`` task and the service.

A user's history is the interactions before ``as_of`` from a contract directory (default: the bundle's accepted
data), newer than the model's training data included; features are Feast point-in-time rows at ``as_of`` (when
``as_of`` is past the newest snapshot by more than the views' TTL, the newest snapshot is used and a warning
says so: never silent nulls); servability comes from that directory's items table. Seen items are excluded;
users without history get the cold-start (trending) list; lists shorter than k are filled from popularity.
Items under a safety flag (:mod:`pipeline_tasks.online.safety`, the file the model's services obey) are never
recommended, as in the service.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.data.validate import to_utc
from pipeline_tasks.online.bundle import Bundle
from pipeline_tasks.online.safety import flags_path, read_flags
from pipeline_tasks.online.two_stage import RULES_ORDER, Fit, Moment, load_fit, load_serving_fit, ranked_lists

log = logging.getLogger(__name__)

MAX_K = 1000
FEATURE_TTL = pd.Timedelta(days=3)  # feature_repo/feature_views.py: USER_STATS_TTL, ITEM_STATS_TTL


def newest_snapshot_end(settings: Settings) -> pd.Timestamp | None:
    """The end of the newest recorded feature day in the settings' namespace (None without features)."""
    from pipeline_tasks.online.feature_store import offline_table_dir

    days = []
    for table in ("user_features", "item_features"):
        path = offline_table_dir(table, settings) / "_partitions.json"
        if path.exists():
            days.append(max(json.loads(path.read_text()), default=None))
    days = [d for d in days if d]
    return pd.Timestamp(min(days), tz="UTC") + pd.Timedelta(days=1) if days else None


def _read_contract(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    from pipeline_tasks.data.contract import read_contract_dir

    tables = read_contract_dir(data_dir)
    inter = tables.interactions
    inter[TIMESTAMP] = pd.to_datetime(inter[TIMESTAMP], utc=True)
    users = tables.users if len(tables.users) else None
    return inter, tables.items, users


def load_moment(bundle: Bundle, as_of: pd.Timestamp | str, user_ids: Sequence[str] | None,
                data_dir: str | Path | None = None, fit: str = "serving",
                settings: Settings | None = None) -> tuple[Fit, Moment]:
    """The fit and what is known at ``as_of``: history before it from ``data_dir`` (default: the bundle's
    accepted data), the catalog, and Feast point-in-time rows of ``user_ids`` (None: every user with history)
    and of the fit's items."""
    from pipeline_tasks.features.history import features_at

    at = to_utc(as_of)
    source = Path(data_dir) if data_dir is not None else Path(bundle.meta["accepted_dir"])
    interactions, items, users = _read_contract(source)
    history = interactions[interactions[TIMESTAMP] < at]
    loaded = load_serving_fit(bundle, fit, settings) if fit == "serving" else load_fit(bundle.fit_dir(fit))
    ns_settings = dataclasses.replace(settings or load_settings(), namespace=bundle.meta["namespace"])
    newest = newest_snapshot_end(ns_settings)
    user_rows = item_rows = None
    if user_ids is None:
        user_ids = history[USER_ID].astype(str).unique().tolist()
    if newest is not None:
        moment = min(at, newest)
        if at - newest > FEATURE_TTL:
            log.warning("as_of %s is %s past the newest feature snapshot (ends %s), more than the views' TTL "
                        "(%s): using the newest snapshot's values", at.isoformat(), at - newest, newest.isoformat(),
                        FEATURE_TTL)
        user_rows, item_rows = features_at(moment, user_ids=[str(u) for u in user_ids], item_ids=loaded.item_ids,
                                           feature_service="ranker_v1", settings=ns_settings, until=newest)
    else:
        log.warning("no feature snapshots for namespace %s: ranking without store features",
                    bundle.meta["namespace"])
    return loaded, Moment(at, history, items, users, user_rows, item_rows)


def recommend(bundle: Bundle, user_ids: Sequence[str], k: int, as_of: pd.Timestamp | str,
              data_dir: str | Path | None = None, fit: str = "serving", rules: bool = True,
              settings: Settings | None = None, safety_flags: bool = True) -> pd.DataFrame:
    """``user_id, item_id, rank, score`` for each user (k rows each when the catalog allows); with
    ``safety_flags``, without the items flagged in the model's flags file (:func:`flags_path`)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k}: use 1..{MAX_K}")
    started = time.perf_counter()
    ids = [str(u) for u in user_ids]
    flagged = frozenset(read_flags(flags_path(bundle.name, settings))) if safety_flags else frozenset()
    loaded, moment = load_moment(bundle, as_of, ids, data_dir, fit, settings)
    order = RULES_ORDER if rules else "ranker"
    lists = ranked_lists(loaded, moment, ids, k, orders=[order], workers=min(2, os.cpu_count() or 1),
                         blocked=flagged)[order]
    rows = [(u, item, rank, score) for u, recs in lists.items() for rank, (item, score) in enumerate(recs, start=1)]
    out = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, "rank", "score"])
    log.info("recommended %d items to %d users with %s version %d (%s fit, %d safety-flagged items blocked) in "
             "%.1f s", len(out), len(lists), bundle.name, bundle.version, fit, len(flagged),
             time.perf_counter() - started)
    return out


def read_users(path: str | Path) -> list[str]:
    """User ids from a file: parquet/csv with a ``user_id`` column, or plain text with one id per line."""
    p = Path(path)
    if p.suffix == ".parquet":
        return pd.read_parquet(p, columns=[USER_ID])[USER_ID].astype(str).tolist()
    if p.suffix == ".csv":
        return pd.read_csv(p, dtype=str)[USER_ID].tolist()
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def describe(bundle: Bundle) -> dict[str, Any]:
    """A short description of a bundle for the CLI."""
    return {"model": bundle.name, "version": bundle.version, "aliases": bundle.aliases, "run_id":
            bundle.meta.get("run_id"), "t_test": bundle.meta.get("t_test"), "as_of": bundle.meta.get("as_of")}


def snapshot_moment(bundle: Bundle) -> pd.Timestamp:
    """The default moment a service answers at: the bundle's ``as_of`` (the end of its serving fit's data)."""
    value = bundle.meta.get("as_of")
    if not value:
        raise ValueError(f"bundle {bundle.path} has no as_of; give the service's as_of explicitly")
    return to_utc(value)


def write_snapshot(bundle: Bundle, out_dir: str | Path, as_of: pd.Timestamp | str | None = None,
                   data_dir: str | Path | None = None, fit: str = "serving",
                   settings: Settings | None = None, extra: dict[str, Any] | None = None) -> Path:
    """The serving snapshot of ``bundle`` at ``as_of`` (default: the bundle's), read exactly as
    ``recsys recommend --as-of`` reads it (:func:`load_moment`), for every user with history (``extra``: more
    fields for its ``snapshot.json``)."""
    from pipeline_tasks.online.snapshot import save_snapshot

    started = time.perf_counter()
    at = to_utc(as_of) if as_of is not None else snapshot_moment(bundle)
    _, moment = load_moment(bundle, at, None, data_dir, fit, settings)
    out = save_snapshot(moment, out_dir, {"model": bundle.name, "version": bundle.version, "fit": fit,
                                          "data_dir": str(data_dir or bundle.meta.get("accepted_dir")),
                                          **(extra or {})})
    log.info("serving snapshot of %s version %d at %s written to %s in %.1f s", bundle.name, bundle.version,
             at.isoformat(), out, time.perf_counter() - started)
    return out
