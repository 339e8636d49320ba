"""Validate contract tables with Great Expectations 1.x and quarantine the rows that fail.

The rules live in ``expectations/<table>.json`` (one GX suite per table). Each expectation's
``meta.reason`` is the quarantine reason of the rows it flags, and the flagged rows come from GX's
own results (``unexpected_index_list`` over a ``_row_id`` column), so GX decides, not a second
hand-written pass. A few helper columns (``_dup_rank``, ``_user_day_events``, ``_ts_epoch``) are
derived first so that every contract rule is a plain expectation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import (
    DEFAULT_BOT_EVENTS_PER_DAY,
    DEFAULT_HORIZON_DAYS,
    DEFAULT_QUALITY_THRESHOLD,
    DEFAULT_SPIKE_SIGMA,
    DEFAULT_SPIKE_WINDOW_DAYS,
    DUP_RANK,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM_ID,
    ROW_ID,
    TABLES,
    TIMESTAMP,
    TS_EPOCH,
    UNKNOWN_CATEGORY,
    USER_DAY_EVENTS,
    USER_ID,
)
from pipeline_tasks.core.errors import PermanentError
from pipeline_tasks.data.contract import (
    RAW_TIMESTAMP,
    RAW_VALUE,
    ContractTables,
    normalise_items,
    normalise_users,
    read_contract_dir,
    write_contract_dir,
)

log = logging.getLogger(__name__)

DUPLICATE_KEY = [USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE]
ID_COLUMN = {"interactions": None, "items": ITEM_ID, "users": USER_ID}


class DataQualityError(PermanentError, RuntimeError):
    """The accepted share of interactions is below the quality threshold (a data error: no retry)."""


def expectations_dir() -> Path:
    """The folder holding the GX suites (``expectations/`` at the project root)."""
    return Path(__file__).resolve().parents[2] / "expectations"


@dataclass(frozen=True)
class ValidationConfig:
    """Contract rule parameters; ``as_of=None`` means the contract's default anchoring."""

    as_of: datetime | None = None
    horizon_days: int = DEFAULT_HORIZON_DAYS
    bot_events_per_day: int = DEFAULT_BOT_EVENTS_PER_DAY
    event_types: tuple[str, ...] = EVENT_TYPES
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    spike_sigma: float = DEFAULT_SPIKE_SIGMA
    spike_window_days: int = DEFAULT_SPIKE_WINDOW_DAYS


@dataclass(frozen=True)
class AsOf:
    """The two anchors of a run: rows after ``future_anchor`` are future; the horizon counts back
    from ``horizon_anchor``."""

    future_anchor: pd.Timestamp
    horizon_anchor: pd.Timestamp
    horizon_start: pd.Timestamp
    explicit: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v) for k, v in asdict(self).items()}


@dataclass
class ValidationOutcome:
    """Accepted tables, quarantined rows (with ``reasons``) and the report."""

    accepted: ContractTables
    quarantine: dict[str, pd.DataFrame]
    report: dict[str, Any] = field(default_factory=dict)


def to_utc(value: datetime | str | pd.Timestamp) -> pd.Timestamp:
    """A timezone-aware UTC timestamp (naive input is taken as UTC)."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def resolve_as_of(
    timestamps: pd.Series, as_of: datetime | None, horizon_days: int, now: datetime | None = None
) -> AsOf:
    """Anchor the run: an explicit ``as_of`` sets both anchors; otherwise "future" means after now and
    the horizon counts back from the newest event that is not in the future."""
    if as_of is not None:
        anchor = to_utc(as_of)
        return AsOf(anchor, anchor, anchor - timedelta(days=horizon_days), explicit=True)
    now_ts = to_utc(now or datetime.now(UTC))
    past = timestamps[timestamps <= now_ts]
    horizon_anchor = past.max() if len(past) else now_ts
    return AsOf(now_ts, horizon_anchor, horizon_anchor - timedelta(days=horizon_days), explicit=False)


def add_rule_columns(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Derive the helper columns the suites refer to (row id, duplicate rank, events per user-day)."""
    out = df.copy()
    out[ROW_ID] = np.arange(len(out), dtype=np.int64)
    if table == "interactions":
        out[DUP_RANK] = out.groupby(DUPLICATE_KEY, dropna=False, sort=False).cumcount()
        ts = out[TIMESTAMP]
        out[TS_EPOCH] = (ts.astype("int64") / 1e9).where(ts.notna())
        day = ts.dt.floor("D")
        counts = out.groupby([out[USER_ID], day], dropna=True, sort=False)[ROW_ID].transform("size")
        out[USER_DAY_EVENTS] = counts.fillna(0).astype(np.int64)
    else:
        out[DUP_RANK] = out.groupby(ID_COLUMN[table], dropna=False, sort=False).cumcount()
    return out


