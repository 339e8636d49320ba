"""Validate contract tables with Great Expectations 1.x and quarantine the rows that fail.

The rules live in ``expectations/<table>.json`` (one GX suite per table). Each expectation's
``meta.reason`` is the quarantine reason of the rows it flags, and the flagged rows come from GX's
own results (``unexpected_index_list`` over a ``_row_id`` column), so GX decides, not a second
hand-written pass. A few helper columns (``_dup_rank``, ``_user_day_events``, ``_ts_epoch``) are
derived first so that every contract rule is a plain expectation.

Interactions naming an item (or user) that its table lacks are accepted and the entity gets a stub
row; the share of such interactions is reported, logged and limited by ``max_stub_share``. The
gate (:mod:`pipeline_tasks.data.quality_gate`) and the results page written as
``data_docs/index.html`` (:mod:`pipeline_tasks.data.quality_report`) live in their own modules.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import (
    DEFAULT_BOT_EVENTS_PER_DAY,
    DEFAULT_HORIZON_DAYS,
    DEFAULT_MAX_STUB_SHARE,
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
    USER_DAY_EVENTS,
    USER_ID,
)
from pipeline_tasks.core.errors import InvalidParamsError, PermanentError
from pipeline_tasks.data.contract import (
    RAW_TIMESTAMP,
    RAW_VALUE,
    ContractTables,
    read_contract_dir,
    write_contract_dir,
)
from pipeline_tasks.data.quality_gate import gate_failures, gate_message, reason_details
from pipeline_tasks.data.quality_report import write_quality_page
from pipeline_tasks.data.stubs import complete_entities, log_stubs, stub_report

log = logging.getLogger(__name__)

DUPLICATE_KEY = [USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE]
ID_COLUMN = {"interactions": None, "items": ITEM_ID, "users": USER_ID}


class DataQualityError(PermanentError, RuntimeError):
    """The quality gate failed: too few interactions accepted, or too many naming an unknown item or
    user (a data error: no retry)."""


def expectations_dir() -> Path:
    """The folder holding the GX suites (``expectations/`` at the project root)."""
    return Path(__file__).resolve().parents[2] / "expectations"


@dataclass(frozen=True)
class ValidationConfig:
    """Contract rule parameters; ``as_of=None`` means the contract's default anchoring.

    ``max_stub_share``: the largest share of accepted interactions whose item (or, when a users
    table was given, whose user) is missing from its table and gets a stub row; above it the gate
    fails. The default's reasoning is at :data:`~pipeline_tasks.core.constants.DEFAULT_MAX_STUB_SHARE`.
    """

    as_of: datetime | None = None
    horizon_days: int = DEFAULT_HORIZON_DAYS
    bot_events_per_day: int = DEFAULT_BOT_EVENTS_PER_DAY
    event_types: tuple[str, ...] = EVENT_TYPES
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    spike_sigma: float = DEFAULT_SPIKE_SIGMA
    spike_window_days: int = DEFAULT_SPIKE_WINDOW_DAYS
    max_stub_share: float = DEFAULT_MAX_STUB_SHARE

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_stub_share <= 1.0:
            raise InvalidParamsError(f"max_stub_share={self.max_stub_share}: must be a share in [0, 1] "
                                     "(1 turns the limit off)")


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
                        "rule": str(cfg.meta.get("notes", "")),
                        "success": bool(r.success),
                        "unexpected_count": int(r.result.get("unexpected_count") or 0),
                        "row_ids": (ids := _row_ids(failing)),
                        "flagged_rows": len(ids),
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
    """Validate the three tables, split each into accepted and quarantined rows, report.

    GX writes its own Data Docs to ``docs_dir`` when given. An empty users table counts as none:
    then every user is a stub by design and ``max_stub_share`` does not apply to users."""
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
    # Stub rows come on top of the accepted input rows of items/users; their counts live in "stubs".
    stubs = stub_report(accepted, config.max_stub_share, users_given=len(tables.users) > 0)
    log_stubs(stubs)
    n_input = table_report["interactions"]["input"]
    quality = table_report["interactions"]["accepted"] / n_input if n_input else 0.0
    report: dict[str, Any] = {
        "as_of": as_of.to_dict(),
        "parameters": parameters,
        "tables": table_report,
        "entities_added": {"items": len(items) - len(accepted["items"]), "users": len(users) - len(accepted["users"])},
        "stubs": stubs,
        "quality_rate": quality,
        "quality_threshold": config.quality_threshold,
        "reason_details": reason_details(frames["interactions"], results["interactions"], as_of.horizon_anchor,
                                         config.horizon_days),
        "spikes": detect_spikes(accepted["interactions"][TIMESTAMP], config.spike_sigma, config.spike_window_days),
        "expectations": [{k: v for k, v in r.items() if k != "row_ids"} for t in TABLES for r in results[t]],
    }
    failed = gate_failures(report)
    report["passed"] = not failed
    report["gate"] = {"passed": not failed, "failed": failed, "message": None}
    for spike in report["spikes"]:
        log.warning("volume spike on %s: %d events, trailing %d-day mean %.1f (threshold %.1f); reported, "
                    "not quarantined", spike["day"], spike["events"], config.spike_window_days,
                    spike["trailing_mean"], spike["threshold"])
    return ValidationOutcome(ContractTables(accepted["interactions"], items, users), quarantine, report)


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
    """The ``validate`` stage: read a contract dir, write accepted/, quarantine/, report.json and the
    results page ``data_docs/index.html`` (GX's own Data Docs in ``data_docs/gx/``) under ``out_dir``;
    raise :class:`DataQualityError` when the gate fails, after writing them all."""
    out = Path(out_dir)
    docs_dir = out / "data_docs"
    gx_dir = docs_dir / "gx"
    shutil.rmtree(gx_dir, ignore_errors=True)  # a re-run replaces GX's pages instead of adding to them
    outcome = validate_tables(read_contract_dir(input_dir), config, docs_dir=gx_dir, now=now)
    accepted = write_contract_dir(outcome.accepted, out / "accepted")
    qdir = out / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    for t, df in outcome.quarantine.items():
        df.to_parquet(qdir / f"{t}.parquet", index=False)
    page, gx_index = docs_dir / "index.html", gx_dir / "index.html"
    report = {**outcome.report, "input_dir": str(input_dir),
              "outputs": {"accepted_dir": str(out / "accepted"), "quarantine_dir": str(qdir),
                          "report": str(out / "report.json"), "data_docs": str(page),
                          "gx_data_docs": str(gx_index) if gx_index.exists() else None}}
    if not report["passed"]:
        report["gate"]["message"] = gate_message(report, str(qdir), str(page))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    write_quality_page(report, page)
    t = report["tables"]["interactions"]
    log.info("validated %s: %d input = %d accepted + %d quarantined (quality %.2f%%); reasons %s; results page %s",
             input_dir, t["input"], t["accepted"], t["quarantined"], 100 * report["quality_rate"], t["reasons"], page)
    if not report["passed"]:
        raise DataQualityError(report["gate"]["message"])
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
