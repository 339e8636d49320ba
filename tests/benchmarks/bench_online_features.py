"""Benchmark: online feature retrieval through the Feast SDK, SQLite (embedded) and Redis (production).

One request = one user's ranker_v1 features + N candidate items' features
(:func:`pipeline_tasks.feature_store.online_features` with a reused FeatureStore, i.e. two
``get_online_features`` calls). Synthetic daily snapshots are applied and materialized into a
temporary RECSYS_HOME; Redis keys live under a unique Feast project and are deleted afterwards.

Usage: .venv/bin/python tests/benchmarks/bench_online_features.py [--requests 200] [--items-per-request 500]
Prints latency percentiles (ms) per online store and the machine's core count as JSON. Not run in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_tasks.core.settings import Settings, disable_telemetry, load_settings
from pipeline_tasks.features import store as fs_store
from pipeline_tasks.online import feature_store as fs

log = logging.getLogger("bench")

USER_INT = ["user_total_interactions", "user_unique_items", "user_n_view", "user_n_click", "user_n_add_to_cart",
            "user_n_purchase", "user_n_favorite"]
USER_FLOAT = ["user_ctr", "user_conversion_rate", "user_days_since_last_event", "user_top1_share", "user_top2_share",
              "user_top3_share", "user_mean_session_events", "user_mean_session_minutes"]
USER_STR = ["user_top1_category", "user_top2_category", "user_top3_category"]
ITEM_INT = ["item_n_view", "item_n_click", "item_n_purchase", "item_total_interactions", "item_unique_users",
            "item_interactions_30d"]
ITEM_FLOAT = ["item_ctr", "item_conversion_rate", "item_popularity", "item_trending_score", "item_age_days"]


def synthetic_snapshot(n: int, prefix: str, day: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
    """One day's snapshot for ``n`` users (``prefix='u'``) or items (``'i'``) in the offline layout."""
    end = day + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    df = pd.DataFrame({f"{'user' if prefix == 'u' else 'item'}_id": [f"{prefix}{k}" for k in range(n)]})
    df["event_timestamp"] = end
    df["created_timestamp"] = end + pd.Timedelta(hours=1)
    df["snapshot_date"] = day.strftime("%Y-%m-%d")
    categories = np.array([f"genre{k}" for k in range(20)])
    if prefix == "u":
        for c in USER_INT:
            df[c] = rng.integers(0, 500, n)
        for c in USER_FLOAT:
            df[c] = rng.random(n)
        for c in USER_STR:
            df[c] = categories[rng.integers(0, 20, n)]
        df["user_last_items"] = ["|".join(f"i{j}" for j in rng.integers(0, 1000, 20)) for _ in range(n)]
    else:
        for c in ITEM_INT:
            df[c] = rng.integers(0, 5000, n)
        for c in ITEM_FLOAT:
            df[c] = rng.random(n)
        df["item_category"] = categories[rng.integers(0, 20, n)]
    return df


def prepare(settings: Settings, n_users: int, n_items: int, days: int) -> None:
    rng = np.random.default_rng(42)
    with fs_store.feature_store_lock(settings):
        for day in pd.date_range("1998-04-01", periods=days, freq="D", tz="UTC"):
            for table, n, prefix in (("user_features", n_users, "u"), ("item_features", n_items, "i")):
                df = synthetic_snapshot(n, prefix, day, rng)
                pq.write_to_dataset(pa.Table.from_pandas(df, preserve_index=False),
                                    fs.offline_table_dir(table, settings), partition_cols=["snapshot_date"],
                                    existing_data_behavior="delete_matching")


def measure(settings: Settings, args: argparse.Namespace, end_date: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    fs_store.apply_repo(settings)
    out = fs_store.materialize(end_date, settings)
    setup_s = time.perf_counter() - t0
    store = fs.get_store(settings)
    rng = np.random.default_rng(7)
    latencies = []
    for i in range(args.warmup + args.requests):
        user_id = f"u{rng.integers(args.users)}"
        item_ids = [f"i{k}" for k in rng.choice(args.items, args.items_per_request, replace=False)]
        t = time.perf_counter()
        user, items = fs.online_features(user_id, item_ids, store=store)
        elapsed = time.perf_counter() - t
        if i >= args.warmup:
            latencies.append(elapsed * 1000)
        assert user["user_total_interactions"] is not None and items["item_popularity"].notna().all()
    q = np.percentile(latencies, [50, 95, 99])
    return {
        "online_store": store.config.online_store.type,
        "apply_and_materialize_s": round(setup_s, 2),
        "materialized_entities": {k: v["entities"] for k, v in out["feature_views"].items()},
        "requests": len(latencies),
        "p50_ms": round(float(q[0]), 2),
        "p95_ms": round(float(q[1]), 2),
        "p99_ms": round(float(q[2]), 2),
        "mean_ms": round(statistics.fmean(latencies), 2),
        "max_ms": round(max(latencies), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--items-per-request", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--redis-url", default="127.0.0.1:6379")
    parser.add_argument("--profiles", default="embedded,production")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    disable_telemetry()
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "users": args.users,
        "items": args.items,
        "items_per_request": args.items_per_request,
    }
    end_date = (pd.Timestamp("1998-04-01") + pd.Timedelta(days=args.days - 1)).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        for profile in args.profiles.split(","):
            env = {**os.environ, "RECSYS_HOME": str(Path(tmp) / profile), "RECSYS_PROFILE": profile,
                   "RECSYS_REDIS_URL": args.redis_url}
            project = f"recsys_bench_{uuid.uuid4().hex[:8]}"
            settings = load_settings(env)
            settings = dataclasses.replace(settings, extra={**settings.extra, "feast_project": project})
            os.environ["RECSYS_HOME"] = env["RECSYS_HOME"]  # feature_repo resolves its source paths from it
            prepare(settings, args.users, args.items, args.days)
            try:
                results[profile] = measure(settings, args, end_date)
            finally:
                if profile == "production":
                    fs.get_store(settings).teardown()
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
