"""The training pipeline's stages as single calls (what each ``recsys_training`` task runs).

Each stage takes the run id, the run's params and its upstream task's small output dict, writes
under ``<artifact_root>/<run>/<task>/`` via :func:`pipeline_tasks.runs.run_stage`, and returns a
small dict of URIs and figures (the XCom). No Airflow import: tests and the CLI call these too.
"""

from __future__ import annotations

from typing import Any

from pipeline_tasks.constants import DEFAULT_PARAMS
from pipeline_tasks.runs import run_dir, run_stage, snapshot_hash, start_run, update_manifest
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
