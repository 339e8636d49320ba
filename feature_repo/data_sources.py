"""Batch sources: the daily snapshots build_features (Spark) writes as hive-partitioned parquet.

Layout ``<feature_store_dir>/offline/<table>/snapshot_date=YYYY-MM-DD/part-*.parquet``; each row is
valid from its ``event_timestamp`` (the end of its UTC day) and uses only earlier events. The
paths follow RECSYS_HOME and the source's namespace, resolved the same way as everywhere else.
The same tables are read by the profile's offline store: DuckDB (embedded; a FileSource over the
partitions' parquet files) or Spark (production; a SparkSource over the partitioned directory).
"""

from pipeline_tasks.online.feature_store import offline_source_kwargs, repo_settings

_SETTINGS = repo_settings()  # the apply in progress (its namespace and profile), else the environment's
_PROFILE = _SETTINGS.profile

if _PROFILE == "production":
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource as _Source
else:
    from feast import FileSource as _Source

# One row per user per day: activity counts, funnel rates, top categories, recent items.
user_features_source = _Source(
    name="user_features_source",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily user snapshots written by build_features.",
    **offline_source_kwargs("user_features", _PROFILE, _SETTINGS),
)

# One row per item per day: popularity, trend, funnel rates, age, category.
item_features_source = _Source(
    name="item_features_source",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily item snapshots written by build_features.",
    **offline_source_kwargs("item_features", _PROFILE, _SETTINGS),
)
