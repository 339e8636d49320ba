"""Canary stages: plan the walk, set a step's share, wait for its sample, analyse it, promote or roll back, report.

The ``recsys_canary`` DAG calls these; they talk to the router over HTTP and read its log
(:mod:`pipeline_tasks.bundle.canary`), decide with :mod:`pipeline_tasks.evaluation.canary` and move aliases with
the registry (:mod:`pipeline_tasks.bundle.registry`).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.errors import PermanentError
from pipeline_tasks.core.runs import run_dir, run_stage, start_run

log = logging.getLogger(__name__)

CANARY_EXPERIMENT = "recsys_canary"
CONFIG_KEYS = ("steps", "base_ctr", "mde", "alpha", "power", "max_error_share", "max_p99_ratio", "p99_slack_ms",
               "min_coverage_ratio", "min_sample", "max_sample")


class CanaryRefusedError(PermanentError):
    """The canary must not run or promote (failed gate, no challenger, a router serving something else)."""


def canary_config(params: dict[str, Any] | None) -> Any:
    from pipeline_tasks.evaluation.canary import CanaryConfig

    p = {k: v for k, v in (params or {}).items() if k in CONFIG_KEYS and v is not None}
    if "steps" in p:
        p["steps"] = tuple(int(s) for s in p["steps"])
    try:
        return CanaryConfig(**p)
    except (TypeError, ValueError) as exc:
        raise CanaryRefusedError(f"canary params: {exc}") from exc


def _gate_of(model: str, version: int) -> tuple[str | None, str | None]:
    from pipeline_tasks.bundle.registry import list_versions

    for row in list_versions(model):
        if row["version"] == version:
            return row["gate"], row["reason"]
    raise CanaryRefusedError(f"{model} has no version {version}; `recsys models` lists them")


def plan_stage(run_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Who is compared with whom, through which router, and the sample each step waits for (fixed up front)."""
    from pipeline_tasks.bundle.canary import record, resolve_model, route_state, router_url
    from pipeline_tasks.evaluation.canary import step_samples
    from pipeline_tasks.online.bundle import aliases_of

    p = dict(params or {})
    start_run(run_id, config=p)
    config = canary_config(p)

    def work(out_dir: Path) -> dict[str, Any]:
        model = resolve_model(p.get("model"))
        aliases = aliases_of(model)
        champion = aliases.get("champion")
        challenger = int(p["challenger_version"]) if p.get("challenger_version") else aliases.get("challenger")
        if champion is None or challenger is None:
            return {"status": "no_challenger", "model": model,
                    "message": f"{model} has no {'champion' if champion is None else 'challenger'}: run "
                               "`recsys run` until a version passes the gate as challenger"}
        if challenger == champion:
            raise CanaryRefusedError(f"version {challenger} of {model} is already the champion")
        gate, reason = _gate_of(model, challenger)
        if gate != "passed":
            raise CanaryRefusedError(f"refusing to canary {model} version {challenger}: its gate "
                                     f"{gate or 'was not recorded'} ({reason or 'no reason recorded'})")
        url = router_url(model)
        state = route_state(url)
        if state.get("champion_version") != champion or state.get("challenger_version") != challenger:
            raise CanaryRefusedError(
                f"the router at {url} routes champion v{state.get('champion_version')} / challenger "
                f"v{state.get('challenger_version')}, the registry says v{champion} / v{challenger}: restart the "
                "services with `recsys canary start`")
        samples = {str(k): v for k, v in step_samples(config).items()}
        plan = {"status": "planned", "model": model, "router": url, "champion_version": champion,
                "challenger_version": challenger, "config": config.to_dict(), "samples": samples}
        (out_dir / "plan.json").write_text(json.dumps(plan, indent=2))
        record(model, status="running", run_id=run_id, champion_version=champion, challenger_version=challenger,
               samples=samples, steps=[], decision=None, reasons=[])
        log.info("canary of %s: challenger v%d against champion v%d through %s; steps %s; samples per step %s",
                 model, challenger, champion, url, list(config.steps), samples)
        return plan

    return run_stage(run_id, "plan", work)


