"""Data stages: ingest the source, validate it (GX, quarantine, quality gate), split it by time."""

from __future__ import annotations

from typing import Any

from pipeline_tasks.core.runs import run_dir, run_stage, snapshot_hash, start_run, update_manifest
from pipeline_tasks.data.ingest import IngestResult
from pipeline_tasks.data.split import SplitResult
from pipeline_tasks.data.validate import ValidationResult
from pipeline_tasks.stages.common import resolve_config, run_config, split_config, validation_config


def ingest_stage(run_id: str, params: dict[str, Any] | None) -> IngestResult:
    """Open the run manifest and turn the data source into a contract directory."""
    from pipeline_tasks.data.ingest import ingest

    p = resolve_config(params)
    start_run(run_id, config=dict(p))
    out = run_stage(run_id, "ingest", ingest, source=p["source"], synthetic=p["synthetic"],
                    feedback_log=p.get("feedback_log"))
    update_manifest(run_dir(run_id), input_rows=out["counts"])
    return out


def validate_stage(run_id: str, ingested: IngestResult) -> ValidationResult:
    """GX validation + quarantine + quality gate; records the accepted data's snapshot hash."""
    from pipeline_tasks.data.validate import validate_contract_dir

    out = run_stage(run_id, "validate", validate_contract_dir, input_dir=ingested["contract_dir"],
                    config=validation_config(run_config(run_id)))
    update_manifest(run_dir(run_id), data={"snapshot_sha256": snapshot_hash(out["accepted_dir"]),
                                           "accepted_dir": out["accepted_dir"], "counts": out["counts"]})
    return out


def split_stage(run_id: str, validated: ValidationResult) -> SplitResult:
    """Time-based split of the accepted interactions."""
    from pipeline_tasks.data.split import split_contract_dir

    return run_stage(run_id, "split", split_contract_dir, accepted_dir=validated["accepted_dir"],
                     config=split_config(run_config(run_id)))
