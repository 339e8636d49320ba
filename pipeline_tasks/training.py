"""The training pipeline's stages as single calls (what each ``recsys_training`` task runs).

Each stage takes the run id, the run's params and its upstream task's small output dict, writes
under ``<artifact_root>/<run>/<task>/`` via :func:`pipeline_tasks.runs.run_stage`, and returns a
small dict of URIs and figures (the XCom). No Airflow import: tests and the CLI call these too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.constants import DEFAULT_PARAMS
from pipeline_tasks.runs import run_dir, run_stage, safe_run_id, snapshot_hash, start_run, update_manifest
from pipeline_tasks.settings import load_settings
from pipeline_tasks.split import SplitConfig
from pipeline_tasks.validate import ValidationConfig, to_utc


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults, then settings (environment), then the run's own params."""
    settings = load_settings()
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    for key, value in (("quality_threshold", settings.quality_threshold), ("horizon_days", settings.horizon_days),
                       ("bot_events_per_day", settings.bot_events_per_day)):
        if merged.get(key) is None:
            merged[key] = value
    merged["event_types"] = list(settings.event_types)
    return merged


def validation_config(params: dict[str, Any]) -> ValidationConfig:
    p = resolve_params(params)
    return ValidationConfig(
        as_of=to_utc(p["as_of"]) if p["as_of"] else None,
        horizon_days=int(p["horizon_days"]),
        bot_events_per_day=int(p["bot_events_per_day"]),
        event_types=tuple(p["event_types"]),
        quality_threshold=float(p["quality_threshold"]),
    )


def split_config(params: dict[str, Any]) -> SplitConfig:
    p = resolve_params(params)
    return SplitConfig(t_val=p["t_val"], t_test=p["t_test"])