def _quiet_context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="run",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def load_suite(table: str) -> dict[str, Any]:
    """The suite for one contract table, as stored in ``expectations/``."""
    path = expectations_dir() / f"{table}.json"
    return json.loads(path.read_text())


def run_suites(
    frames: dict[str, pd.DataFrame], parameters: dict[str, Any], docs_dir: Path | None
) -> dict[str, list[dict[str, Any]]]:
    """Run every table's suite in one GX checkpoint; return per-table expectation results
    (reason, success, failing row ids), and write Data Docs when ``docs_dir`` is given."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core import ExpectationSuite

    ctx = _quiet_context(docs_dir)
    source = ctx.data_sources.add_pandas("contract")
    definitions = []
    for table in frames:
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(f"{table}_run")
        suite = ctx.suites.add(ExpectationSuite(**load_suite(table)))
        definitions.append(ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite,
                                                                                   name=table)))
    out: dict[str, list[dict[str, Any]]] = {}
    for table, definition in zip(frames, definitions, strict=True):
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"contract_{table}",
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=["run"])] if docs_dir else [],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID],
                               "exclude_unexpected_values": True, "return_unexpected_index_query": False},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frames[table]}, expectation_parameters=parameters)
        rows = []
        for run_result in result.run_results.values():
            for r in run_result.results:
                cfg = r.expectation_config
                failing = r.result.get("unexpected_index_list") or []
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise RuntimeError(f"GX expectation {cfg.type} on {table} raised: "
                                       f"{r.exception_info.get('exception_message')}")
                rows.append(
                    {
                        "table": table,
                        "expectation": cfg.type,
                        "column": cfg.kwargs.get("column"),
                        "reason": cfg.meta["reason"],
                        "success": bool(r.success),
                        "unexpected_count": int(r.result.get("unexpected_count") or 0),
                        "row_ids": _row_ids(failing),
                    }
                )
        out[table] = rows
    return out


def _row_ids(unexpected_index_list: list[dict[str, Any]]) -> np.ndarray:
    """Row ids out of GX's ``unexpected_index_list``: one dict per row, or (with
    ``exclude_unexpected_values``) dicts holding lists of ids."""
    ids: list[int] = []
    for entry in unexpected_index_list:
        value = entry[ROW_ID]
        if isinstance(value, list | tuple | np.ndarray):
            ids.extend(int(v) for v in value)
        else:
            ids.append(int(value))
    return np.asarray(ids, dtype=np.int64)


def reasons_by_row(results: list[dict[str, Any]], n_rows: int) -> pd.Series:
    """Row id -> list of every reason that row failed (suite order), for failing rows only."""
    parts = [pd.DataFrame({ROW_ID: r["row_ids"], "reason": r["reason"]}) for r in results if len(r["row_ids"])]
    if not parts:
        return pd.Series([], dtype=object, name="reasons")
    pairs = pd.concat(parts, ignore_index=True)
    if (pairs[ROW_ID] >= n_rows).any() or (pairs[ROW_ID] < 0).any():
        raise RuntimeError("GX reported a row id outside the table: the _row_id column was altered")
    return pairs.groupby(ROW_ID, sort=True)["reason"].agg(list).rename("reasons")


def detect_spikes(timestamps: pd.Series, sigma: float, window_days: int) -> list[dict[str, Any]]:
    """Days whose event count is more than ``sigma`` standard deviations above the mean of the
    trailing ``window_days`` days (days without events count as 0). Reported, never quarantined."""
    if timestamps.empty:
        return []
    daily = timestamps.dt.floor("D").value_counts().sort_index()
    days = pd.date_range(daily.index.min(), daily.index.max(), freq="D")
    daily = daily.reindex(days, fill_value=0).astype(float)
    trailing = daily.shift(1).rolling(window_days, min_periods=window_days)
    mean, std = trailing.mean(), trailing.std(ddof=0)
    flagged = daily > mean + sigma * std
    return [
        {
            "day": day.date().isoformat(),
            "events": int(daily[day]),
            "trailing_mean": round(float(mean[day]), 2),
            "trailing_std": round(float(std[day]), 2),
            "threshold": round(float(mean[day] + sigma * std[day]), 2),
        }
        for day in daily.index[flagged.fillna(False).to_numpy()]
    ]


def complete_entities(interactions: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give every item and user that accepted interactions mention a row (nulls where unknown) and
    fill a missing ``created_at`` with the item's first interaction."""
    missing_items = pd.Index(interactions[ITEM_ID].unique()).difference(pd.Index(items[ITEM_ID]))
    if len(missing_items):
        extra = normalise_items(pd.DataFrame({ITEM_ID: list(missing_items), "category": UNKNOWN_CATEGORY}))
        items = pd.concat([items, extra], ignore_index=True)
    first_seen = interactions.groupby(ITEM_ID)[TIMESTAMP].min()
    items = items.copy()
    items["created_at"] = items["created_at"].fillna(items[ITEM_ID].map(first_seen)).astype("datetime64[ns, UTC]")
    missing_users = pd.Index(interactions[USER_ID].unique()).difference(pd.Index(users[USER_ID]))
    if len(missing_users):
        users = pd.concat([users, normalise_users(pd.DataFrame({USER_ID: list(missing_users)}))], ignore_index=True)
    return items.reset_index(drop=True), users.reset_index(drop=True)


