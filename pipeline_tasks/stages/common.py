"""The run's parameters, resolved once: defaults, then settings (environment), then the run's params."""

from __future__ import annotations

from typing import Any

from pipeline_tasks.core.constants import DEFAULT_PARAMS
from pipeline_tasks.core.settings import load_settings
from pipeline_tasks.data.split import SplitConfig
from pipeline_tasks.data.validate import ValidationConfig, to_utc


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