def ingest_stage(run_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Open the run manifest and turn the data source into a contract directory."""
    from pipeline_tasks.ingest import ingest

    p = resolve_params(params)
    start_run(run_id, config=p)
    out = run_stage(run_id, "ingest", ingest, source=p["source"], synthetic=p["synthetic"])
    update_manifest(run_dir(run_id), input_rows=out["counts"])
    return out


def validate_stage(run_id: str, params: dict[str, Any] | None, ingested: dict[str, Any]) -> dict[str, Any]:
    """GX validation + quarantine + quality gate; records the accepted data's snapshot hash."""
    from pipeline_tasks.validate import validate_contract_dir

    out = run_stage(run_id, "validate", validate_contract_dir, input_dir=ingested["contract_dir"],
                    config=validation_config(params))
    update_manifest(run_dir(run_id), data={"snapshot_sha256": snapshot_hash(out["accepted_dir"]),
                                           "accepted_dir": out["accepted_dir"], "counts": out["counts"]})
    return out


def split_stage(run_id: str, params: dict[str, Any] | None, validated: dict[str, Any]) -> dict[str, Any]:
    """Time-based split of the accepted interactions."""
    from pipeline_tasks.split import split_contract_dir

    return run_stage(run_id, "split", split_contract_dir, accepted_dir=validated["accepted_dir"],
                     config=split_config(params))


def _snapshot_day_before(ts: str) -> str:
    """The snapshot valid at ``ts``: the one of the UTC day before (rows are stamped at the day's end)."""
    return (to_utc(ts).floor("D") - pd.Timedelta(days=1)).date().isoformat()


def build_features_stage(run_id: str, params: dict[str, Any] | None, validated: dict[str, Any]) -> dict[str, Any]:
    """Spark daily feature snapshots of the accepted data into the long-lived offline store."""

    def work(out_dir: Path) -> dict[str, Any]:
        from pipeline_tasks.feature_store import feature_store_lock, offline_table_dir
        from pipeline_tasks.features import build_features
        from pipeline_tasks.spark import get_spark

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
    from pipeline_tasks.feature_store import apply_repo

    return run_stage(run_id, "feast_apply", lambda out_dir: apply_repo())


def materialize_stage(run_id: str, features: dict[str, Any]) -> dict[str, Any]:
    """Load the newest snapshot values into the online store (incremental)."""
    from pipeline_tasks.feature_store import materialize

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
        from pipeline_tasks.context_features import context_features
        from pipeline_tasks.feature_store import training_set_stage as retrieve

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


# Rates and shares, not running totals: totals grow by construction and would always "drift".
DRIFT_FEATURE_COLUMNS = {
    "user_features": ["user_ctr", "user_conversion_rate", "user_top1_share", "user_mean_session_events"],
    "item_features": ["item_ctr", "item_conversion_rate", "item_trending_score"],
}


def _feature_rows_on(day: str) -> pd.DataFrame:
    parts = [rows[columns] for rows, columns in zip(snapshot_rows(day, DRIFT_FEATURE_COLUMNS),
                                                    DRIFT_FEATURE_COLUMNS.values(), strict=True)
             if rows is not None]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def drift_check_stage(run_id: str, params: dict[str, Any] | None, validated: dict[str, Any],
                      split: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    """Evidently PSI drift of the newest window (test) vs the reference (the training window)."""
    from pipeline_tasks.drift import DriftConfig, drift_check_split

    p = resolve_params(params)

    def work(out_dir: Path) -> dict[str, Any]:
        ref = _feature_rows_on(_snapshot_day_before(split["t_val"]))
        cur = _feature_rows_on(features["last_day"])
        extra = {}
        if len(ref) and len(cur):
            extra = {"extra_reference_path": out_dir / "reference_features.parquet",
                     "extra_current_path": out_dir / "current_features.parquet"}
            ref.to_parquet(extra["extra_reference_path"], index=False)
            cur.to_parquet(extra["extra_current_path"], index=False)
        config = DriftConfig(threshold=float(p["drift_threshold"]), mode=p["drift_mode"])
        return drift_check_split(Path(split["split_info"]).parent, validated["accepted_dir"], out_dir, config, **extra)

    return run_stage(run_id, "drift_check", work)


def snapshot_rows(day: str, columns: dict[str, list[str]] | None = None
                  ) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The user and item feature rows of one daily snapshot (``None`` where the store has no such partition);
    ``columns`` limits what is read, per table."""
    from pipeline_tasks.feature_store import offline_table_dir

    out: list[pd.DataFrame | None] = []
    for table in ("user_features", "item_features"):
        part = offline_table_dir(table) / f"snapshot_date={day}"
        wanted = (columns or {}).get(table)
        out.append(pd.read_parquet(part, columns=wanted) if part.exists() else None)
    return out[0], out[1]


def snapshot_at(moment: pd.Timestamp) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The feature rows valid at ``moment``: the snapshot of the UTC day before (what the online store serves)."""
    return snapshot_rows(_snapshot_day_before(str(moment)))


def train_two_tower_stage(run_id: str, params: dict[str, Any] | None, validated: dict[str, Any],
                          split: dict[str, Any], training_set: dict[str, Any] | None) -> dict[str, Any]:
    """Two-tower + MF retrieval models by the offline protocol, logged to MLflow with curves and artifacts."""
    from pipeline_tasks.retrieval import RetrievalConfig, train_retrieval
    from pipeline_tasks.tracking import RETRIEVAL_EXPERIMENT, log_artifacts, log_flat, mlflow_run

    p = resolve_params(params)
    config = RetrievalConfig.from_params(p.get("two_tower"))
    manifest = json.loads((run_dir(run_id) / "manifest.json").read_text())

    def work(out_dir: Path) -> dict[str, Any]:
        ts_path = training_set["training_set"] if training_set else None
        split_dir = Path(split["split_info"]).parent
        tags = {"recsys.run_id": run_id, "recsys.data_snapshot_sha256": manifest.get("data", {}).get("snapshot_sha256"),
                "recsys.git_sha": manifest.get("code", {}).get("git_sha"), "recsys.source": p["source"],
                "recsys.feature_service": "two_tower_v1"}
        with mlflow_run(RETRIEVAL_EXPERIMENT, run_name=f"two_tower {run_id}", tags=tags) as run:
            import mlflow

            result = train_retrieval(out_dir, split_dir, validated["accepted_dir"], config, training_set=ts_path,
                                     snapshot=snapshot_at)
            metrics = json.loads(Path(result["metrics"]).read_text())
            chosen = metrics["models"]["two_tower"]["chosen"]
            mlflow.log_params({**{f"two_tower.{k}": v for k, v in chosen.items()},
                               **{f"mf.{k}": v for k, v in metrics["models"]["mf"]["chosen"].items()},
                               "content_method": metrics["content_method"], "t_val": split["t_val"],
                               "t_test": split["t_test"], "grid_size": len(config.grid)})
            for name in ("two_tower", "mf"):
                for trial_no, trial in enumerate(metrics["models"][name]["trials"]):
                    for row in trial["history"]:  # learning curves, one series per grid trial
                        log_flat(f"{name}.trial{trial_no}.", {k: v for k, v in row.items() if k != "epoch"},
                                 step=int(row["epoch"]))
            for name, model in metrics["models"].items():
                log_flat(f"test.{name}.", model["test"])
                log_flat(f"test.{name}.ci_low.", {k: v[0] for k, v in model["test"]["ci95"].items()})
                log_flat(f"test.{name}.ci_high.", {k: v[1] for k, v in model["test"]["ci95"].items()})
            log_artifacts({"model": result["model_dir"], "mf_model": result["mf_model_dir"],
                           "metrics": result["metrics"]})
            return {**result, "mlflow_run_id": run.info.run_id, "mlflow_experiment": RETRIEVAL_EXPERIMENT}

    return run_stage(run_id, "train_two_tower", work)


def build_index_stage(run_id: str, params: dict[str, Any] | None, trained: dict[str, Any],
                      features: dict[str, Any] | None) -> dict[str, Any]:
    """FAISS index of every catalog item (embedded with the newest feature snapshot), tuned to the recall
    target on held-out users, published as version 1 of this model's serving index."""
    import numpy as np

    from pipeline_tasks.index import IndexConfig, build_index
    from pipeline_tasks.item_refresh import index_lock, publish, version_dir
    from pipeline_tasks.tracking import RETRIEVAL_EXPERIMENT, log_artifacts, log_flat, mlflow_run
    from pipeline_tasks.two_tower import load_model

    p = resolve_params(params)
    index_config = IndexConfig(**(p.get("index") or {}))

    def work(out_dir: Path) -> dict[str, Any]:
        model = load_model(trained["model_dir"])
        _, item_rows = snapshot_rows(features["last_day"]) if features else (None, None)
        vectors = model.item_embeddings(item_rows)
        queries = np.load(trained["query_embeddings"])
        key = safe_run_id(run_id)
        target = version_dir(key, 1)
        with index_lock():
            provenance = {"model_dir": trained["model_dir"], "mlflow_run_id": trained.get("mlflow_run_id")}
            meta = build_index(vectors, model.encoder.item_ids, queries, target, index_config, parent=provenance)
            pointer = publish({"model_key": key, "run_id": run_id, "model_dir": trained["model_dir"],
                               "index_dir": str(target), "version": 1, "sha256": meta["sha256"],
                               "n_items": meta["n_items"], "source": p["source"], "parent": None,
                               "content_method": model.encoder.content_method})
        (out_dir / "index.json").write_text(json.dumps(meta, indent=2, default=str))
        if trained.get("mlflow_run_id"):
            with mlflow_run(RETRIEVAL_EXPERIMENT, run_id=trained["mlflow_run_id"]):
                log_flat("index.", {k: meta[k] for k in ("recall_at_k", "build_seconds", "memory_bytes",
                                                         "latency_ms_p50", "latency_ms_p99", "n_items")
                                    if meta.get(k) is not None})
                log_artifacts({"index": out_dir / "index.json"})
        summary = {k: meta.get(k) for k in ("kind", "n_items", "k", "recall_at_k", "target_reached",
                                            "latency_ms_p50", "latency_ms_p99", "memory_bytes", "build_seconds")}
        return {**summary, "index_dir": str(target), "sha256": pointer["sha256"], "meta": str(out_dir / "index.json")}

    return run_stage(run_id, "build_index", work)


def refresh_items_stage(run_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The hourly item refresh: embed new catalog items and publish the next index version."""
    from pipeline_tasks.item_refresh import refresh_items

    start_run(run_id, config=dict(params or {}))
    source = (params or {}).get("source") or None
    return run_stage(run_id, "refresh_items", refresh_items, source=source)
