"""Evaluation stages: the Evidently drift check of the newest window against the reference."""

from __future__ import annotations

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


def drift_check_stage(run_id: str, validated: ValidationResult, split: SplitResult,
                      features: FeaturesResult) -> DriftResult:
    """Evidently PSI drift of the newest window (test) vs the reference (the training window)."""
    from pipeline_tasks.evaluation.drift import DriftConfig, drift_check_split

    p = run_config(run_id)

    def work(out_dir: Path) -> DriftResult:
        settings = run_settings(p)
        recorded = run_features(run_id)["partitions"]["user_features"]  # only days this run may read
        ref_day = _snapshot_day_before(split["t_val"])
        ref = _feature_rows_on(ref_day, settings) if ref_day in recorded else pd.DataFrame()
        cur = _feature_rows_on(features["last_day"], settings)
        extra = {}
        if len(ref) and len(cur):
            extra = {"extra_reference_path": out_dir / "reference_features.parquet",
                     "extra_current_path": out_dir / "current_features.parquet"}
            ref.to_parquet(extra["extra_reference_path"], index=False)
            cur.to_parquet(extra["extra_current_path"], index=False)
        config = DriftConfig(threshold=float(p["drift_threshold"]), mode=p["drift_mode"])
        return drift_check_split(Path(split["split_info"]).parent, validated["accepted_dir"], out_dir, config, **extra)

    return run_stage(run_id, "drift_check", work)
