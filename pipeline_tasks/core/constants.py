"""Names defined once: columns, event types, seeds, quarantine reasons, defaults."""

from __future__ import annotations

from typing import Any

SEED = 42

# Canonical interactions columns (DATA_CONTRACT.md).
USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
EVENT_TYPE = "event_type"
VALUE = "value"
DEVICE = "device"
LOCATION = "location"
INTERACTION_COLUMNS = [USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE, VALUE, DEVICE, LOCATION]

ITEM_COLUMNS = [
    ITEM_ID, "title", "category", "genres", "created_at", "description", "price", "available", "regions",
]
USER_COLUMNS = [USER_ID, "age", "gender", "occupation", "zip", LOCATION]

TABLES = ("interactions", "items", "users")
REQUIRED_TABLES = ("interactions", "items")
# The columns each table must have (DATA_CONTRACT.md); the others are optional.
REQUIRED_COLUMNS = {"interactions": (USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE), "items": (ITEM_ID,),
                    "users": (USER_ID,)}

# The funnel, in order; `favorite` stands outside it.
FUNNEL = ("view", "click", "add_to_cart", "purchase")
EVENT_TYPES = (*FUNNEL, "favorite")

ID_MAX_LEN = 128
UNKNOWN_CATEGORY = "unknown"

DEFAULT_HORIZON_DAYS = 730
DEFAULT_BOT_EVENTS_PER_DAY = 1000
DEFAULT_SPIKE_SIGMA = 3.0
DEFAULT_SPIKE_WINDOW_DAYS = 28
DEFAULT_QUALITY_THRESHOLD = 0.95
# The largest share of accepted interactions that may name an item (or, with a users table, a
# user) missing from its table; above it the gate fails. 5 % mirrors the quality gate's 5 % of
# rejected rows: a few ids from a catalog export that lags the event log are normal; more means a
# stale or partial table, and the models would learn items they know only as category "unknown".
# Synthetic data and MovieLens have 0 %.
DEFAULT_MAX_STUB_SHARE = 0.05
DEFAULT_SPLIT = (0.8, 0.9)

# Helper columns added before validation so that every rule is a plain GX expectation.
ROW_ID = "_row_id"
DUP_RANK = "_dup_rank"
USER_DAY_EVENTS = "_user_day_events"
TS_EPOCH = "_ts_epoch"

# The training DAG's params and their defaults (None = take the setting / contract default).
DEFAULT_PARAMS: dict[str, Any] = {
    "source": "synthetic",
    "synthetic": {"n_users": 1000, "n_items": 2000, "n_days": 60, "n_events": 100_000, "faults": {"rate": 0.002}},
    "as_of": None,
    "t_val": None,
    "t_test": None,
    "quality_threshold": None,
    "max_stub_share": None,  # None: RECSYS_MAX_STUB_SHARE, else DEFAULT_MAX_STUB_SHARE
    "horizon_days": None,
    "bot_events_per_day": None,
    "drift_mode": "warn",
    "drift_threshold": 0.2,
    "two_tower": {},  # RetrievalConfig overrides: base, grid, mf_grid, content_method, n_boot
    "index": {},  # IndexConfig overrides: kind, target_recall, k, ...
    "candidates": {},  # CandidateConfig overrides: pool_size, weights, trending_days, ...
    "ranker": {},  # RankerConfig overrides: n_trials, timeout_s, holdout_share, max_rounds, ...
    "gate": {},  # GateConfig overrides: metrics, tolerance
    "feedback_log": None,  # a service's feedback log directory: its contract events join the interactions
}
