"""The run's config, resolved once at the start of a run and read back from its manifest by every task."""

from __future__ import annotations

import json
from typing import Any, TypedDict

from pipeline_tasks.core.constants import DEFAULT_PARAMS
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.runs import MANIFEST, run_dir
from pipeline_tasks.core.settings import load_settings
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
    horizon_days: int
    bot_events_per_day: int
    event_types: list[str]
    drift_mode: str
    drift_threshold: float
    two_tower: dict[str, Any]
    index: dict[str, Any]


def resolve_config(params: dict[str, Any] | None) -> RunConfig:
    """Defaults, then settings (environment), then the run's own params; unknown params are refused."""
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise InvalidParamsError(f"unknown run params {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    settings = load_settings()
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    for key, value in (("quality_threshold", settings.quality_threshold), ("horizon_days", settings.horizon_days),
                       ("bot_events_per_day", settings.bot_events_per_day)):
        if merged.get(key) is None:
            merged[key] = value
    merged["event_types"] = list(settings.event_types)
    if merged["drift_mode"] not in ("warn", "fail"):
        raise InvalidParamsError(f"drift_mode={merged['drift_mode']!r}: use 'warn' or 'fail'")
    return RunConfig(**merged)  # type: ignore[typeddict-item]


def run_config(run_id: str) -> RunConfig:
    """The config this run resolved when it started (``manifest.json``), never the environment again."""
    path = run_dir(run_id) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest for run {run_id}; its ingest task opens it")
    return json.loads(path.read_text())["config"]


def validation_config(config: RunConfig) -> ValidationConfig:
    """The validate stage's settings from the run config."""
    return ValidationConfig(
        as_of=to_utc(config["as_of"]) if config["as_of"] else None,
        horizon_days=int(config["horizon_days"]),
        bot_events_per_day=int(config["bot_events_per_day"]),
        event_types=tuple(config["event_types"]),
        quality_threshold=float(config["quality_threshold"]),
    )


def split_config(config: RunConfig) -> SplitConfig:
    """The split stage's boundaries from the run config."""
    return SplitConfig(t_val=config["t_val"], t_test=config["t_test"])
