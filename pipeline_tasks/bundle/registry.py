"""Register a run's bundle as a version of the source's MLflow model, decide its gate, move the aliases.

Gate (DAG param ``gate``: ``metrics``, default two-stage NDCG@10 and pool recall@N; ``tolerance``, default
0.01 absolute): the challenger's protocol fit is compared with the champion's protocol fit on this run's test
users, paired. It is valid only when the champion's ``t_test`` is not later than this run's. It passes when every
difference is >= -tolerance. Without a champion, the first run becomes ``champion`` only if it beats popularity
on every gate metric. A passing run becomes ``challenger``; a failing one is registered (for the record, tagged
``recsys.gate=failed`` with the reason) and leaves the aliases untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline_tasks.core.errors import InvalidParamsError, PermanentError
from pipeline_tasks.core.params import known_params
from pipeline_tasks.core.settings import Settings
from pipeline_tasks.online.bundle import GATE_REASON_TAG, GATE_TAG, aliases_of, client

log = logging.getLogger(__name__)

POOL_RECALL = "pool_recall"


class GateFailedError(PermanentError):
    """The challenger did not pass the gate: the aliases were left untouched."""


class PromotionRefusedError(PermanentError):
    """A version cannot be promoted (its gate failed, or it does not exist)."""


@dataclass(frozen=True)
class GateConfig:
    """Which metrics gate a challenger and by how much it may trail the champion."""

    metrics: list[str] = field(default_factory=lambda: ["ndcg@10", POOL_RECALL])
    tolerance: float = 0.01

    @classmethod
    def from_params(cls, p: Mapping[str, Any] | None) -> GateConfig:
        cfg = cls(**known_params(cls, p, "gate"))
        if cfg.tolerance < 0:
            raise InvalidParamsError(f"gate.tolerance={cfg.tolerance}: use an absolute difference >= 0")
        return cfg


def gate_column(metric: str, pool_size: int) -> tuple[str, str]:
    """(report row, metric key) of a gate metric: ``pool_recall`` is the merged pool's recall@N."""
    if metric == POOL_RECALL:
        return "merged pool", f"recall@{pool_size}"
    return "two-stage", metric


@dataclass
class GateDecision:
    """The gate's verdict, its reason and the figures behind it."""

    passed: bool
    alias: str | None  # the alias this version gets: champion, challenger or none
    reason: str
    comparisons: dict[str, Any]


def decide(report: Mapping[str, Any], config: GateConfig) -> GateDecision:
    """The gate from the evaluate report (its rows and, when a champion exists, the paired differences)."""
    rows, n = report["rows"], report["pool_size"]
    champion = report.get("champion")
    if champion is None:
        failures, comparisons = [], {}
        for metric in config.metrics:
            row, key = gate_column(metric, n)
            ours, pop = rows[row][key], rows["popularity"][key]
            comparisons[metric] = {"two_stage": ours, "popularity": pop, "difference": ours - pop}
            if not ours > pop:
                failures.append(f"{metric}: {ours:.4f} does not beat popularity's {pop:.4f} "
                                f"(by {ours - pop:+.4f})")
        if failures:
            return GateDecision(False, None, "first model, not better than popularity: " + "; ".join(failures),
                                comparisons)
        return GateDecision(True, "champion", "first model and it beats popularity on " + ", ".join(config.metrics),
                            comparisons)
    if champion.get("invalid"):
        return GateDecision(False, None, champion["invalid"], {})
    failures, comparisons = [], {}
    for metric in config.metrics:
        d = champion["paired"][metric]
        comparisons[metric] = d
        if d["difference"] < -config.tolerance:
            failures.append(f"{metric} trails the champion (version {champion['version']}) by "
                            f"{-d['difference']:.4f} > tolerance {config.tolerance} (paired 95 % CI of the difference "
                            f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])")
    if failures:
        return GateDecision(False, None, "; ".join(failures), comparisons)
    return GateDecision(True, "challenger", f"within {config.tolerance} of champion version {champion['version']} on "
                        + ", ".join(config.metrics), comparisons)


def register_version(name: str, source_uri: str, run_id: str, tags: Mapping[str, Any], decision: GateDecision,
                     settings: Settings | None = None) -> int:
    """Create the model version and, when its gate passed, point its alias at it; returns the version."""
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="Two-stage recommender bundles of one data source "
                                                    "(towers, index, ranker, feature service, metrics).")
    all_tags = {**{k: str(v) for k, v in tags.items()}, GATE_TAG: "passed" if decision.passed else "failed",
                GATE_REASON_TAG: decision.reason[:4000]}
    mv = c.create_model_version(name, source=source_uri, run_id=run_id, tags=all_tags,
                                description=decision.reason[:4000])
    version = int(mv.version)
    if decision.alias:
        c.set_registered_model_alias(name, decision.alias, str(version))
        log.info("%s version %d is now '%s': %s", name, version, decision.alias, decision.reason)
    else:
        log.warning("%s version %d failed the gate, aliases untouched (%s): %s", name, version,
                    aliases_of(name, settings), decision.reason)
    return version


def version_of_run(name: str, run_id: str, settings: Settings | None = None) -> int | None:
    """The version an earlier try of this run's ``register`` created (so a retry does not register twice)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client(settings).search_model_versions(f"name='{name}' and tags.`recsys.run_id` = '{run_id}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in found), default=None)


def promote(name: str, version: int, settings: Settings | None = None, alias: str = "champion") -> dict[str, Any]:
    """Move ``alias`` (default champion) to ``version``; refused for a version whose gate failed."""
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionRefusedError(f"{name} has no version {version}; `recsys models` lists them") from exc
    tags = dict(mv.tags or {})
    if tags.get(GATE_TAG) != "passed":
        raise PromotionRefusedError(f"refusing to promote {name} version {version}: its gate failed "
                                    f"({tags.get(GATE_REASON_TAG, 'no gate recorded')})")
    before = aliases_of(name, settings)
    c.set_registered_model_alias(name, alias, str(version))
    if alias == "champion" and before.get("challenger") == int(version):
        c.delete_registered_model_alias(name, "challenger")
    log.info("%s: '%s' moved from version %s to %s", name, alias, before.get(alias), version)
    return {"name": name, "alias": alias, "from": before.get(alias), "to": int(version)}


def list_versions(name: str, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every version of ``name`` with its aliases, gate and protocol metrics (newest first)."""
    c = client(settings)
    aliases = aliases_of(name, settings)
    out = []
    for mv in c.search_model_versions(f"name='{name}'"):
        tags = dict(mv.tags or {})
        v = int(mv.version)
        out.append({"version": v, "aliases": [a for a, av in aliases.items() if av == v],
                    "gate": tags.get(GATE_TAG), "reason": tags.get(GATE_REASON_TAG),
                    "run_id": tags.get("recsys.run_id"),
                    "metrics": {k.removeprefix("recsys.metric."): tags[k] for k in tags
                                if k.startswith("recsys.metric.")}, "t_test": tags.get("recsys.t_test")})
    return sorted(out, key=lambda r: -r["version"])


def metric_tags(report: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
    """The protocol fit's headline figures as version tags (``recsys.metric.<row>.<metric>``), labelled protocol."""
    out = {}
    for row in ("two-stage", "two-stage + rules", "merged pool", "two-tower alone", "popularity"):
        for key in keys:
            value = report["rows"].get(row, {}).get(key)
            if value is not None:
                name = f"{row.replace(' ', '_').replace('+', 'plus')}.{key.replace('@', '_at_')}"
                out[f"recsys.metric.protocol.{name}"] = f"{value:.4f}"
    return out
