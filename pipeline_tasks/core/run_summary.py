"""What ``recsys run`` tells a person: one key figure per task, and the run's summary from its manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADLINE_METRIC = "recall@100"  # the retrieval stage's figure (README "Quality")


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def key_figure(task: str, info: dict[str, Any]) -> str:
    """The one figure that says how a task went, from its manifest entry (empty if it has none)."""
    out = info.get("outputs") or {}
    try:
        if task == "ingest":
            return ", ".join(f"{_n(v)} {k}" for k, v in out["counts"].items())
        if task == "validate":
            c = out["counts"]["interactions"]
            return (f"{_n(c['input'])} input = {_n(c['accepted'])} accepted + {_n(c['quarantined'])} quarantined "
                    f"(quality {out['quality_rate']:.2%})")
        if task == "split":
            return " / ".join(f"{k} {_n(v)}" for k, v in out["counts"].items())
        if task == "build_features":
            rows = " + ".join(f"{_n(v)} {k}" for k, v in out.get("rows", {}).items())
            return f"{rows or 'no new'} rows; readable days {out.get('first_day')} .. {out.get('last_day')}"
        if task == "feast_apply":
            return (f"project {out['project']}: {len(out['feature_views'])} feature views, "
                    f"{len(out['feature_services'])} services")
        if task == "materialize":
            views = out["feature_views"].items()
            return ", ".join(f"{view} {v.get('mode')} ({_n(v.get('entities'))} entities)" for view, v in views)
        if task == "training_set":
            return f"{_n(out['rows'])} rows ({out.get('feature_service')})"
        if task == "drift_check":
            worst = max(out["psi"].items(), key=lambda kv: kv[1]) if out.get("psi") else None
            top = f"max PSI {worst[1]:.3f} ({worst[0]})" if worst else "no PSI"
            return f"drifted: {', '.join(out['flagged'])}; {top}" if out.get("flagged") else f"no drift; {top}"
        if task == "served_drift":
            verdicts = [f"{m} {r['status']}" + (f" ({', '.join(r['flagged'])})" if r.get("flagged") else "")
                        + (f", {_n(r['events'])} events" if "events" in r else "")
                        for m, r in out["models"].items()]
            retrain = f"; retraining {len(out['trigger'])} model(s)" if out.get("trigger") else ""
            return ("; ".join(verdicts) or "no model with a champion") + retrain
        if task == "train_two_tower":
            test = out["test"]
            return ", ".join(f"{m} {HEADLINE_METRIC} {v[HEADLINE_METRIC]:.3f}" for m, v in test.items())
        if task == "build_index":
            return (f"{out['kind']}, {_n(out['n_items'])} items, recall@{out['k']} {out['recall_at_k']:.3f}, "
                    f"p99 {out['latency_ms_p99']:.2f} ms")
        if task == "candidates":
            c = out["candidates"]
            return f"pool {c['pool_size']}, trending {c['trending_days']:g} d, weights {c['weights']}"
        if task == "ranking_set":
            v, t = out["validation"], out["test"]
            return (f"validation {_n(v['rows'])} rows ({_n(v['queries'])} queries, pool recall {v['pool_recall']:.3f}),"
                    f" test {_n(t['rows'])} rows; {_n(int(v['rows_per_second']))} rows/s")
        if task == "tune_ranker":
            return f"{out['n_trials']} trials, best holdout NDCG@10 {out['best_value']:.4f}"
        if task == "train_ranker":
            return ", ".join(f"{k} {v['rows']:,} rows in {v['seconds']:.1f} s" for k, v in out["figures"].items())
        if task == "evaluate":
            return ", ".join(f"{k} {v:.3f}" for k, v in out["headline"].items()) + " (two-stage, test)"
        if task == "register":
            return f"{out['model']} v{out['version']}: gate {out['gate']} -> {out['alias'] or 'no alias'}"
        if task == "build_bento":
            return f"Bento {out['tag']}"
        if task == "refresh_items":
            return f"{out.get('status')}, {_n(out.get('added', 0))} new items"
        if task == "plan" and "samples" in out:
            return (f"{out['model']} v{out['challenger_version']} vs champion v{out['champion_version']}, samples "
                    f"{out['samples']}")
        if task.startswith("set_share_"):
            return f"{out['share_bp'] / 100:g} % to the challenger, waiting for {out['needed']} requests"
        if task.startswith("analyse_"):
            b = out["counts"]["challenger"]
            return (f"{out['decision']}: CTR {out['ctr']['rate_b']:.3f} vs {out['ctr']['rate_a']:.3f} "
                    f"(p={out['ctr']['p_value']:.2g}, {b['requests']} challenger requests)")
        if task.startswith("rollback") or task == "promote":
            return out["decision"] + (f": {'; '.join(out.get('reasons') or [])}" if out.get("reasons") else "")
        if task == "report" and "decision" in out:
            return f"{out['decision']}: {out['report']}"
        if task == "publish_snapshots":
            return "; ".join(f"{e['name']} v{e['version']} {e['status']}" + (f" ({', '.join(e['changed'])})"
                             if e.get("changed") else "") for e in out["snapshots"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""
    return ""


def model_lines(metrics_path: str | Path) -> list[str]:
    """Each model's headline test metrics with their 95 % CIs, from ``train_two_tower/metrics.json``."""
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, ValueError):
        return []
    lines = []
    for name, model in metrics.get("models", {}).items():
        test = model.get("test") or {}
        figures = []
        for metric in (HEADLINE_METRIC, "recall@500", "ndcg@10"):
            if metric in test:
                low, high = (test.get("ci95") or {}).get(metric, (None, None))
                ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
                figures.append(f"{metric} {test[metric]:.3f}{ci}")
        lines.append(f"{name:<11} " + ", ".join(figures))
    users = metrics.get("test_users")
    if lines and users:
        lines.append(f"(test window, {users:,} users, 95 % bootstrap CIs)")
    return lines


