"""Drift on served traffic: the feedback log's newest window against the champion's training data.

The daily ``recsys_served_drift`` DAG calls :func:`served_drift`. The current window is every feedback event the
services logged (``$RECSYS_HOME/feedback/<namespace>``: ``recsys serve``, the canary's champion and challenger and
Bentos on that home all write there) whose ``logged_at`` falls in the last ``window_days`` before the check; the
reference is what the champion was trained on (its run's accepted interactions and items). Both go through the
same features and Evidently PSI as the training DAG's ``drift_check`` (:func:`pipeline_tasks.evaluation.drift.
drift_check`); the event's own ``timestamp`` gives its hour and user-day. When a feature drifts above the threshold
and ``retrain`` is on, the result carries the params of a ``recsys_training`` run that retrains on the champion's
source plus this feedback log (``feedback_log``), so the loop closes.

What the served log can and cannot show: it holds what users did with what was served, so its event mix is the
client's (a client that posts only clicks and purchases differs from a source of views and favorites) and its
item popularity leans to served items. Such a difference is real and flagged; ``features`` leaves a feature out
when a team knows its source differs by design.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.evaluation.drift import FEATURES, DriftConfig
from pipeline_tasks.online.feedback_log import feedback_dir

log = logging.getLogger(__name__)

RESULT_JSON = "served_drift.json"
# Run params a retraining run inherits from the champion's run; its windows are resolved anew (as_of, t_val, t_test).
INHERITED = ("source", "synthetic", "quality_threshold", "max_stub_share", "horizon_days", "bot_events_per_day",
             "drift_mode", "drift_threshold", "two_tower", "index", "candidates", "ranker", "gate")


@dataclass(frozen=True)
class ServedDriftConfig:
    """How the served-traffic check reads the log and decides.

    Attributes:
        window_days: the current window: events logged in the last this many days before the check.
        threshold: a feature is flagged when its PSI is above this (as in the training DAG's check).
        min_events: below this many events in the window the check is skipped (PSI of a few events is noise).
        retrain: when a feature is flagged, ask for a ``recsys_training`` run (off by default).
        features: the monitored features (default: all of :data:`pipeline_tasks.evaluation.drift.FEATURES`
            that both windows have).
        max_rows: sample size per window part (as :class:`pipeline_tasks.evaluation.drift.DriftConfig`).
    """

    window_days: float = 1.0
    threshold: float = 0.2
    min_events: int = 200
    retrain: bool = False
    features: tuple[str, ...] = field(default_factory=lambda: tuple(FEATURES))
    max_rows: int = 200_000

    def __post_init__(self) -> None:
        if not self.window_days > 0:
            raise InvalidParamsError(f"window_days={self.window_days}: must be > 0")
        if self.min_events < 1:
            raise InvalidParamsError(f"min_events={self.min_events}: must be >= 1")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown or not self.features:
            raise InvalidParamsError(f"features={list(self.features)}: use a non-empty subset of {sorted(FEATURES)}")
        DriftConfig(threshold=self.threshold, max_rows=self.max_rows)  # the same checks as the training DAG's

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ServedDriftConfig:
        """From DAG params (missing or null = default)."""
        p = {k: v for k, v in (params or {}).items() if v is not None}
        kwargs: dict[str, Any] = {}
        try:
            for key, cast in (("window_days", float), ("threshold", float), ("min_events", int),
                              ("retrain", bool), ("max_rows", int)):
                if key in p:
                    kwargs[key] = cast(p[key])
            if p.get("features"):
                kwargs["features"] = tuple(str(f) for f in p["features"])
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(f"served drift params: {exc}") from None
        return cls(**kwargs)


def served_window(root: str | Path, start: datetime, end: datetime) -> tuple[pd.DataFrame, dict[str, int]]:
    """Feedback events logged in ``(start, end]`` as interactions (contract event types), and counts.

    Returns:
        The interactions (:func:`pipeline_tasks.online.feedback_log.as_interactions`) and ``logged`` (all feedback
        lines), ``in_window``, ``other_event_types`` (in the window, not a contract type: left out) and ``torn``
        (lines cut short by a crash).
    """
    from pipeline_tasks.online.feedback_log import as_interactions, read_log

    df, torn = read_log(root, "feedback")
    total = len(df)
    if total:
        logged = pd.to_datetime(df["logged_at"], utc=True, format="ISO8601")
        df = df[(logged > pd.Timestamp(start)) & (logged <= pd.Timestamp(end))]
    current = as_interactions(df)
    return current, {"logged": total, "in_window": len(df), "other_event_types": len(df) - len(current), "torn": torn}


def retrain_params(champion_config: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """The ``recsys_training`` params of a retraining run: the champion's, windows resolved anew, plus the log."""
    params = {k: champion_config[k] for k in INHERITED if champion_config.get(k) is not None}
    params["feedback_log"] = str(log_dir)
    return params


def served_drift(model: str, out_dir: str | Path, config: ServedDriftConfig, log_dir: str | Path | None = None,
                 now: datetime | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Check one registered model's served traffic against its champion's training data.

    Args:
        model: the registered model (``recsys_<namespace>``).
        out_dir: where ``drift_report.html``, ``drift_report.json`` and ``served_drift.json`` go.
        config: window, threshold, minimum events, retraining switch, features.
        log_dir: the feedback log (default :func:`feedback_dir` of the model's namespace).
        now: the end of the window (default: now).
        settings: the environment's settings (default: loaded).

    Returns:
        ``status`` (``no_champion``, ``too_few_events``, ``ok`` or ``drift``), the window and its counts, the
        champion version, ``flagged`` and ``psi``, the report paths and, when ``retrain`` is on and a feature drifted,
        ``retrain_params`` for ``recsys_training``.
    """
    from pipeline_tasks.data.contract import normalise_interactions, normalise_items
    from pipeline_tasks.evaluation.drift import drift_check
    from pipeline_tasks.online.bundle import aliases_of, load_bundle

    settings = settings or load_settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    end = now or datetime.now(UTC)
    start = end - timedelta(days=config.window_days)
    result: dict[str, Any] = {"model": model, "window_start": start.isoformat(), "window_end": end.isoformat(),
                              "threshold": config.threshold, "retrain_enabled": config.retrain}
    version = aliases_of(model, settings).get("champion")
    if version is None:
        result.update(status="no_champion", message=f"{model} has no champion: nothing is served to compare")
        return _write(out, result)
    bundle = load_bundle(model, version=version, settings=settings)
    namespace = bundle.meta.get("namespace") or model.removeprefix("recsys_")
    root = Path(log_dir) if log_dir else feedback_dir(namespace, settings)
    current, counts = served_window(root, start, end)
    result.update(champion_version=version, feedback_dir=str(root), events=len(current), **counts)
    if len(current) < config.min_events:
        result.update(status="too_few_events",
                      message=f"{len(current)} feedback events of contract types were logged in {root} between "
                              f"{start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC, fewer than min_events="
                              f"{config.min_events}: no verdict (serve traffic, or widen window_days)")
        log.warning("served drift of %s: %s", model, result["message"])
        return _write(out, result)
    accepted = Path(bundle.meta["accepted_dir"])
    if not (accepted / "interactions.parquet").exists():
        raise FileNotFoundError(f"{accepted}/interactions.parquet: the champion's ({model} version {version}) "
                                "training data is gone; the served-traffic check compares with it. Restore it, or "
                                "promote a version whose run directory exists (`recsys models`)")
    reference = normalise_interactions(pd.read_parquet(accepted / "interactions.parquet"))
    items = normalise_items(pd.read_parquet(accepted / "items.parquet"))
    drift = drift_check(reference, normalise_interactions(current), items, out,
                        DriftConfig(threshold=config.threshold, mode="warn", max_rows=config.max_rows),
                        monitored=config.features)
    flagged = drift["flagged"]
    result.update(status="drift" if flagged else "ok", flagged=flagged, psi=drift["psi"],
                  report_html=drift["report_html"], report_json=drift["report_json"],
                  reference_rows=len(reference))
    if flagged and config.retrain:
        result["retrain_params"] = retrain_params(bundle.meta.get("config") or {}, root)
    log.info("served drift of %s (champion v%d): %s, %d events in the window, flagged %s; report %s", model,
             version, result["status"], len(current), flagged or "none", drift["report_html"])
    return _write(out, result)


def _write(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    (out / RESULT_JSON).write_text(json.dumps(result, indent=2, default=str))
    return result
