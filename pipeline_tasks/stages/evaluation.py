"""Evaluation stages: the Evidently drift check of the newest window against the reference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline_tasks.core.runs import run_stage
from pipeline_tasks.core.settings import Settings
from pipeline_tasks.data.split import SplitResult
from pipeline_tasks.data.validate import ValidationResult
from pipeline_tasks.evaluation.drift import DriftResult
from pipeline_tasks.features.history import _snapshot_day_before, snapshot_rows
from pipeline_tasks.stages.common import run_config, run_features, run_settings

if TYPE_CHECKING:  # snapshots imports pyspark: only the Spark task loads it
    from pipeline_tasks.features.snapshots import FeaturesResult


log = logging.getLogger(__name__)

# Rates and shares, not running totals: totals grow by construction and would always "drift".
DRIFT_FEATURE_COLUMNS = {
    "user_features": ["user_ctr", "user_conversion_rate", "user_top1_share", "user_mean_session_events"],
    "item_features": ["item_ctr", "item_conversion_rate", "item_trending_score"],
}


def _feature_rows_on(day: str, settings: Settings) -> pd.DataFrame:
    parts = [rows[columns] for rows, columns in zip(snapshot_rows(day, DRIFT_FEATURE_COLUMNS, settings),
                                                    DRIFT_FEATURE_COLUMNS.values(), strict=True)
             if rows is not None]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def champion_reference(namespace: str, settings: Settings) -> tuple[Path | None, str | None]:
    """The champion's training data (its run's accepted interactions) and the moment its features are read at,
    once a champion exists; ``(None, None)`` before (the reference is then this run's training window)."""
    from pipeline_tasks.online.bundle import aliases_of, load_bundle, model_name

    name = model_name(namespace)
    version = aliases_of(name, settings).get("champion")
    if version is None:
        return None, None
    bundle = load_bundle(name, version=version, settings=settings)
    path = Path(bundle.meta["accepted_dir"]) / "interactions.parquet"
    if not path.exists():
        log.warning("the champion (%s version %d) was trained on %s, which no longer exists: the drift reference "
                    "falls back to this run's training window", name, version, path)
        return None, None
    log.info("drift reference: the champion's training data (%s version %d, %s)", name, version, path)
    return path, bundle.meta.get("as_of")


def drift_check_stage(run_id: str, validated: ValidationResult, split: SplitResult,
                      features: FeaturesResult) -> DriftResult:
    """Evidently PSI drift of the newest window (test) vs the reference: the champion's training data once a
    champion exists, else this run's training window."""
    from pipeline_tasks.evaluation.drift import DriftConfig, drift_check_split

    p = run_config(run_id)

    def work(out_dir: Path) -> DriftResult:
        settings = run_settings(p)
        recorded = run_features(run_id)["partitions"]["user_features"]  # only days this run may read
        reference_path, ref_moment = champion_reference(p["namespace"], settings)
        ref_day = _snapshot_day_before(ref_moment or split["t_val"])
        ref = _feature_rows_on(ref_day, settings) if ref_day in recorded else pd.DataFrame()
        cur = _feature_rows_on(features["last_day"], settings)
        extra = {}
        if len(ref) and len(cur):
            extra = {"extra_reference_path": out_dir / "reference_features.parquet",
                     "extra_current_path": out_dir / "current_features.parquet"}
            ref.to_parquet(extra["extra_reference_path"], index=False)
            cur.to_parquet(extra["extra_current_path"], index=False)
        config = DriftConfig(threshold=float(p["drift_threshold"]), mode=p["drift_mode"])
        return drift_check_split(Path(split["split_info"]).parent, validated["accepted_dir"], out_dir, config,
                                 reference_path=reference_path, **extra)

    return run_stage(run_id, "drift_check", work)


def served_drift_stage(run_id: str, params: dict | None) -> dict:
    """The ``served_drift`` task: every champion's (or the ``model`` param's) served feedback against its training
    data; returns the per-model results and ``trigger``, the ``recsys_training`` runs to start (kwargs of the
    mapped ``TriggerDagRunOperator``: ``conf``, ``logical_date``, ``trigger_run_id``)."""
    from datetime import UTC, datetime, timedelta

    from pipeline_tasks.core.runs import start_run
    from pipeline_tasks.core.settings import load_settings
    from pipeline_tasks.evaluation.served_drift import ServedDriftConfig, served_drift
    from pipeline_tasks.online.bundle import aliases_of, registered_models

    p = dict(params or {})
    config = ServedDriftConfig.from_params(p)
    start_run(run_id, config=p)

    def work(out_dir: Path) -> dict:
        settings = load_settings()
        models = [p["model"]] if p.get("model") else [m for m in registered_models(settings)
                                                     if "champion" in aliases_of(m, settings)]
        now = datetime.now(UTC)
        results = {m: served_drift(m, out_dir / m, config, now=now, settings=settings) for m in models}
        trigger = []
        for i, (model, res) in enumerate(sorted(results.items())):
            if "retrain_params" in res:
                moment = (now + timedelta(microseconds=i)).isoformat()  # one logical date per triggered run
                trigger.append({"conf": res["retrain_params"], "logical_date": moment,
                                "trigger_run_id": f"served_drift__{model}__{moment}"})
        if not models:
            log.info("served drift: no registered model has a champion; nothing is served to compare")
        return {"models": {m: {k: v for k, v in r.items() if k != "retrain_params"} for m, r in results.items()},
                "drifted": sorted(m for m, r in results.items() if r["status"] == "drift"),
                "trigger": trigger}

    return run_stage(run_id, "served_drift", work)
