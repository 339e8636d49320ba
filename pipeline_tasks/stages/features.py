"""Feature stages: Spark snapshots into the offline store, feast apply, materialize, the point-in-time training set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.runs import run_stage, safe_run_id
from pipeline_tasks.core.settings import load_settings


def build_features_stage(run_id: str, validated: dict[str, Any]) -> dict[str, Any]:
    """Spark daily feature snapshots of the accepted data into the long-lived offline store."""

    def work(out_dir: Path) -> dict[str, Any]:
        from pipeline_tasks.features.snapshots import build_features
        from pipeline_tasks.features.spark import get_spark
        from pipeline_tasks.features.store import feature_store_lock
        from pipeline_tasks.online.feature_store import offline_table_dir

        settings = load_settings()
        offline = offline_table_dir("user_features", settings).parent
        with feature_store_lock(settings):  # one writer at a time (training DAG, item refresh)
            spark = get_spark(settings, app_name=f"recsys-build-features-{safe_run_id(run_id)}")
            try:
                result = build_features(spark, validated["accepted_dir"], offline)
            finally:
                spark.stop()
        (out_dir / "features.json").write_text(json.dumps(result, indent=2))
        return {**result, "summary": str(out_dir / "features.json")}

    return run_stage(run_id, "build_features", work)


def feast_apply_stage(run_id: str) -> dict[str, Any]:
    """Register the feature repo's entities, views and services (idempotent)."""
    from pipeline_tasks.features.store import apply_repo

    return run_stage(run_id, "feast_apply", lambda out_dir: apply_repo())


def materialize_stage(run_id: str, features: dict[str, Any]) -> dict[str, Any]:
    """Load the newest snapshot values into the online store (incremental)."""
    from pipeline_tasks.features.store import materialize

    return run_stage(run_id, "materialize", lambda out_dir: materialize(features["last_day"]))


def training_entity_rows(split: dict[str, Any]) -> pd.DataFrame:
    """Label-time rows for the ranker's training data: every train and validation interaction."""
    frames = []
    for window in ("train", "validation"):
        df = pd.read_parquet(split[window])
        frames.append(df.assign(window=window))
    rows = pd.concat(frames, ignore_index=True)
    return rows.rename(columns={"timestamp": "event_timestamp"})


def training_set_stage(run_id: str, split: dict[str, Any]) -> dict[str, Any]:
    """Point-in-time features (Feast historical retrieval, service ranker_v1) plus the request-time
    context features, one row per requested row in order."""

    def work(out_dir: Path) -> dict[str, Any]:
        from pipeline_tasks.features.history import training_set_stage as retrieve
        from pipeline_tasks.online.context_features import context_features

        rows = training_entity_rows(split)
        out = retrieve(rows, out_dir, feature_service="ranker_v1")
        path = Path(out["training_set"])
        df = pd.read_parquet(path)
        requests = df[["event_timestamp", "device", "location"]].rename(
            columns={"event_timestamp": "request_timestamp"})
        # The rows' event_timestamp is the label time here, not the snapshot's: leave it out so the
        # function takes the snapshot valid at the request (its UTC midnight), as serving does.
        rows_only = df.drop(columns=["event_timestamp"])
        context = context_features(requests, rows_only, rows_only)
        pd.concat([df, context], axis=1).to_parquet(path, index=False)
        return {**out, "context_columns": list(context.columns)}

    return run_stage(run_id, "training_set", work)
