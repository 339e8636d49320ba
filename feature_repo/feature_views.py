"""Feature views: the daily user and item snapshots, typed, with a freshness limit (TTL).

Snapshots exist for every day, so the newest valid row is normally less than a day old. The TTL
of 3 days tolerates two missed daily runs; a row older than that means the feature job stopped,
and Feast then returns nulls (training sets) instead of silently stale values. The first
materialization also starts at ``end_date - ttl``.
"""

from datetime import timedelta

from data_sources import item_features_source, user_features_source
from entities import item, user
from feast import FeatureView, Field
from feast.types import Float64, Int64, String

USER_STATS_TTL = timedelta(days=3)
ITEM_STATS_TTL = timedelta(days=3)

# What a user did up to the end of each day: the ranker's user-side features.
user_stats_fv = FeatureView(
    name="user_stats_fv",
    entities=[user],
    ttl=USER_STATS_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="user_total_interactions", dtype=Int64),
        Field(name="user_unique_items", dtype=Int64),
        Field(name="user_n_view", dtype=Int64),
        Field(name="user_n_click", dtype=Int64),
        Field(name="user_n_add_to_cart", dtype=Int64),
        Field(name="user_n_purchase", dtype=Int64),
        Field(name="user_n_favorite", dtype=Int64),
        Field(name="user_ctr", dtype=Float64, description="clicks / views"),
        Field(name="user_conversion_rate", dtype=Float64, description="purchases / (clicks + 1)"),
        Field(name="user_days_since_last_event", dtype=Float64),
        Field(name="user_top1_category", dtype=String),
        Field(name="user_top2_category", dtype=String),
        Field(name="user_top3_category", dtype=String),
        Field(name="user_top1_share", dtype=Float64),
        Field(name="user_top2_share", dtype=Float64),
        Field(name="user_top3_share", dtype=Float64),
        Field(name="user_mean_session_events", dtype=Float64),
        Field(name="user_mean_session_minutes", dtype=Float64),
        Field(name="user_last_items", dtype=String, description="recent item ids, newest first, '|'-joined"),
    ],
    online=True,
    source=user_features_source,
    description="Daily user snapshot (valid from the end of its UTC day).",
    tags={"entity": "user", "producer": "build_features"},
)

# How each item did up to the end of each day: popularity, trend, funnel, age, category.
item_stats_fv = FeatureView(
    name="item_stats_fv",
    entities=[item],
    ttl=ITEM_STATS_TTL,
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="item_n_view", dtype=Int64),
        Field(name="item_n_click", dtype=Int64),
        Field(name="item_n_purchase", dtype=Int64),
        Field(name="item_total_interactions", dtype=Int64),
        Field(name="item_unique_users", dtype=Int64),
        Field(name="item_interactions_30d", dtype=Int64),
        Field(name="item_ctr", dtype=Float64, description="clicks / views"),
        Field(name="item_conversion_rate", dtype=Float64, description="purchases / (clicks + 1)"),
        Field(name="item_popularity", dtype=Float64),
        Field(name="item_trending_score", dtype=Float64),
        Field(name="item_age_days", dtype=Float64),
        Field(name="item_category", dtype=String),
    ],
    online=True,
    source=item_features_source,
    description="Daily item snapshot (valid from the end of its UTC day).",
    tags={"entity": "item", "producer": "build_features"},
)