def two_stage_lines(report_path: str | Path) -> list[str]:
    """The two-stage evaluation's headline rows (protocol fit, test window) with their 95 % CIs."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):
        return []
    n = report.get("pool_size", 500)
    lines = []
    for row in ("two-stage", "two-stage + rules", "merged pool"):
        test = report.get("rows", {}).get(row)
        if not test:
            continue
        figures = []
        for metric in ("ndcg@10", f"recall@{n}"):
            low, high = (test.get("ci95") or {}).get(metric, (None, None))
            ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
            figures.append(f"{metric} {test[metric]:.3f}{ci}")
        lines.append(f"{row:<17} " + ", ".join(figures))
    if lines:
        lines.append(f"(two-stage protocol fit; report: {Path(report_path).with_suffix('.html')})")
    return lines


def summary_lines(manifest: dict[str, Any], manifest_path: Path, mlflow_uri: str) -> list[str]:
    """Where everything of a run is: directory, manifest, source, data counts, model quality, index, MLflow."""
    lines = ["", "Artifacts of this run:",
             f"  run directory : {manifest['run_dir']}",
             f"  manifest      : {manifest_path}"]
    config = manifest.get("config") or {}
    if config.get("source"):
        lines.append(f"  data source   : {config.get('source')} (namespace {config.get('namespace')})")
    tasks = manifest.get("tasks", {})
    for task, info in tasks.items():
        outputs = info.get("outputs") or {}
        error = f" ({info['error']})" if info.get("error") else ""
        lines.append(f"  {task:<16}: {info.get('status')}{error}")
        for key, value in outputs.items():
            if isinstance(value, str) and "/" in value:
                lines.append(f"      {key:<16} {value}")
    if "data" in manifest:
        c = manifest["data"]["counts"]["interactions"]
        lines.append(f"  data snapshot : sha256 {manifest['data']['snapshot_sha256']}")
        lines.append(f"  interactions  : {c['input']:,} input = {c['accepted']:,} accepted + "
                     f"{c['quarantined']:,} quarantined")
    trained = (tasks.get("train_two_tower") or {}).get("outputs") or {}
    if trained.get("metrics"):
        models = model_lines(trained["metrics"])
        if models:
            lines.append("  models (test) :")
            lines.extend(f"      {line}" for line in models)
    evaluated = (tasks.get("evaluate") or {}).get("outputs") or {}
    if evaluated.get("report"):
        lines.extend(f"      {line}" for line in two_stage_lines(evaluated["report"]))
    registered = (tasks.get("register") or {}).get("outputs") or {}
    if registered.get("model"):
        lines.append(f"  registry      : {registered['model']} version {registered['version']}, gate "
                     f"{registered['gate']} -> {registered.get('alias') or 'aliases untouched'}; `recsys models`")
    bento = (tasks.get("build_bento") or {}).get("outputs") or {}
    if bento.get("tag"):
        lines.append(f"  Bento         : {bento['tag']}; serve it: {bento['serve']} (or `recsys serve`)")
    if trained.get("mlflow_run_id"):
        lines.append(f"  MLflow        : experiment {trained.get('mlflow_experiment')}, run {trained['mlflow_run_id']}")
        if mlflow_uri.startswith("sqlite:///"):
            mlflow = Path(sys.executable).parent / "mlflow"
            lines.append(f"                  {mlflow} ui --backend-store-uri {mlflow_uri} -p 5000   "
                         "# then open http://127.0.0.1:5000")
        else:
            lines.append(f"                  tracking server {mlflow_uri}")
    return lines
