"""Entities that accepted interactions name but their table lacks: stub rows, counted and logged.

The interactions are accepted (the event happened); the item gets a row with category "unknown",
the user a row with null attributes, so that the accepted directory is complete. How many
interactions that touches is reported per table and limited by ``max_stub_share`` (the gate in
:mod:`pipeline_tasks.data.quality_gate`); a missing users table is not counted, as every user is
then a stub by design.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, UNKNOWN_CATEGORY, USER_ID
from pipeline_tasks.data.contract import normalise_items, normalise_users
from pipeline_tasks.data.quality_gate import FIRST_IDS

log = logging.getLogger(__name__)


def complete_entities(interactions: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give every item and user that accepted interactions mention a row (nulls where unknown) and
    fill a missing ``created_at`` with the item's first interaction."""
    missing_items = pd.Index(interactions[ITEM_ID].unique()).difference(pd.Index(items[ITEM_ID]))
    if len(missing_items):
        extra = normalise_items(pd.DataFrame({ITEM_ID: list(missing_items), "category": UNKNOWN_CATEGORY}))
        items = pd.concat([items, extra], ignore_index=True)
    first_seen = interactions.groupby(ITEM_ID)[TIMESTAMP].min()
    items = items.copy()
    items["created_at"] = items["created_at"].fillna(items[ITEM_ID].map(first_seen)).astype("datetime64[ns, UTC]")
    missing_users = pd.Index(interactions[USER_ID].unique()).difference(pd.Index(users[USER_ID]))
    if len(missing_users):
        users = pd.concat([users, normalise_users(pd.DataFrame({USER_ID: list(missing_users)}))], ignore_index=True)
    return items.reset_index(drop=True), users.reset_index(drop=True)


def stub_summary(interactions: pd.DataFrame, known: pd.Series, column: str, limit: float, applies: bool
                 ) -> dict[str, Any]:
    """The accepted interactions whose ``column`` id is not in ``known`` (their entity gets a stub row):
    entities (``stubbed``), ``interactions``, their ``share``, ``first_ids`` (input order), and
    ``passed`` (share <= ``limit``; always true when the limit does not apply)."""
    ids = interactions[column]
    missing = ~ids.isin(known)
    stubbed = pd.unique(ids[missing])
    share = float(missing.mean()) if len(ids) else 0.0
    return {"stubbed": len(stubbed), "interactions": int(missing.sum()), "share": share,
            "first_ids": [str(i) for i in stubbed[:FIRST_IDS]], "limit_applies": applies,
            "passed": not applies or share <= limit}


def stub_report(accepted: dict[str, pd.DataFrame], limit: float, users_given: bool) -> dict[str, Any]:
    """``max_stub_share`` and a :func:`stub_summary` for ``items`` and ``users`` of the accepted tables."""
    inter = accepted["interactions"]
    return {"max_stub_share": limit,
            "items": stub_summary(inter, accepted["items"][ITEM_ID], ITEM_ID, limit, applies=True),
            "users": stub_summary(inter, accepted["users"][USER_ID], USER_ID, limit, applies=users_given)}


def log_stubs(stubs: dict[str, Any]) -> None:
    """A warning per table with stubbed ids under the limit's watch (counts, share, first ids);
    info when there is no users table."""
    for kind in ("items", "users"):
        s = stubs[kind]
        if not s["stubbed"]:
            continue
        if not s["limit_applies"]:
            log.info("no users table: the %d users of the accepted interactions get rows with null attributes",
                     s["stubbed"])
            continue
        log.warning("%d accepted interactions (%.1f%%) name %d %s missing from the %s table (first: %s); they are "
                    "accepted and the %s get stub rows (max_stub_share %.1f%%: %s)", s["interactions"],
                    100 * s["share"], s["stubbed"], kind, kind, ", ".join(s["first_ids"]), kind,
                    100 * stubs["max_stub_share"], "within the limit" if s["passed"] else "above the limit")
