"""Every stage's settings built from a run's config up front, so invalid params fail the run at its start."""

from __future__ import annotations

from typing import Any

from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.stages.common import RunConfig, split_config, validation_config


def _invalid(param: str, exc: Exception) -> InvalidParamsError:
    return exc if isinstance(exc, InvalidParamsError) else InvalidParamsError(f"{param}: {exc}")


def check_stage_configs(config: RunConfig) -> None:
    """Build each stage's config from ``config`` with the stages' own code; raises InvalidParamsError naming it."""
    from pipeline_tasks.data.validate import to_utc
    from pipeline_tasks.evaluation.drift import DriftConfig
    from pipeline_tasks.online.two_tower import TwoTowerConfig
    from pipeline_tasks.retrieval.index_build import IndexConfig
    from pipeline_tasks.retrieval.protocol import RetrievalConfig
    from pipeline_tasks.retrieval.two_tower_training import grid_configs

    params: dict[str, Any] = dict(config)
    for name in ("synthetic", "two_tower", "index", "candidates", "ranker", "gate"):
        if not isinstance(params[name], dict):
            raise InvalidParamsError(f"{name} must be a JSON object, got {params[name]!r}")
    try:
        retrieval = RetrievalConfig.from_params(params["two_tower"])
        base = TwoTowerConfig.from_dict({**retrieval.base, "seed": retrieval.seed})  # as train_retrieval does
        for model, grid in (("two_tower", retrieval.grid), ("mf", retrieval.mf_grid)):
            grid_configs(TwoTowerConfig.from_dict({**base.to_dict(), "model": model}), grid)
    except (TypeError, ValueError) as exc:
        raise _invalid("two_tower", exc) from None
    unknown = sorted(set(params["index"]) - set(IndexConfig.__dataclass_fields__))
    if unknown:
        raise InvalidParamsError(f"unknown index params {unknown}; known: {sorted(IndexConfig.__dataclass_fields__)}")
    try:
        IndexConfig(**params["index"]).validate()
    except (TypeError, ValueError) as exc:
        raise _invalid("index", exc) from None
    from pipeline_tasks.bundle.registry import GateConfig
    from pipeline_tasks.online.candidates import CandidateConfig
    from pipeline_tasks.ranking.ranker import RankerConfig

    for name, cls in (("candidates", CandidateConfig), ("ranker", RankerConfig), ("gate", GateConfig)):
        try:
            cls.from_params(params[name])
        except (TypeError, ValueError) as exc:
            raise _invalid(name, exc) from None
    try:
        DriftConfig(threshold=float(params["drift_threshold"]), mode=params["drift_mode"])
    except (TypeError, ValueError) as exc:
        raise _invalid("drift_threshold", exc) from None
    for name in ("as_of", "t_val", "t_test"):
        try:
            if params[name] is not None:
                to_utc(params[name])
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(f"{name}={params[name]!r} is not an ISO-8601 moment such as "
                                     f"2025-03-01T00:00:00+00:00 ({exc})") from None
    # The ranges the DAG's Param schemas allow (dags/recsys_training.py).
    for name, low, high in (("quality_threshold", 0, 1), ("horizon_days", 1, None), ("bot_events_per_day", 1, None)):
        value = params[name]
        if not isinstance(value, int | float) or value < low or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            raise InvalidParamsError(f"{name}={value!r}: must be a number >= {low}{upper}")
    try:
        validation_config(config)
    except (TypeError, ValueError) as exc:
        raise _invalid("validation", exc) from None
    try:
        split_config(config)
        if params["t_val"] is not None and not to_utc(params["t_val"]) < to_utc(params["t_test"]):
            raise InvalidParamsError(f"t_val={params['t_val']!r} must be before t_test={params['t_test']!r}")
    except (TypeError, ValueError) as exc:
        raise _invalid("t_val / t_test", exc) from None
