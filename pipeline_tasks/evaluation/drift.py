"""Drift check: PSI of monitored features, the newest window of interactions against a reference.

The reference is the training window until a champion model exists, then the champion's training
data: the caller passes it in (a frame, or a parquet path for :func:`drift_check_split`). Both
windows are turned into the same rows of monitored features (:data:`FEATURES`); Evidently's
``ValueDrift(method="psi")`` scores every feature, through its ``DataDriftPreset``, which also
renders the offline HTML report. A feature is flagged when its PSI is above the threshold; the
saved report gets a banner saying so (:mod:`pipeline_tasks.evaluation.drift_html`), as Evidently's
own headline shows the preset's drift share, which reads like a threshold.

Features are derived from the full windows and only then sampled down to ``max_rows``, so that
counts (item popularity, user activity) do not depend on the sample size. Rows of another grain
(user-days, extra feature snapshots) sit below the event rows with the other columns null;
Evidently drops nulls column by column. Evidently is imported inside :func:`drift_check`: it
takes seconds to import, and a DAG file that imports this module must parse fast.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from pipeline_tasks.core import constants
from pipeline_tasks.core.errors import InvalidParamsError, PermanentError
from pipeline_tasks.data.contract import normalise_interactions, normalise_items
from pipeline_tasks.evaluation.drift_html import annotate_report_html

log = logging.getLogger(__name__)

NUMERIC = "numeric"
CATEGORICAL = "categorical"
MODES = ("warn", "fail")
REPORT_HTML = "drift_report.html"
REPORT_JSON = "drift_report.json"
EPOCH = pd.Timestamp(0, tz="UTC")
MISSING = "unknown"  # the category of a null value, so that a rise in nulls shows as drift

# The monitored features: name -> (kind, what it is and why it is watched). One row per event,
# except user_activity (one row per user and UTC day) and the extra features (one row per row of
# the extra frames).
FEATURES: dict[str, tuple[str, str]] = {
    "event_type": (CATEGORICAL, "event mix (view, click, add_to_cart, purchase, favorite): funnel health and "
                                "tracking changes"),
    "device": (CATEGORICAL, "device of the event (null = unknown): traffic moving between apps and web"),
    "category": (CATEGORICAL, "primary category of the event's item (null or unknown item = unknown): what "
                              "users browse"),
    "hour": (NUMERIC, "UTC hour of day of the event as a fraction (13.5 = 13:30): the daily rhythm, "
                      "time-zone or scheduling changes"),
    "value": (NUMERIC, "the event's value (rating, price, seconds), non-null values only: monitored when "
                       "both windows have some"),
    "item_popularity": (NUMERIC, "log1p of the event item's interaction count in the REFERENCE window: "
                                 "popularity moving to other items. Items absent from the reference (new "
                                 "items) are left out here and reported as new_item_share"),
    "user_activity": (NUMERIC, "log1p of a user's events on one UTC day, one row per active user-day in the "
                               "window: how much users do on a day they come. Per user-day, so that a 6-day "
                               "and a 48-day window compare and heavy users do not dominate"),
}
EVENT_FEATURES = ("event_type", "device", "category", "hour", "value", "item_popularity")


class DriftError(PermanentError, RuntimeError):
    """Drift above the threshold with ``mode="fail"`` (the DAG turns it into a task failure)."""


@dataclass(frozen=True)
class DriftConfig:
    """How the drift check decides and reacts.

    Attributes:
        threshold: a feature is flagged when its PSI is above this (0.1: some shift, 0.2: significant).
        mode: ``"warn"`` logs a warning naming the flagged features; ``"fail"`` raises :class:`DriftError`.
        max_rows: each part of a window (events, user-days, extra rows) is sampled down to this many rows.
        seed: seed of that sampling.
    """

    threshold: float = 0.2
    mode: str = "warn"
    max_rows: int = 200_000
    seed: int = constants.SEED

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidParamsError(f"DriftConfig.mode={self.mode!r}: must be one of {MODES}")
        if not self.threshold > 0:
            raise InvalidParamsError(f"DriftConfig.threshold={self.threshold}: must be > 0")
        if self.max_rows < 1:
            raise InvalidParamsError(f"DriftConfig.max_rows={self.max_rows}: must be >= 1")


def item_counts(interactions: pd.DataFrame) -> pd.Series:
    """Interactions per item id (string ids)."""
    return interactions[constants.ITEM_ID].astype(str).value_counts()


def event_features(interactions: pd.DataFrame, items: pd.DataFrame, popularity: pd.Series) -> pd.DataFrame:
    """The per-event features (:data:`EVENT_FEATURES`), one row per interaction, in input order.

    Args:
        interactions: one window in the canonical contract.
        items: the items table (``item_id``, ``category``).
        popularity: interactions per item id in the reference window (:func:`item_counts`).

    Returns:
        A frame with the :data:`EVENT_FEATURES` columns.
    """
    df = interactions.reset_index(drop=True)
    item_id = df[constants.ITEM_ID].astype(str)
    ts = pd.to_datetime(df[constants.TIMESTAMP], utc=True)
    category = pd.Series(
        items["category"].to_numpy() if "category" in items else None, index=items[constants.ITEM_ID].astype(str)
    )
    category = category[~category.index.duplicated()]
    value = df[constants.VALUE] if constants.VALUE in df else pd.Series(np.nan, index=df.index)
    device = df[constants.DEVICE] if constants.DEVICE in df else pd.Series(None, index=df.index, dtype=object)
    return pd.DataFrame(
        {
            "event_type": _labels(df[constants.EVENT_TYPE]),
            "device": _labels(device),
            "category": _labels(item_id.map(category)),
            "hour": (ts.dt.hour + ts.dt.minute / 60 + ts.dt.second / 3600).astype("float64"),
            "value": pd.to_numeric(value, errors="coerce").astype("float64"),
            "item_popularity": np.log1p(item_id.map(popularity).astype("float64")),
        }
    )


def user_day_activity(interactions: pd.DataFrame) -> pd.DataFrame:
    """``user_activity``: log1p of each active user's event count per UTC day, one row per user-day."""
    ts = pd.to_datetime(interactions[constants.TIMESTAMP], utc=True)
    known = ts.notna().to_numpy()
    user, _ = pd.factorize(interactions[constants.USER_ID].to_numpy()[known])
    day = ((ts[known] - EPOCH) // pd.Timedelta(days=1)).to_numpy(dtype="int64")
    if not len(day):
        return pd.DataFrame({"user_activity": pd.Series([], dtype="float64")})
    span = int(day.max() - day.min()) + 1
    _, per_user_day = np.unique(user.astype("int64") * span + (day - day.min()), return_counts=True)
    return pd.DataFrame({"user_activity": np.log1p(per_user_day.astype("float64"))})


def _labels(s: pd.Series) -> pd.Series:
    """Strings, with nulls and blanks as :data:`MISSING` (worked out once per distinct value)."""
    codes, uniques = pd.factorize(s)
    names = np.array([str(u).strip() or MISSING for u in uniques] + [MISSING], dtype=object)
    return pd.Series(names[codes], index=s.index)  # code -1 (null) picks the trailing MISSING


def _sample(df: pd.DataFrame, max_rows: int, seed: int, part: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, drawn with ``(seed, part)``, in their original order."""
    if len(df) <= max_rows:
        return df.reset_index(drop=True)
    keep = np.sort(np.random.default_rng([seed, part]).choice(len(df), max_rows, replace=False))
    return df.iloc[keep].reset_index(drop=True)


def extra_feature_columns(extra_reference: pd.DataFrame, extra_current: pd.DataFrame) -> dict[str, str]:
    """The extra frames' columns to monitor: numeric (not boolean), in both frames, not an id.

    Returns:
        Column name -> feature name; a column named like a built-in feature (the feature store's
        ``item_popularity``) is monitored as ``extra_<name>``.
    """
    ids = {constants.USER_ID, constants.ITEM_ID}
    cols = [
        str(col) for col in extra_reference.columns
        if col not in ids and col in extra_current.columns
        and all(pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
                for s in (extra_reference[col], extra_current[col]))
    ]
    return {col: f"extra_{col}" if col in FEATURES else col for col in cols}


def _window_rows(
    interactions: pd.DataFrame, items: pd.DataFrame, popularity: pd.Series, extra: pd.DataFrame | None,
    extra_cols: dict[str, str], config: DriftConfig, window: int,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """All feature rows of one window (events, then user-days, then extra rows), each part sampled."""
    parts = {
        "events": event_features(interactions, items, popularity),
        "user_days": user_day_activity(interactions),
        "extra": (extra[list(extra_cols)].astype("float64").rename(columns=extra_cols)
                  if extra is not None and extra_cols else pd.DataFrame()),
    }
    sampled = {name: _sample(df, config.max_rows, config.seed, 3 * window + i)
               for i, (name, df) in enumerate(parts.items())}
    frame = pd.concat([df for df in sampled.values() if len(df)], ignore_index=True)
    for col in [*FEATURES, *extra_cols.values()]:
        if col not in frame:
            frame[col] = np.nan
    return frame, {name: len(df) for name, df in sampled.items()}


def skip_reason(ref: pd.Series, cur: pd.Series, kind: str) -> str | None:
    """Why a feature cannot be compared (no values in a window), or None."""
    present = [(s != MISSING) & s.notna() if kind == CATEGORICAL else s.notna() for s in (ref, cur)]
    ref_has, cur_has = (bool(p.any()) for p in present)
    if kind == CATEGORICAL:
        return None if ref_has or cur_has else "null in both windows"
    if ref_has and cur_has:
        return None
    return "no values in " + ("either window" if not (ref_has or cur_has) else
                              "the reference window" if not ref_has else "the current window")


class DriftResult(TypedDict):
    """The report files, the flagged features and PSI per feature (small enough for an XCom)."""

    report_html: str
    report_json: str
    flagged: list[str]
    psi: dict[str, float]


def drift_check(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    items: pd.DataFrame,
    out_dir: str | Path,
    config: DriftConfig,
    extra_reference: pd.DataFrame | None = None,
    extra_current: pd.DataFrame | None = None,
    monitored: Sequence[str] | None = None,
) -> DriftResult:
    """Compare ``current`` with ``reference`` by PSI per feature; write the HTML and JSON report.

    Args:
        reference: reference interactions (the training window; later the champion's training data).
        current: the newest window of interactions.
        items: the items table (``item_id``, ``category``).
        out_dir: where ``drift_report.html`` and ``drift_report.json`` are written.
        config: threshold, mode, sample size and seed.
        extra_reference: optional feature rows for the reference (e.g. daily user or item feature
            snapshots); the numeric columns it shares with ``extra_current`` are monitored too
            (see :func:`extra_feature_columns`).
        extra_current: the same for the current window.
        monitored: the built-in features to compare (default: all of :data:`FEATURES`).

    Returns:
        ``report_html`` and ``report_json`` (paths as strings), the ``flagged`` feature names and
        the ``psi`` of every monitored feature.

    Raises:
        ValueError: a window has no interactions, or only one extra frame is given.
        DriftError: ``config.mode == "fail"`` and a feature is flagged (raised after the report is written).
    """
    for name, frame in (("reference", reference), ("current", current)):
        if len(frame) == 0:
            raise ValueError(f"drift check: the {name} window has no interactions; nothing to compare")
    if (extra_reference is None) != (extra_current is None):
        raise ValueError("drift check: give both extra_reference and extra_current, or neither")
    with warnings.catch_warnings():  # its dependencies' deprecation notices (numpy.core, litestar) are not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        from evidently import DataDefinition, Dataset, Report  # slow to import: only when needed
        from evidently.presets import DataDriftPreset

    extra_cols = {} if extra_reference is None else extra_feature_columns(extra_reference, extra_current)
    if extra_reference is not None and not extra_cols:
        log.warning("drift check: the extra frames share no numeric column; no extra feature is monitored")

    popularity = item_counts(reference)
    new_item_share = float((~current[constants.ITEM_ID].astype(str).isin(popularity.index)).mean())
    ref, ref_rows = _window_rows(reference, items, popularity, extra_reference, extra_cols, config, window=0)
    cur, cur_rows = _window_rows(current, items, popularity, extra_current, extra_cols, config, window=1)

    unknown = sorted(set(monitored or ()) - set(FEATURES))
    if unknown:
        raise ValueError(f"drift check: unknown features {unknown}; known: {sorted(FEATURES)}")
    kinds = {**{name: kind for name, (kind, _) in FEATURES.items() if monitored is None or name in monitored},
             **dict.fromkeys(extra_cols.values(), NUMERIC)}
    skipped = {c: why for c, k in kinds.items() if (why := skip_reason(ref[c], cur[c], k)) is not None}
    for name, why in skipped.items():  # a source without the column is normal; losing it in one window is not
        log.log(logging.INFO if "both" in why or "either" in why else logging.WARNING,
                "drift check: %s is not monitored: %s", name, why)
    columns = [c for c in kinds if c not in skipped]
    if not columns:
        raise ValueError("drift check: no feature has values in both windows; nothing to compare")

    definition = DataDefinition(
        numerical_columns=[c for c in columns if kinds[c] == NUMERIC],
        categorical_columns=[c for c in columns if kinds[c] == CATEGORICAL],
    )
    # A drift share of 1/n columns: the preset's headline ("Dataset Drift is detected") then agrees
    # with this check, which reacts to any flagged column.
    any_column = math.floor(1e4 / len(columns)) / 1e4
    preset = DataDriftPreset(columns=columns, method="psi", threshold=config.threshold, drift_share=any_column)
    run = Report([preset]).run(Dataset.from_pandas(cur[columns], data_definition=definition),
                               Dataset.from_pandas(ref[columns], data_definition=definition))
    psi, metric_ids = _read_psi(run.dict(), columns)
    flagged = [c for c in columns if psi[c] > config.threshold]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / REPORT_HTML, out / REPORT_JSON
    run.save_html(str(html_path))
    annotate_report_html(html_path, psi, flagged, config.threshold, any_column)
    summary = {
        "features": {
            c: {"psi": psi[c], "flagged": c in flagged, "kind": kinds[c], "metric_id": metric_ids[c]}
            for c in columns
        },
        "flagged": flagged,
        "threshold": config.threshold,
        "dataset_drift_share": any_column,  # Evidently's headline: the share of features that must drift (1 of n)
        "reference_rows": len(reference),
        "current_rows": len(current),
        "mode": config.mode,
        "sampled_rows": {"reference": ref_rows, "current": cur_rows},
        "skipped": skipped,
        "new_item_share": new_item_share,
        "report_html": str(html_path),
    }
    json_path.write_text(json.dumps(summary, indent=2))
    log.info("drift check: PSI %s (threshold %s); report %s",
             {c: round(v, 4) for c, v in psi.items()}, config.threshold, html_path)

    if flagged:
        listing = ", ".join(f"{c} (PSI {psi[c]:.3f})" for c in flagged)
        message = (
            f"drift check: {len(flagged)} feature(s) drifted above PSI {config.threshold} between the reference "
            f"({len(reference)} interactions) and the newest window ({len(current)}): {listing}. Report: "
            f"{html_path}. Open it to see which values moved. If the change is expected (new catalogue, season, "
            "new app version), retrain so that the reference includes it, or run the check with mode='warn'; "
            "otherwise look for the upstream change in the source data."
        )
        if config.mode == "fail":
            raise DriftError(message)
        log.warning(message)
    return DriftResult(report_html=str(html_path), report_json=str(json_path), flagged=flagged, psi=psi)


def _read_psi(snapshot: dict[str, Any], columns: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """PSI and metric id per column from the ``ValueDrift`` results in ``Snapshot.dict()``."""
    psi: dict[str, float] = {}
    ids: dict[str, str] = {}
    for metric in snapshot["metrics"]:
        config = metric.get("config", {})
        if str(config.get("type", "")).endswith(":ValueDrift") and config.get("method") == "psi":
            psi[config["column"]] = float(metric["value"])
            ids[config["column"]] = str(metric["id"])
    missing = [c for c in columns if c not in psi or not math.isfinite(psi[c])]
    if missing:
        raise RuntimeError(f"drift check: Evidently returned no finite PSI for {missing}; its metrics were "
                           f"{[m.get('metric_name') for m in snapshot['metrics']]}")
    return {c: psi[c] for c in columns}, {c: ids[c] for c in columns}


def _read_interactions(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; the drift check needs the split stage's windows "
                                "(train.parquet, test.parquet) or an existing reference parquet")
    return normalise_interactions(pd.read_parquet(path))


def drift_check_split(
    split_dir: str | Path,
    accepted_dir: str | Path,
    out_dir: str | Path,
    config: DriftConfig,
    reference_path: str | Path | None = None,
    extra_reference_path: str | Path | None = None,
    extra_current_path: str | Path | None = None,
) -> DriftResult:
    """The ``drift_check`` stage: the split's newest window (``test.parquet``) against a reference.

    Args:
        split_dir: the split stage's directory (``train.parquet``, ``test.parquet``).
        accepted_dir: the accepted contract directory (``items.parquet``).
        out_dir: where the report is written.
        config: threshold, mode, sample size and seed.
        reference_path: a parquet of reference interactions (the champion's training data);
            default: the split's ``train.parquet``.
        extra_reference_path: optional parquet of feature rows for the reference (see :func:`drift_check`).
        extra_current_path: the same for the current window.

    Returns:
        What :func:`drift_check` returns (small enough for an XCom).
    """
    split = Path(split_dir)
    reference_file = Path(reference_path) if reference_path else split / "train.parquet"
    reference = _read_interactions(reference_file)
    current = _read_interactions(split / "test.parquet")
    items_path = Path(accepted_dir) / "items.parquet"
    if not items_path.exists():
        raise FileNotFoundError(f"{items_path}: not found; give the accepted contract directory written by ingest")
    items = normalise_items(pd.read_parquet(items_path))
    extra = [pd.read_parquet(p) if p else None for p in (extra_reference_path, extra_current_path)]
    log.info("drift check: reference %s (%d rows) vs newest window %s (%d rows)",
             reference_file, len(reference), split / "test.parquet", len(current))
    return drift_check(reference, current, items, out_dir, config, extra_reference=extra[0], extra_current=extra[1])
