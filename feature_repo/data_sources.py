"""Batch sources: the daily snapshots build_features (Spark) writes as hive-partitioned parquet.

Layout ``<feature_store_dir>/offline/<table>/snapshot_date=YYYY-MM-DD/part-*.parquet``; each row is
valid from its ``event_timestamp`` (the end of its UTC day) and uses only earlier events. The
paths follow RECSYS_HOME, resolved the same way as everywhere else (pipeline_tasks.core.settings).
"""

from feast import FileSource

from pipeline_tasks.online.feature_store import offline_table_dir

# One row per user per day: activity counts, funnel rates, top categories, recent items.
user_features_source = FileSource(
    name="user_features_source",
    path=str(offline_table_dir("user_features")),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily user snapshots written by build_features.",
)

# One row per item per day: popularity, trend, funnel rates, age, category.
item_features_source = FileSource(
    name="item_features_source",
    path=str(offline_table_dir("item_features")),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily item snapshots written by build_features.",
)
