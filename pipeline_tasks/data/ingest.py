"""The ``ingest`` stage: turn a data source into a contract directory (normalised, nothing dropped).

Sources: ``synthetic`` (the seeded generator), ``movielens:PATH`` (100K or 1M format), or a
directory holding the contract tables as parquet or csv.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from pipeline_tasks.data.contract import ContractError, ContractTables, read_contract_dir, write_contract_dir

log = logging.getLogger(__name__)


def synthetic_config(options: dict[str, Any]) -> Any:
    """A SyntheticConfig from plain options (DAG params / CLI); ``faults`` is "all", "none" or a dict."""
    from pipeline_tasks.data.synthetic import FaultConfig, SyntheticConfig

    opts = dict(options)
    faults = opts.pop("faults", None)
    if faults in (None, "none", False):
        fault_cfg = FaultConfig()
    elif faults in ("all", True):
        fault_cfg = FaultConfig.all()
    elif isinstance(faults, dict):
        fault_cfg = FaultConfig.all(faults.pop("rate")) if "rate" in faults and len(faults) == 1 else FaultConfig(
            **faults)
    else:
        raise ValueError(f"faults must be 'all', 'none' or a dict of FaultConfig fields, got {faults!r}")
    unknown = set(opts) - set(SyntheticConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {sorted(unknown)}; "
                         f"known: {sorted(SyntheticConfig.__dataclass_fields__)}")
    return SyntheticConfig(**opts, faults=fault_cfg)


def load_source(source: str, synthetic: dict[str, Any] | None = None) -> ContractTables:
    """Load ``synthetic`` | ``movielens:PATH`` | a contract directory into contract tables.

    ``synthetic`` takes the generator's settings (SyntheticConfig fields; ``faults`` may be
    ``"all"``, a dict of FaultConfig fields, or absent).
    """
    if source == "synthetic":
        from pipeline_tasks.data.synthetic import generate

        return generate(synthetic_config(synthetic or {})).tables
    if source.startswith("movielens:"):
        from pipeline_tasks.data.movielens import load_movielens

        return load_movielens(Path(source.removeprefix("movielens:")).expanduser())
    path = Path(source).expanduser()
    if path.is_dir():
        return read_contract_dir(path)
    raise ContractError(
        f"unknown data source {source!r}: use 'synthetic', 'movielens:PATH' or a directory with "
        "interactions.parquet|csv and items.parquet|csv"
    )


class IngestResult(TypedDict):
    """What ``ingest`` hands to ``validate``: the canonical tables of the source."""

    contract_dir: str
    tables: dict[str, str]
    counts: dict[str, int]
    source: str


def ingest(source: str, out_dir: str | Path, synthetic: dict[str, Any] | None = None,
           feedback_log: str | Path | None = None) -> IngestResult:
    """Write the source's tables as a contract directory under ``out_dir``; return paths and counts.

    With ``feedback_log`` (a service's log directory, :mod:`pipeline_tasks.online.feedback_log`), its feedback
    events of contract event types are appended to the interactions: validation treats them like any input
    row (quarantined with a reason when invalid). Impressions never become interactions.
    """
    tables = load_source(source, synthetic)
    if feedback_log:
        from pipeline_tasks.online.feedback_log import feedback_interactions

        events = feedback_interactions(feedback_log)
        base = tables.interactions
        events = events.reindex(columns=base.columns)
        tables.interactions = pd.concat([base, events.astype({c: base[c].dtype for c in ("user_id", "item_id")
                                                              if c in base})], ignore_index=True)
        log.info("feedback log %s: %d events of contract types joined the %d source interactions", feedback_log,
                 len(events), len(base))
    paths = write_contract_dir(tables, Path(out_dir))
    counts = tables.counts()
    log.info("ingested %s: %s rows -> %s", source, counts, out_dir)
    return IngestResult(contract_dir=str(out_dir), tables=paths, counts=counts, source=source)