def _split_rows(df: pd.DataFrame, reasons: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    helper = [c for c in df.columns if c.startswith("_") and c != ROW_ID]
    bad = df[ROW_ID].isin(reasons.index)
    quarantined = df[bad].drop(columns=helper).rename(columns={ROW_ID: "input_row"})
    quarantined["reasons"] = quarantined["input_row"].map(reasons)
    accepted = df[~bad].drop(columns=[*helper, ROW_ID, RAW_TIMESTAMP, RAW_VALUE], errors="ignore")
    return accepted.reset_index(drop=True), quarantined.reset_index(drop=True)


def validate_tables(
    tables: ContractTables, config: ValidationConfig, docs_dir: Path | None = None,
    now: datetime | None = None,
) -> ValidationOutcome:
    """Validate the three tables, split each into accepted and quarantined rows, report."""
    as_of = resolve_as_of(tables.interactions[TIMESTAMP], config.as_of, config.horizon_days, now)
    parameters = {
        "as_of_epoch": as_of.future_anchor.timestamp(),
        "horizon_start_epoch": as_of.horizon_start.timestamp(),
        "event_types": list(config.event_types),
        "bot_events_per_day": config.bot_events_per_day,
    }
    frames = {t: add_rule_columns(getattr(tables, t), t) for t in TABLES}
    results = run_suites(frames, parameters, docs_dir)
    accepted, quarantine, table_report = {}, {}, {}
    for t in TABLES:
        reasons = reasons_by_row(results[t], len(frames[t]))
        accepted[t], quarantine[t] = _split_rows(frames[t], reasons)
        n_in, n_ok, n_bad = len(frames[t]), len(accepted[t]), len(quarantine[t])
        if n_in != n_ok + n_bad:  # the no-loss invariant, checked on every run
            raise RuntimeError(f"{t}: {n_in} input rows != {n_ok} accepted + {n_bad} quarantined")
        counts = quarantine[t]["reasons"].explode().value_counts() if n_bad else pd.Series(dtype=int)
        table_report[t] = {"input": n_in, "accepted": n_ok, "quarantined": n_bad,
                           "reasons": {str(k): int(v) for k, v in counts.items()}}
    items, users = complete_entities(accepted["interactions"], accepted["items"], accepted["users"])
    n_input = table_report["interactions"]["input"]
    quality = table_report["interactions"]["accepted"] / n_input if n_input else 0.0
    report = {
        "as_of": as_of.to_dict(),
        "parameters": parameters,
        "tables": table_report,
        "entities_added": {"items": len(items) - len(accepted["items"]), "users": len(users) - len(accepted["users"])},
        "quality_rate": quality,
        "quality_threshold": config.quality_threshold,
        "passed": quality >= config.quality_threshold,
        "spikes": detect_spikes(accepted["interactions"][TIMESTAMP], config.spike_sigma, config.spike_window_days),
        "expectations": [{k: v for k, v in r.items() if k != "row_ids"} for t in TABLES for r in results[t]],
    }
    for spike in report["spikes"]:
        log.warning("volume spike on %s: %d events, trailing %d-day mean %.1f (threshold %.1f); reported, "
                    "not quarantined", spike["day"], spike["events"], config.spike_window_days,
                    spike["trailing_mean"], spike["threshold"])
    return ValidationOutcome(ContractTables(accepted["interactions"], items, users), quarantine, report)


def gate_message(report: dict[str, Any], quarantine_dir: str, docs: str | None) -> str:
    """A failed gate's message: the rate, the threshold, the top reasons and where to look."""
    t = report["tables"]["interactions"]
    top = sorted(t["reasons"].items(), key=lambda kv: -kv[1])[:5]
    reasons = ", ".join(f"{k}: {v:,}" for k, v in top) or "none"
    return (
        f"Data quality gate failed: {t['accepted']:,} of {t['input']:,} interactions accepted "
        f"({report['quality_rate']:.1%}), below the threshold {report['quality_threshold']:.1%}. "
        f"Top reasons: {reasons}. Quarantined rows: {quarantine_dir}; Data Docs: {docs}. "
        "Fix the source data, or lower quality_threshold if this share of bad rows is expected."
    )


class ValidationResult(TypedDict):
    """What ``validate`` hands on: the accepted contract directory, the quarantine and the report."""

    accepted_dir: str
    accepted: dict[str, str]
    quarantine_dir: str
    report: str
    data_docs: str | None
    counts: dict[str, dict[str, int]]
    quality_rate: float
    spikes: int


def validate_contract_dir(
    input_dir: str | Path, out_dir: str | Path, config: ValidationConfig, now: datetime | None = None
) -> ValidationResult:
    """The ``validate`` stage: read a contract dir, write accepted/, quarantine/, report.json and
    Data Docs under ``out_dir``; raise :class:`DataQualityError` below the quality threshold."""
    out = Path(out_dir)
    docs_dir = out / "data_docs"
    outcome = validate_tables(read_contract_dir(input_dir), config, docs_dir=docs_dir, now=now)
    accepted = write_contract_dir(outcome.accepted, out / "accepted")
    qdir = out / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    for t, df in outcome.quarantine.items():
        df.to_parquet(qdir / f"{t}.parquet", index=False)
    docs_index = docs_dir / "index.html"
    report = {**outcome.report, "outputs": {"accepted_dir": str(out / "accepted"), "quarantine_dir": str(qdir),
                                            "data_docs": str(docs_index) if docs_index.exists() else None}}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    t = report["tables"]["interactions"]
    log.info("validated %s: %d input = %d accepted + %d quarantined (quality %.2f%%); reasons %s",
             input_dir, t["input"], t["accepted"], t["quarantined"], 100 * report["quality_rate"], t["reasons"])
    if not report["passed"]:
        raise DataQualityError(gate_message(report, str(qdir), report["outputs"]["data_docs"]))
    return ValidationResult(
        accepted_dir=str(out / "accepted"),
        accepted=accepted,
        quarantine_dir=str(qdir),
        report=str(out / "report.json"),
        data_docs=report["outputs"]["data_docs"],
        counts={k: {kk: v[kk] for kk in ("input", "accepted", "quarantined")} for k, v in report["tables"].items()},
        quality_rate=report["quality_rate"],
        spikes=len(report["spikes"]),
    )