def set_share_stage(run_id: str, plan: dict[str, Any], index: int) -> dict[str, Any]:
    """Send the step's share of users to the challenger (the router swaps its route without a restart)."""
    from pipeline_tasks.bundle.canary import change_route, record

    share = int(plan["config"]["steps"][index])

    def work(out_dir: Path) -> dict[str, Any]:
        started = datetime.now(UTC)
        route = change_route(plan["router"], share_bp=share)
        record(plan["model"], share_bp=share, step_started_at=started.isoformat())
        log.info("step %d: %s %% of users to challenger v%d (sample: %d challenger requests)", index + 1,
                 share / 100, plan["challenger_version"], plan["samples"][str(share)])
        return {"share_bp": share, "started_at": started.isoformat(), "needed": plan["samples"][str(share)],
                "route": route}

    return run_stage(run_id, f"set_share_{index + 1}", work)


def step_analysis(plan: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """The step's analysis from the router's log since the step began."""
    from pipeline_tasks.bundle.canary import read_router_log
    from pipeline_tasks.evaluation.canary import analyse

    requests, feedback = read_router_log(plan["model"], pd.Timestamp(step["started_at"]))
    return analyse(requests, feedback, canary_config(plan["config"]), step["share_bp"], step["needed"])


def analyse_stage(run_id: str, plan: dict[str, Any], step: dict[str, Any], index: int) -> dict[str, Any]:
    """The step's verdict: ``advance`` or ``rollback``, with every figure, in the task log and the run."""
    from pipeline_tasks.bundle.canary import read_record, record
    from pipeline_tasks.evaluation.canary import steps_summary

    def work(out_dir: Path) -> dict[str, Any]:
        result = step_analysis(plan, step)
        if result["decision"] == "wait":  # the sensor saw the sample; the log cannot shrink
            raise RuntimeError(f"step {index + 1}: the sample is not in ({result['counts']})")
        (out_dir / "analysis.json").write_text(json.dumps(result, indent=2, default=str))
        done = [*read_record(plan["model"]).get("steps", []), result]
        record(plan["model"], steps=done)
        log.info("step %d verdict:\n%s", index + 1, steps_summary([result]))
        return result

    return run_stage(run_id, f"analyse_{index + 1}", work)


def promote_stage(run_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    """100 %: the challenger becomes the champion (MLflow alias moved atomically; the router follows)."""
    from pipeline_tasks.bundle.canary import promote_challenger

    return run_stage(run_id, "promote", lambda out_dir: promote_challenger(
        plan["model"], int(plan["challenger_version"]), plan["router"]))


def rollback_stage(run_id: str, plan: dict[str, Any], reasons: list[str], task: str = "rollback"
                   ) -> dict[str, Any]:
    """The challenger gets no more traffic; its alias is removed and the version tagged with why."""
    from pipeline_tasks.bundle.canary import rollback_challenger

    return run_stage(run_id, task, lambda out_dir: rollback_challenger(
        plan["model"], int(plan["challenger_version"]), plan["router"], reasons))


def report_stage(run_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The A/B report (HTML a person can read, JSON) and the MLflow run of this canary."""
    from pipeline_tasks.bundle.canary import read_record
    from pipeline_tasks.core.tracking import log_artifacts, log_flat, mlflow_run
    from pipeline_tasks.evaluation.canary import steps_summary

    def work(out_dir: Path) -> dict[str, Any]:
        rec = read_record(plan["model"])
        steps = rec.get("steps", [])
        html = out_dir / "ab_report.html"
        html.write_text(_html(plan, rec))
        (out_dir / "ab_report.json").write_text(json.dumps({"plan": plan, "record": rec}, indent=2, default=str))
        with mlflow_run(f"{CANARY_EXPERIMENT}_{plan['model']}", run_name=run_id,
                        tags={"recsys.run_id": run_id, "recsys.challenger": plan["challenger_version"],
                              "recsys.champion": plan["champion_version"],
                              "recsys.decision": rec.get("decision") or "none"}) as run:
            for i, step in enumerate(steps, start=1):
                log_flat(f"step{i}.", {"share_bp": step["share_bp"], "ctr_lift": step["ctr"]["lift"],
                                       "ctr_p": step["ctr"]["p_value"],
                                       "ctr_challenger": step["ctr"]["rate_b"], "ctr_champion": step["ctr"]["rate_a"],
                                       "conversion_lift": step["conversion"]["lift"],
                                       "requests_challenger": step["counts"]["challenger"]["requests"]})
            log_artifacts({"canary": out_dir})
            mlflow_id = run.info.run_id
        log.info("A/B report: %s\n%s\ndecision: %s", html, steps_summary(steps), rec.get("decision"))
        return {"report": str(html), "decision": rec.get("decision"), "mlflow_run_id": mlflow_id,
                "steps": len(steps)}

    return run_stage(run_id, "report", work)


def _html(plan: dict[str, Any], rec: dict[str, Any]) -> str:
    """A self-contained page: the plan, one table per step, the decision and its reasons."""
    from html import escape

    rows = []
    for step in rec.get("steps", []):
        a, b = step["counts"]["champion"], step["counts"]["challenger"]
        ctr, conv = step["ctr"], step["conversion"]
        guard = "<br>".join(f"{escape(k)}: {g['value']:.4g} (limit {g['limit']:.4g}) {'ok' if g['ok'] else 'BREACH'}"
                            for k, g in step["guardrails"].items())
        rows.append(
            f"<tr><td>{step['share_bp'] / 100:g} %</td><td>{a['requests']}</td><td>{b['requests']} / "
            f"{step['needed']}</td><td>{ctr['rate_a']:.4f}</td><td>{ctr['rate_b']:.4f}</td>"
            f"<td>{ctr['lift']:+.1%} [{ctr['lift_ci'][0]:+.1%}, {ctr['lift_ci'][1]:+.1%}]</td>"
            f"<td>{ctr['p_value']:.3g}</td><td>{conv['rate_a']:.4f} / {conv['rate_b']:.4f} "
            f"(p {conv['p_value']:.3g})</td><td>{guard}</td><td><b>{escape(step['decision'])}</b>"
            f"{'<br>' + escape('; '.join(step['reasons'])) if step['reasons'] else ''}</td></tr>")
    head = ("<tr><th>share</th><th>champion requests</th><th>challenger requests / sample</th><th>CTR champion</th>"
            "<th>CTR challenger</th><th>lift (95 % CI)</th><th>p</th><th>conversion (p)</th><th>guardrails</th>"
            "<th>verdict</th></tr>")
    reasons = "; ".join(rec.get("reasons") or [])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Canary {escape(plan['model'])} "
            f"v{plan['challenger_version']}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "</style></head><body>"
            f"<h1>Canary: {escape(plan['model'])} v{plan['challenger_version']} against champion "
            f"v{plan['champion_version']}</h1>"
            f"<p>Decision: <b>{escape(str(rec.get('decision')))}</b> {escape(reasons)}</p>"
            f"<p>Router {escape(plan['router'])}; steps {plan['config']['steps']} (basis points); CTR base "
            f"{plan['config']['base_ctr']}, minimum detectable effect {plan['config']['mde']:.0%} (relative), "
            f"alpha {plan['config']['alpha']}, power {plan['config']['power']}; samples per step "
            f"{escape(json.dumps(plan['samples']))} challenger requests, fixed before the walk (no peeking). CTR: "
            "requests with at least one click-type event; conversion: with a purchase; two-sided two-proportion "
            "z-tests.</p><table>" + head + "".join(rows) + "</table></body></html>")


def run_manifest(run_id: str) -> dict[str, Any]:
    return json.loads((run_dir(run_id) / "manifest.json").read_text())
