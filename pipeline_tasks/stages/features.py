"""Feature stages: Spark snapshots into the offline store, feast apply, materialize, the point-in-time training set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline_tasks.core.runs import MANIFEST, run_dir, run_stage, safe_run_id, update_manifest
from pipeline_tasks.data.split import SplitResult
from pipeline_tasks.data.validate import ValidationResult
from pipeline_tasks.features.history import TrainingSetResult, end_of_day
from pipeline_tasks.stages.common import run_config, run_features, run_settings

if TYPE_CHECKING:  # snapshots imports pyspark: only the Spark task loads it
    from pipeline_tasks.features.snapshots import FeaturesResult



def build_features_stage(run_id: str, validated: ValidationResult) -> FeaturesResult:
    """Spark daily feature snapshots of the accepted data, appended to the source's long-lived offline store.

    Only complete days (before the run's ``as_of``, default its start) after the last recorded one are
    written; the manifest records the namespace and every partition the run may read, with its SHA-256.
    """

    def work(out_dir: Path) -> FeaturesResult:
        from pipeline_tasks.features.snapshots import FeatureInputError, FeaturesResult, build_features
        from pipeline_tasks.features.spark import get_spark
        from pipeline_tasks.features.store import feature_store_lock
        from pipeline_tasks.online.feature_store import offline_table_dir

        config = run_config(run_id)
        settings = run_settings(config)
        started = json.loads((run_dir(run_id) / MANIFEST).read_text())["started_at"]
        offline = offline_table_dir("user_features", settings).parent
        with feature_store_lock(settings):  # one writer at a time (training DAG, item refresh)
            spark = get_spark(settings, app_name=f"recsys-build-features-{safe_run_id(run_id)}")
            try:
                result = build_features(spark, validated["accepted_dir"], offline,
                                        complete_before=config["as_of"] or started)
            finally:
                spark.stop()
        if result["last_day"] is None:
            raise FeatureInputError(f"no complete day of events before {config['as_of'] or started}: nothing to "
                                    "build features from (set as_of later, or wait for the day to end)")
        (out_dir / "features.json").write_text(json.dumps(result, indent=2))
        update_manifest(run_dir(run_id), features={
            "namespace": settings.namespace, "feature_store": str(settings.feature_store_dir),
            "first_day": result["first_day"], "last_day": result["last_day"], "partitions": result["partitions"]})
        summary = {k: v for k, v in result.items() if k != "partitions"}  # the manifest has them; keep XComs small
        return FeaturesResult(**summary, summary=str(out_dir / "features.json"))

    return run_stage(run_id, "build_features", work)


def feast_apply_stage(run_id: str) -> dict[str, Any]:
    """Register the feature repo's entities, views and services for the run's source (idempotent)."""
    from pipeline_tasks.features.store import apply_repo

    settings = run_settings(run_config(run_id))
    return run_stage(run_id, "feast_apply", lambda out_dir: apply_repo(settings))


def materialize_stage(run_id: str, features: FeaturesResult) -> dict[str, Any]:
    """Load the newest snapshot values into the online store (incremental)."""
    from pipeline_tasks.features.store import materialize

    settings = run_settings(run_config(run_id))
    return run_stage(run_id, "materialize", lambda out_dir: materialize(features["last_day"], settings))


def training_entity_rows(split: SplitResult) -> pd.DataFrame:
    """Label-time rows of every interaction of the three windows (the serving fit trains on all of them)."""
    frames = []
    for window in ("train", "validation", "test"):
        df = pd.read_parquet(split[window])
        frames.append(df.assign(window=window))
    rows = pd.concat(frames, ignore_index=True)
    return rows.rename(columns={"timestamp": "event_timestamp"})


def training_set_stage(run_id: str, split: SplitResult) -> TrainingSetResult:
    """Point-in-time features (Feast historical retrieval, service ranker_v1) plus the request-time
    context features, one row per requested row in order."""

    def work(out_dir: Path) -> dict[str, Any]:
        from pipeline_tasks.features.history import training_set_stage as retrieve
        from pipeline_tasks.online.context_features import context_features

        rows = training_entity_rows(split)
        settings = run_settings(run_config(run_id))
        until = end_of_day(run_features(run_id)["last_day"])  # only the partitions this run recorded
        out = retrieve(rows, out_dir, feature_service="ranker_v1", settings=settings, until=until)
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
