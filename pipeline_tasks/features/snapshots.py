"""Daily feature snapshots (PySpark) for the Feast offline store: ``user_features``, ``item_features``.

One row per entity per UTC day ``d``, from the entity's first day (user: first event; item:
``created_at`` or first event, whichever is earlier, but no earlier than the day before the
data's first event) through the end day (the last day with an event, or ``end_date``, and never a
day that is not over yet at ``complete_before``). A row's ``event_timestamp`` is the end of day
``d``, midnight starting ``d + 1`` UTC: the moment from which the row is valid; its
``created_timestamp`` is when the job wrote it. It is computed only from events with
``timestamp < event_timestamp``, so a point-in-time join (Feast historical retrieval) never sees
the future. Column names and types: :data:`USER_FEATURE_COLUMNS`, :data:`ITEM_FEATURE_COLUMNS`.

Append-only history: a day once written is never rewritten, so a training set reads the values
serving had. Each run writes only the days after the last recorded one (``_partitions.json`` in
each table: day -> SHA-256, rows, when and by which job); events that arrive late (with an older
timestamp) count from the next new day on.

Definitions: a session ends after more than 30 minutes without an event and at UTC midnight (so
it never straddles a snapshot); ``user_last_items`` lists distinct items, most recent first (ties
by item id); top categories rank by interaction count (ties by name); ratios are 0 when their
denominator is 0 (``*_ctr``) or use ``+ 1`` (``*_conversion_rate``, ``item_trending_score``).

Determinism: every figure is an integer count (or an integer number of microseconds) summed in
Spark, and every ratio is one division of such integers, so the output is bit-identical on any
master and partitioning. Lists are sorted explicitly. No Python UDFs. Each entity is shuffled
once (by its id); the dense days come from ``explode(sequence(...))`` between event days.

Run as a script: ``python -m pipeline_tasks.features.snapshots [--master URL] [--end-date D] CONTRACT_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as sf
from pyspark.sql.types import LongType, TimestampNTZType, TimestampType

from pipeline_tasks.core.constants import EVENT_TYPE, ITEM_ID, TIMESTAMP, UNKNOWN_CATEGORY, USER_ID
from pipeline_tasks.core.errors import PermanentError

log = logging.getLogger(__name__)

USER_FEATURES = "user_features"
ITEM_FEATURES = "item_features"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_timestamp"
SNAPSHOT_DATE = "snapshot_date"  # the partition column, 'YYYY-MM-DD' (day d)

DAY_US = 86_400_000_000
MINUTE_US = 60_000_000
SESSION_GAP_US = 30 * MINUTE_US  # more than 30 min without an event ends a session
TOP_CATEGORIES = 3
LAST_ITEMS_MAX = 20
LAST_ITEMS_SEPARATOR = "|"
RECENT_DAYS = 30  # item_interactions_30d
TRENDING_DAYS = 7  # item_trending_score
EPOCH = date(1970, 1, 1)

USER_EVENT_COUNTS = {
    "view": "user_n_view",
    "click": "user_n_click",
    "add_to_cart": "user_n_add_to_cart",
    "purchase": "user_n_purchase",
    "favorite": "user_n_favorite",
}
ITEM_EVENT_COUNTS = {"view": "item_n_view", "click": "item_n_click", "purchase": "item_n_purchase"}

USER_FEATURE_COLUMNS = [
    USER_ID, EVENT_TIMESTAMP, CREATED_TIMESTAMP, SNAPSHOT_DATE,
    "user_total_interactions", "user_unique_items", *USER_EVENT_COUNTS.values(),
    "user_ctr", "user_conversion_rate", "user_days_since_last_event",
    *(f"user_top{k}_category" for k in range(1, TOP_CATEGORIES + 1)),
    *(f"user_top{k}_share" for k in range(1, TOP_CATEGORIES + 1)),
    "user_mean_session_events", "user_mean_session_minutes", "user_last_items",
]
ITEM_FEATURE_COLUMNS = [
    ITEM_ID, EVENT_TIMESTAMP, CREATED_TIMESTAMP, SNAPSHOT_DATE,
    *ITEM_EVENT_COUNTS.values(), "item_total_interactions", "item_unique_users",
    "item_ctr", "item_conversion_rate", "item_popularity", "item_interactions_30d",
    "item_trending_score", "item_age_days", "item_category",
]


class FeatureInputError(PermanentError, ValueError):
    """The contract directory cannot be read as feature-job input."""


# ---------------------------------------------------------------------------------------------
# Input


def _utc_timestamp(df: DataFrame, column: str) -> Column:
    """A contract timestamp column as a Spark (UTC) timestamp, whatever parquet type carried it."""
    dtype = df.schema[column].dataType
    c = sf.col(column)
    if isinstance(dtype, TimestampType):
        return c
    if isinstance(dtype, TimestampNTZType):  # naive = UTC (DATA_CONTRACT.md); the session time zone is UTC
        return c.cast(TimestampType())
    if isinstance(dtype, LongType):  # pandas' TIMESTAMP(NANOS), read as epoch nanoseconds
        return sf.timestamp_micros(_floor_div(column, 1000))
    raise FeatureInputError(f"column {column!r} has type {dtype.simpleString()}; expected a timestamp "
                            "(write the contract directory with pipeline_tasks.contract.write_contract_dir)")


def read_contract_tables(spark: SparkSession, contract_dir: str | Path) -> tuple[DataFrame, DataFrame]:
    """Read ``interactions.parquet`` and ``items.parquet`` of a contract directory.

    Returns:
        ``(interactions, items)`` with the columns the jobs use: ``user_id, item_id, timestamp,
        event_type`` and ``item_id, category, created_at`` (timestamps as UTC Spark timestamps).
    """
    contract_dir = Path(contract_dir)
    paths = {name: contract_dir / f"{name}.parquet" for name in ("interactions", "items")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FeatureInputError(f"{contract_dir}: missing {missing}; build_features reads the parquet contract "
                                "directory written by ingest/validate (see DATA_CONTRACT.md)")
    # Also on a session that did not come from get_spark: nanosecond timestamps readable, UTC.
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    raw = spark.read.parquet(str(paths["interactions"]))
    interactions = raw.select(
        sf.col(USER_ID).cast("string"), sf.col(ITEM_ID).cast("string"),
        _utc_timestamp(raw, TIMESTAMP).alias(TIMESTAMP), sf.col(EVENT_TYPE).cast("string"),
    )
    raw_items = spark.read.parquet(str(paths["items"]))
    created = (_utc_timestamp(raw_items, "created_at") if "created_at" in raw_items.columns
               else sf.lit(None).cast(TimestampType()))
    category = sf.col("category").cast("string") if "category" in raw_items.columns else sf.lit(None).cast("string")
    items = raw_items.select(sf.col(ITEM_ID).cast("string"), category.alias("category"), created.alias("created_at"))
    return interactions, items


# ---------------------------------------------------------------------------------------------
# Helpers


def _floor_div(column: str, divisor: int) -> Column:
    """Exact integer floor division of a long column (SQL ``div``: no floating point on the way;
    epoch nanoseconds do not fit a double's 53 bits)."""
    c = f"`{column}`"
    return sf.expr(f"({c} - pmod({c}, {divisor}L)) div {divisor}L")


def _day_of_us(column: str) -> Column:
    """UTC day number (days since 1970-01-01) of epoch microseconds."""
    return _floor_div(column, DAY_US).cast("int")


def day_number(day: str | date) -> int:
    """Days since 1970-01-01 of a ``YYYY-MM-DD`` date."""
    return ((date.fromisoformat(day) if isinstance(day, str) else day) - EPOCH).days


def day_string(day: int) -> str:
    """``YYYY-MM-DD`` of a day number."""
    return (EPOCH + timedelta(days=day)).isoformat()


def _events(interactions: DataFrame, end_day: int | None) -> DataFrame:
    """Events with epoch microseconds and UTC day, up to the end of ``end_day`` (None: all)."""
    us = sf.unix_micros(sf.col(TIMESTAMP))
    events = (
        interactions.where(sf.col(TIMESTAMP).isNotNull() & sf.col(USER_ID).isNotNull() & sf.col(ITEM_ID).isNotNull())
        .select(USER_ID, ITEM_ID, EVENT_TYPE, us.alias("ts_us"))
        .withColumn("day", _day_of_us("ts_us"))
    )
    return events if end_day is None else events.where(sf.col("day") <= end_day)


def _snapshot_columns() -> list[Column]:
    """``event_timestamp`` = end of day d (``created_timestamp`` too, until the job stamps its own time);
    ``snapshot_date`` = d."""
    end = sf.timestamp_micros((sf.col("day").cast("long") + 1) * sf.lit(DAY_US))
    return [
        end.alias(EVENT_TIMESTAMP),
        end.alias(CREATED_TIMESTAMP),
        sf.date_format(sf.date_from_unix_date(sf.col("day")), "yyyy-MM-dd").alias(SNAPSHOT_DATE),
    ]


def _ratio(num: str, den: Column) -> Column:
    """``num / den`` as a double, 0.0 when the denominator is 0."""
    return sf.when(den > 0, sf.col(num).cast("double") / den.cast("double")).otherwise(sf.lit(0.0))


def _count_of(event_type: str) -> Column:
    return sf.sum(sf.when(sf.col(EVENT_TYPE) == event_type, 1).otherwise(0)).cast("long")


def _expand_days(end_day: int, start: Column | None = None) -> Column:
    """The days a sparse row stands for: its own day (or ``start``) up to the day before the
    entity's next row (``_next_day``), the last row up to ``end_day``."""
    stop = sf.coalesce(sf.col("_next_day") - 1, sf.lit(end_day))
    return sf.explode(sf.sequence(sf.col("day") if start is None else start, stop))


def resolve_end_day(interactions: DataFrame, end_date: str | None) -> int | None:
    """The explicit ``end_date``'s day number, else the last UTC day with an event (None: no events)."""
    if end_date is not None:
        return day_number(end_date)
    row = interactions.select(sf.max(sf.unix_micros(sf.col(TIMESTAMP))).alias("us")).first()
    return None if row is None or row["us"] is None else (row["us"] // DAY_US)


def _categories(items: DataFrame) -> DataFrame:
    """One category per item (``unknown`` when missing); duplicate rows resolved deterministically."""
    return items.groupBy(ITEM_ID).agg(
        sf.coalesce(sf.min("category"), sf.lit(UNKNOWN_CATEGORY)).alias("category"),
        sf.min(sf.unix_micros(sf.col("created_at"))).alias("created_us"),
    )


def day_counts(events: DataFrame) -> dict[int, int]:
    """Events per UTC day (day number -> count): at most one row per day, collected to the driver."""
    return {int(r["day"]): int(r["n"]) for r in events.groupBy("day").agg(sf.count(sf.lit(1)).alias("n")).collect()}


# ---------------------------------------------------------------------------------------------
# User features
#
# Shuffled once, by user; every later step is keyed by the user (plus item/category/day), so
# Spark reuses that partitioning: no further shuffle, no join.

USER_COUNTS = ["n_total", *(f"n_{e}" for e in USER_EVENT_COUNTS), "n_new_items", "n_sessions", "session_us"]

# Per user, fold the event days (oldest first) into the state as of each day: the cumulative
# interactions per category (a map) and the 20 most recent distinct items (today's items, most
# recent first, in front of the previous list; duplicates dropped). One state per day, in order.
_STATE_TYPE = "array<struct<cats:map<string,bigint>, items:array<string>>>"
_USER_FOLD = f"""aggregate(days, cast(array() as {_STATE_TYPE}), (acc, x) -> concat(acc, array(named_struct(
  'cats', map_zip_with(coalesce(try_element_at(acc, -1).cats, cast(map() as map<string,bigint>)),
                       map_from_entries(x.cats), (k, a, b) -> coalesce(a, 0L) + coalesce(b, 0L)),
  'items', slice(array_distinct(concat(x.items,
                                       coalesce(try_element_at(acc, -1).items, cast(array() as array<string>)))),
                 1, {LAST_ITEMS_MAX})))))"""
# The top categories of a category -> count map: by count, ties by name.
_TOP_CATEGORIES = f"""slice(array_sort(map_entries(states.cats), (l, r) -> case
  when l.value > r.value then -1 when l.value < r.value then 1
  when l.key < r.key then -1 when l.key > r.key then 1 else 0 end), 1, {TOP_CATEGORIES})"""


def _user_days(events: DataFrame, categories: DataFrame) -> DataFrame:
    """One row per user and event day: that day's counts, categories and items, sessions."""
    by_time = Window.partitionBy(USER_ID).orderBy("ts_us", EVENT_TYPE, ITEM_ID)
    gap = sf.col("ts_us") - sf.lag("ts_us").over(by_time)
    # A session ends after 30 min of inactivity and at UTC midnight (never straddles a snapshot).
    new_session = sf.coalesce((sf.lag("day").over(by_time) != sf.col("day")) | (gap > SESSION_GAP_US), sf.lit(True))
    ev = (events.join(categories.select(ITEM_ID, "category"), ITEM_ID, "left")
          .withColumn("_new", new_session.cast("int"))
          # A session's length = the sum of the gaps between its consecutive events.
          .withColumn("_gap_us", sf.when(sf.col("_new") == 1, sf.lit(0)).otherwise(gap).cast("long")))
    per_item = ev.groupBy(USER_ID, ITEM_ID, "day").agg(
        sf.coalesce(sf.max("category"), sf.lit(UNKNOWN_CATEGORY)).alias("category"),
        sf.count(sf.lit(1)).alias("n_total"),
        *(_count_of(e).alias(f"n_{e}") for e in USER_EVENT_COUNTS),
        sf.max("ts_us").alias("last_us"),
        sf.sum("_new").cast("long").alias("n_sessions"),
        sf.sum("_gap_us").cast("long").alias("session_us"),
    ).withColumn("n_new_items", sf.when(sf.lag("day").over(Window.partitionBy(USER_ID, ITEM_ID).orderBy("day"))
                                        .isNull(), 1).otherwise(0))
    sums = [c for c in USER_COUNTS if c != "n_total"]
    per_category = per_item.groupBy(USER_ID, "day", "category").agg(
        sf.sum("n_total").cast("long").alias("n_total"),
        *(sf.sum(c).cast("long").alias(c) for c in sums),
        sf.max("last_us").alias("last_us"),
        sf.collect_list(sf.struct((-sf.col("last_us")).alias("neg_us"), sf.col(ITEM_ID))).alias("pairs"),
    )
    return per_category.groupBy(USER_ID, "day").agg(
        *(sf.sum(c).cast("long").alias(c) for c in USER_COUNTS),
        sf.max("last_us").alias("last_us"),
        sf.collect_list(sf.struct("category", sf.col("n_total").alias("n"))).alias("cats"),
        # The day's items, most recent first, ties broken by id.
        sf.transform(sf.sort_array(sf.flatten(sf.collect_list("pairs"))), lambda p: p[ITEM_ID]).alias("items"),
    )


def _user_features(events: DataFrame, categories: DataFrame, end_day: int) -> DataFrame:
    per_day = _user_days(events, categories)
    fields = ["day", *USER_COUNTS, "last_us", "cats", "items"]
    folded = (per_day.groupBy(USER_ID).agg(sf.sort_array(sf.collect_list(sf.struct(*fields))).alias("days"))
              .withColumn("states", sf.expr(_USER_FOLD))
              .select(USER_ID, sf.inline(sf.arrays_zip("days", "states")))
              .select(USER_ID, *(sf.col(f"days.{f}").alias(f) for f in fields if f not in ("cats", "items")),
                      sf.expr(_TOP_CATEGORIES).alias("top"),
                      sf.array_join("states.items", LAST_ITEMS_SEPARATOR).alias("last_items")))
    by_day = Window.partitionBy(USER_ID).orderBy("day")
    cum = by_day.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    sparse = folded.select(
        USER_ID, "day", "last_us", "top", "last_items", sf.lead("day").over(by_day).alias("_next_day"),
        *(sf.sum(c).over(cum).cast("long").alias(c) for c in USER_COUNTS),
    )
    full = (sparse.withColumn("day", _expand_days(end_day)).drop("_next_day")
            .withColumn("end_us", (sf.col("day").cast("long") + 1) * sf.lit(DAY_US)))
    total = sf.col("n_total")
    ks = range(1, TOP_CATEGORIES + 1)
    top = [sf.try_element_at("top", sf.lit(k)) for k in ks]
    return full.select(
        USER_ID, *_snapshot_columns(),
        total.alias("user_total_interactions"),
        sf.col("n_new_items").alias("user_unique_items"),
        *(sf.col(f"n_{e}").alias(name) for e, name in USER_EVENT_COUNTS.items()),
        _ratio("n_click", sf.col("n_view")).alias("user_ctr"),
        (sf.col("n_purchase").cast("double") / (sf.col("n_click") + 1).cast("double")).alias("user_conversion_rate"),
        ((sf.col("end_us") - sf.col("last_us")).cast("double") / sf.lit(float(DAY_US))).alias(
            "user_days_since_last_event"),
        *(t.getField("key").alias(f"user_top{k}_category") for k, t in zip(ks, top, strict=True)),
        *(sf.when(t.isNotNull(), t.getField("value").cast("double") / total.cast("double")).alias(f"user_top{k}_share")
          for k, t in zip(ks, top, strict=True)),
        _ratio("n_total", sf.col("n_sessions")).alias("user_mean_session_events"),
        sf.when(sf.col("n_sessions") > 0, sf.col("session_us").cast("double")
                / (sf.col("n_sessions") * MINUTE_US).cast("double")).otherwise(0.0).alias("user_mean_session_minutes"),
        sf.col("last_items").alias("user_last_items"),
    )


def compute_user_features(spark: SparkSession, interactions_df: DataFrame, items_df: DataFrame,
                          end_date: str | None = None) -> DataFrame:
    """Daily ``user_features`` snapshots (columns :data:`USER_FEATURE_COLUMNS`).

    Args:
        spark: the session (the inputs belong to it).
        interactions_df: ``user_id, item_id, timestamp`` (UTC timestamp), ``event_type``.
        items_df: ``item_id, category, created_at``.
        end_date: last snapshot day ``YYYY-MM-DD``; default the last day with an event.
    """
    end_day = resolve_end_day(interactions_df, end_date)
    if end_day is None:
        return spark.createDataFrame([], _empty_schema(USER_FEATURE_COLUMNS, USER_ID))
    return _user_features(_events(interactions_df, end_day), _categories(items_df), end_day)


# ---------------------------------------------------------------------------------------------
# Item features (shuffled once, by item, like the user features)

ITEM_COUNTS = ["n_total", *(f"n_{e}" for e in ITEM_EVENT_COUNTS), "n_new_users"]


def _item_features(spark: SparkSession, events: DataFrame, catalog: DataFrame, end_day: int,
                   counts_by_day: dict[int, int]) -> DataFrame:
    """Daily item snapshots (see :func:`compute_item_features`); ``counts_by_day``: events per day."""
    per_user = (events.repartition(ITEM_ID).groupBy(ITEM_ID, USER_ID, "day").agg(
        sf.count(sf.lit(1)).alias("n_total"),
        *(_count_of(e).alias(f"n_{e}") for e in ITEM_EVENT_COUNTS),
        sf.min("ts_us").alias("first_us"),
    ).withColumn("n_new_users", sf.when(sf.lag("day").over(Window.partitionBy(ITEM_ID, USER_ID).orderBy("day"))
                                        .isNull(), 1).otherwise(0)))
    per_day = per_user.groupBy(ITEM_ID, "day").agg(
        *(sf.sum(c).cast("long").alias(c) for c in ITEM_COUNTS), sf.min("first_us").alias("first_us"))
    # An item exists from created_at or its first event, whichever is earlier. Its rows start no
    # earlier than the day before the data's first event: older rows would be all zeros, and no
    # request is older than the data. Catalog items without events have one row with a null day.
    data_start = min(counts_by_day) - 1 if counts_by_day else None
    by_item = Window.partitionBy(ITEM_ID)
    by_day = by_item.orderBy("day")
    cum = by_day.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    birth_day = _day_of_us("birth_us")
    sparse = (
        per_day.join(catalog, ITEM_ID, "full")
        .withColumn("birth_us", sf.least("created_us", sf.min("first_us").over(by_item)))
        .withColumn("first_day", birth_day if data_start is None else sf.greatest(birth_day, sf.lit(data_start)))
        .where(sf.col("birth_us").isNotNull() & (sf.col("first_day") <= end_day))
        .select(ITEM_ID, "day", "first_day", "birth_us",
                sf.coalesce("category", sf.lit(UNKNOWN_CATEGORY)).alias("item_category"),
                sf.coalesce("n_total", sf.lit(0)).alias("n_day"),
                sf.lead("day").over(by_day).alias("_next_day"),
                sf.row_number().over(by_day).alias("_rank"),
                *(sf.sum(sf.coalesce(c, sf.lit(0))).over(cum).cast("long").alias(c) for c in ITEM_COUNTS))
    )
    # The first row also stands for the days from the item's first day to its first event, with
    # nothing counted yet (a catalog item without events: up to the end day).
    start = sf.when(sf.col("_rank") == 1, sf.col("first_day")).otherwise(sf.col("day"))
    before = sf.col("day").isNull() | (sf.col("_d") < sf.col("day"))
    full = (sparse.withColumn("_d", _expand_days(end_day, start))
            .select(ITEM_ID, "birth_us", "item_category",
                    sf.col("_d").alias("day"),
                    sf.when(before | (sf.col("_d") > sf.col("day")), 0).otherwise(sf.col("n_day")).alias("n_day"),
                    *(sf.when(before, sf.lit(0).cast("long")).otherwise(sf.col(c)).alias(c) for c in ITEM_COUNTS)))
    # All interactions up to each day: a tiny table (one row per day), summed on the driver in integers.
    running, all_cum = 0, []
    for day in range(end_day + 1 if data_start is None else data_start, end_day + 1):
        running += counts_by_day.get(day, 0)
        all_cum.append((day, running))
    all_cum_df = spark.createDataFrame(all_cum, "day int, all_cum long")
    dense = Window.partitionBy(ITEM_ID).orderBy("day")
    full = (full.withColumn("recent", sf.sum("n_day").over(dense.rangeBetween(-(RECENT_DAYS - 1), 0)).cast("long"))
            .withColumn("trend", sf.sum("n_day").over(dense.rangeBetween(-(TRENDING_DAYS - 1), 0)).cast("long"))
            .join(sf.broadcast(all_cum_df), "day", "left")
            .withColumn("end_us", (sf.col("day").cast("long") + 1) * sf.lit(DAY_US)))
    total = sf.col("n_total")
    return full.select(
        ITEM_ID, *_snapshot_columns(),
        *(sf.col(f"n_{e}").alias(name) for e, name in ITEM_EVENT_COUNTS.items()),
        total.alias("item_total_interactions"),
        sf.col("n_new_users").alias("item_unique_users"),
        _ratio("n_click", sf.col("n_view")).alias("item_ctr"),
        (sf.col("n_purchase").cast("double") / (sf.col("n_click") + 1).cast("double")).alias("item_conversion_rate"),
        _ratio("n_total", sf.col("all_cum")).alias("item_popularity"),
        sf.col("recent").alias("item_interactions_30d"),
        (sf.col("trend").cast("double") / (total + 1).cast("double")).alias("item_trending_score"),
        ((sf.col("end_us") - sf.col("birth_us")).cast("double") / sf.lit(float(DAY_US))).alias("item_age_days"),
        "item_category",
    )


def compute_item_features(spark: SparkSession, interactions_df: DataFrame, items_df: DataFrame,
                          end_date: str | None = None) -> DataFrame:
    """Daily ``item_features`` snapshots (columns :data:`ITEM_FEATURE_COLUMNS`).

    Items without events get rows from their ``created_at`` day (cold start). ``item_age_days``
    counts from ``created_at``, or from the first event when that is earlier or ``created_at`` is null.

    Args:
        spark: the session (the inputs belong to it).
        interactions_df: ``user_id, item_id, timestamp`` (UTC timestamp), ``event_type``.
        items_df: ``item_id, category, created_at``.
        end_date: last snapshot day ``YYYY-MM-DD``; default the last day with an event.
    """
    end_day = resolve_end_day(interactions_df, end_date)
    if end_day is None:
        return spark.createDataFrame([], _empty_schema(ITEM_FEATURE_COLUMNS, ITEM_ID))
    events = _events(interactions_df, end_day)
    return _item_features(spark, events, _categories(items_df), end_day, day_counts(events))


def _empty_schema(columns: list[str], key: str) -> str:
    """DDL of an empty result (only used when there is nothing to compute)."""
    strings = {key, SNAPSHOT_DATE, "user_last_items", "item_category",
               *(f"user_top{k}_category" for k in range(1, TOP_CATEGORIES + 1))}
    longs = {*USER_EVENT_COUNTS.values(), *ITEM_EVENT_COUNTS.values(), "user_total_interactions",
             "user_unique_items", "item_total_interactions", "item_unique_users", "item_interactions_30d"}

    def kind(c: str) -> str:
        if c in strings:
            return "string"
        if c in (EVENT_TIMESTAMP, CREATED_TIMESTAMP):
            return "timestamp"
        return "bigint" if c in longs else "double"

    return ", ".join(f"{c} {kind(c)}" for c in columns)


# ---------------------------------------------------------------------------------------------
# The job


def _write(df: DataFrame, path: Path, key: str) -> dict[str, Any]:
    """Parquet partitioned by ``snapshot_date``, one file per day, rows sorted by entity id.

    Dynamic partition overwrite: only the days in ``df`` are written (new days, or the leftovers of a
    job that died before recording them); recorded days are never in ``df``.

    Returns:
        The rows written and their first and last ``snapshot_date`` (observed while writing).
    """
    observation = Observation(path.name)
    observed = df.observe(observation, sf.count(sf.lit(1)).alias("rows"),
                          sf.min(SNAPSHOT_DATE).alias("first_day"), sf.max(SNAPSHOT_DATE).alias("last_day"))
    (observed.repartition(SNAPSHOT_DATE).sortWithinPartitions(SNAPSHOT_DATE, key)
     .write.mode("overwrite").option("partitionOverwriteMode", "dynamic")
     .partitionBy(SNAPSHOT_DATE).parquet(str(path)))
    return observation.get


class FeaturesResult(TypedDict, total=False):
    """What the feature job wrote, and the days a run may read (with each partition's SHA-256)."""

    user_features: str
    item_features: str
    rows: dict[str, int]  # rows written by this job, per table
    written_days: dict[str, list[str]]  # days written by this job, per table
    first_day: str | None  # the readable range: recorded days up to the run's end day
    last_day: str | None
    days: int
    partitions: dict[str, dict[str, str]]  # table -> day -> SHA-256 of every readable partition
    seconds: float
    summary: str  # features.json, added by the stage


PARTITIONS_FILE = "_partitions.json"  # Spark and DuckDB's glob both skip it: not a data file


def recorded_partitions(table_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The days a table holds for good: ``{day: {sha256, rows, files, created_at}}`` (empty if none)."""
    path = Path(table_dir) / PARTITIONS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def partition_sha256(part_dir: Path) -> tuple[str, int, list[str]]:
    """SHA-256 over a partition's parquet files (names and bytes, in name order), its rows and file names."""
    import hashlib

    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    files = sorted(part_dir.glob("*.parquet"))
    rows = 0
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
        rows += pq.read_metadata(f).num_rows
    return digest.hexdigest(), rows, [f.name for f in files]


def _record(table_dir: Path, days: list[str], job_time: datetime) -> dict[str, dict[str, Any]]:
    """Add the newly written days (with their checksums) to the table's record; returns the whole record."""
    record = recorded_partitions(table_dir)
    for day in days:
        sha, rows, files = partition_sha256(table_dir / f"{SNAPSHOT_DATE}={day}")
        record[day] = {"sha256": sha, "rows": rows, "files": files, "created_at": job_time.isoformat()}
    tmp = table_dir / (PARTITIONS_FILE + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(record.items())), indent=1))
    tmp.replace(table_dir / PARTITIONS_FILE)
    return record


def last_complete_day(complete_before: datetime | str | None) -> int | None:
    """The last UTC day that is over at ``complete_before`` (its day number); None means no limit."""
    if complete_before is None:
        return None
    moment = datetime.fromisoformat(str(complete_before).replace("Z", "+00:00"))
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return day_number(moment.date()) - 1


def build_features(spark: SparkSession, contract_dir: str | Path, out_dir: str | Path,
                   end_date: str | None = None, complete_before: datetime | str | None = None,
                   job_time: datetime | None = None) -> FeaturesResult:
    """Append the new days of the daily ``user_features`` and ``item_features`` snapshots of a contract directory.

    Writes ``out_dir/user_features/`` and ``out_dir/item_features/`` as parquet partitioned by
    ``snapshot_date=YYYY-MM-DD``: only days after the last recorded one, up to the end day; recorded
    days are never rewritten, so a re-run with nothing new writes nothing.

    Args:
        spark: the session (see :func:`pipeline_tasks.features.spark.get_spark`).
        contract_dir: a directory with ``interactions.parquet`` and ``items.parquet``.
        out_dir: where the two tables go.
        end_date: last snapshot day ``YYYY-MM-DD``; default the last day with an event.
        complete_before: the run's ``as_of``: days not over by then are not written (default: now).
        job_time: the ``created_timestamp`` of the new rows (default: now).

    Returns:
        Paths, rows written per table, the days written, the run's readable day range (first..last
        recorded day up to the end day) with each partition's SHA-256, and the wall time in seconds.
    """
    started = time.perf_counter()
    job_time = (job_time or datetime.now(UTC)).astimezone(UTC)
    # Also on a session that did not come from get_spark: timestamps as parquet TIMESTAMP(MICROS, UTC).
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    out_dir = Path(out_dir)
    paths = {USER_FEATURES: out_dir / USER_FEATURES, ITEM_FEATURES: out_dir / ITEM_FEATURES}
    interactions, items = read_contract_tables(spark, contract_dir)
    counts_by_day = day_counts(_events(interactions, None))
    end_day = day_number(end_date) if end_date is not None else max(counts_by_day, default=None)
    complete = last_complete_day(job_time if complete_before is None else complete_before)
    if end_day is not None and complete is not None and end_day > complete:
        log.info("days after %s are not over yet at %s: not written", day_string(complete),
                 complete_before or job_time)
        end_day = complete
    result = FeaturesResult(user_features=str(paths[USER_FEATURES]), item_features=str(paths[ITEM_FEATURES]),
                            rows={USER_FEATURES: 0, ITEM_FEATURES: 0}, written_days={}, first_day=None,
                            last_day=None, days=0, partitions={})
    if end_day is None:
        log.warning("%s: no interactions and no end_date: no feature rows written", contract_dir)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result
    events = _events(interactions, end_day)
    catalog = _categories(items)
    counts_by_day = {day: n for day, n in counts_by_day.items() if day <= end_day}
    frames = {
        USER_FEATURES: (_user_features(events, catalog, end_day).select(USER_FEATURE_COLUMNS), USER_ID),
        ITEM_FEATURES: (_item_features(spark, events, catalog, end_day, counts_by_day)
                        .select(ITEM_FEATURE_COLUMNS), ITEM_ID),
    }
    stamp = sf.timestamp_micros(sf.lit(int(job_time.timestamp() * 1_000_000)))
    for table, (frame, key) in frames.items():
        recorded = recorded_partitions(paths[table])
        last = max(recorded, default=None)
        if last is None or last < day_string(end_day):
            new = frame if last is None else frame.where(sf.col(SNAPSHOT_DATE) > sf.lit(last))
            result["rows"][table] = int(_write(new.withColumn(CREATED_TIMESTAMP, stamp), paths[table], key)["rows"])
        days = sorted(p.name.split("=", 1)[1] for p in paths[table].glob(f"{SNAPSHOT_DATE}=*")
                      if p.name.split("=", 1)[1] not in recorded and p.name.split("=", 1)[1] <= day_string(end_day))
        result["written_days"][table] = days
        record = _record(paths[table], days, job_time) if days else recorded
        readable = {day: info["sha256"] for day, info in record.items() if day <= day_string(end_day)}
        result["partitions"][table] = readable
        if last is not None and not days:
            log.info("%s: every day up to %s is already recorded; nothing new to write", table, last)
    readable_days = [d for table in result["partitions"].values() for d in table]
    result["first_day"] = min(readable_days, default=None)
    result["last_day"] = max(readable_days, default=None)
    result["days"] = (day_number(result["last_day"]) - day_number(result["first_day"]) + 1
                      if readable_days else 0)
    result["seconds"] = round(time.perf_counter() - started, 2)
    log.info("build_features %s -> %s: wrote days %s, rows %s; readable %s..%s in %.1f s", contract_dir, out_dir,
             {t: (d[0] + ".." + d[-1]) if d else "none" for t, d in result["written_days"].items()},
             result["rows"], result["first_day"], result["last_day"], result["seconds"])
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline_tasks.features.snapshots``: run :func:`build_features`, print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipeline_tasks.features.snapshots",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("contract_dir", help="directory with interactions.parquet and items.parquet")
    parser.add_argument("out_dir", help="where user_features/ and item_features/ are written")
    parser.add_argument("--master", default=None, help="Spark master URL (default: RECSYS_SPARK_MASTER or local[*])")
    parser.add_argument("--end-date", default=None, help="last snapshot day YYYY-MM-DD (default: last event day)")
    parser.add_argument("--complete-before", default=None,
                        help="ISO-8601 moment: days not over by then are not written (default: now)")
    parser.add_argument("--job-time", default=None, help="ISO-8601 created_timestamp of the new rows (default: now)")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline_tasks.features.spark import get_spark

    conf = dict(item.split("=", 1) for item in args.conf)
    spark = get_spark(master=args.master, app_name="recsys-build-features", conf=conf)
    try:
        job_time = datetime.fromisoformat(args.job_time.replace("Z", "+00:00")) if args.job_time else None
        result = build_features(spark, args.contract_dir, args.out_dir, end_date=args.end_date,
                                complete_before=args.complete_before, job_time=job_time)
        # Block managers include the driver's: executors = size - 1 outside local mode.
        result["master"] = spark.sparkContext.master
        result["executors"] = max(spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1, 0)
    finally:
        spark.stop()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
