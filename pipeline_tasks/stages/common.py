"""The run's config, resolved once at the start of a run and read back from its manifest by every task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypedDict

from pipeline_tasks.core.constants import DEFAULT_PARAMS
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.namespace import source_namespace
from pipeline_tasks.core.runs import MANIFEST, run_dir
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.data.split import SplitConfig
from pipeline_tasks.data.validate import ValidationConfig, to_utc


class RunConfig(TypedDict):
    """Everything a training run depends on besides its data: the DAG params with every default filled in."""

    source: str
    synthetic: dict[str, Any]
    as_of: str | None
    t_val: str | None
    t_test: str | None
    quality_threshold: float
    max_stub_share: float
    horizon_days: int
    bot_events_per_day: int
    event_types: list[str]
    drift_mode: str
    drift_threshold: float
    two_tower: dict[str, Any]
    index: dict[str, Any]
    candidates: dict[str, Any]
    ranker: dict[str, Any]
    gate: dict[str, Any]
    feedback_log: str | None
    namespace: str  # the source's identity: its feature history and MLflow experiment (core.namespace)


def resolve_config(params: dict[str, Any] | None) -> RunConfig:
    """Defaults, then settings (environment), then the run's own params; unknown params are refused.

    Every stage's settings are built from the result once here (the same code the stages run), and a
    contract-directory or synthetic source is checked (headers and first rows), so bad params or a bad
    source fail the run at its start (:class:`PermanentError`, no retry), not an hour into it.
    """
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise InvalidParamsError(f"unknown run params {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    settings = load_settings()
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    for key, value in (("quality_threshold", settings.quality_threshold), ("horizon_days", settings.horizon_days),
                       ("bot_events_per_day", settings.bot_events_per_day),
                       ("max_stub_share", settings.max_stub_share)):
        if merged.get(key) is None:
            merged[key] = value
    merged["event_types"] = list(settings.event_types)
    merged["namespace"] = source_namespace(merged["source"], merged["synthetic"] if merged["source"] == "synthetic"
                                           else None)
    if merged.get("feedback_log") and not Path(merged["feedback_log"]).is_dir():
        raise InvalidParamsError(f"feedback_log={merged['feedback_log']!r} is not a directory: give a service's "
                                 "feedback log (`recsys serve` writes $RECSYS_HOME/feedback/<namespace>)")
    if merged["drift_mode"] not in ("warn", "fail"):
        raise InvalidParamsError(f"drift_mode={merged['drift_mode']!r}: use 'warn' or 'fail'")
    config = RunConfig(**merged)  # type: ignore[typeddict-item]
    from pipeline_tasks.stages.run_params import check_stage_configs  # it builds configs with this module

    check_stage_configs(config)
    from pipeline_tasks.data.source_check import check_source

    check_source(config["source"], config["synthetic"])
    return config


def run_config(run_id: str) -> RunConfig:
    """The config this run resolved when it started (``manifest.json``), never the environment again."""
    path = run_dir(run_id) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest for run {run_id}; its ingest task opens it")
    return json.loads(path.read_text())["config"]


def run_settings(config: RunConfig) -> Settings:
    """The settings of this run's source: the environment's, in the run's namespace."""
    return dataclasses.replace(load_settings(), namespace=config["namespace"])


def run_features(run_id: str, required: bool = True) -> dict[str, Any] | None:
    """What ``build_features`` recorded for this run: its namespace, readable days and partition checksums.

    ``None`` (with ``required=False``) when the run has none, e.g. its feature tasks were marked successful
    without running (``recsys run --mark-success``): models then train and embed without store features.
    """
    features = json.loads((run_dir(run_id) / MANIFEST).read_text()).get("features")
    if not features and required:
        raise FileNotFoundError(f"run {run_id} has no feature partitions recorded; its build_features task records "
                                "them")
    return features or None


def validation_config(config: RunConfig) -> ValidationConfig:
    """The validate stage's settings from the run config."""
    return ValidationConfig(
        as_of=to_utc(config["as_of"]) if config["as_of"] else None,
        horizon_days=int(config["horizon_days"]),
        bot_events_per_day=int(config["bot_events_per_day"]),
        event_types=tuple(config["event_types"]),
        quality_threshold=float(config["quality_threshold"]),
        max_stub_share=float(config["max_stub_share"]),
    )


def split_config(config: RunConfig) -> SplitConfig:
    """The split stage's boundaries from the run config."""
    return SplitConfig(t_val=config["t_val"], t_test=config["t_test"])
