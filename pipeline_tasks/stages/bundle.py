"""Two-stage evaluation and registration stages: the test-window report, the bundle, the gate and the aliases."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.runs import run_dir, run_stage
from pipeline_tasks.stages.common import run_config, run_settings
from pipeline_tasks.stages.ranking import CandidatesResult, _ranker_tags, ranker_experiment, read_features

log = logging.getLogger(__name__)


def evaluate_stage(run_id: str, candidates: CandidatesResult, ranker: dict[str, Any]) -> dict[str, Any]:
    """The protocol fit on the test window: every row of the report, the champion (paired) when one exists."""
    from pipeline_tasks.bundle.registry import GateConfig, gate_column
    from pipeline_tasks.core.tracking import log_artifacts, log_flat, mlflow_run
    from pipeline_tasks.evaluation.metrics import evaluate, targets
    from pipeline_tasks.evaluation.two_stage import (
        ROWS,
        cold_start_row,
        evaluate_fit,
        paired_differences,
        write_report,
    )
    from pipeline_tasks.online.bundle import aliases_of, load_bundle, model_name
    from pipeline_tasks.online.candidates import SOURCES
    from pipeline_tasks.online.two_stage import Moment, load_fit
    from pipeline_tasks.ranking.fits import load_run_data

    p = run_config(run_id)
    gate = GateConfig.from_params(p.get("gate"))
    n_boot = int((p.get("two_tower") or {}).get("n_boot", 1000))

    def work(out_dir: Path) -> dict[str, Any]:
        data = load_run_data(candidates["split_dir"], candidates["accepted_dir"])
        fit = load_fit(ranker["fits"]["protocol"])
        user_rows, item_rows = read_features(candidates["features_dir"], "t_test")
        moment = Moment(data.t_test, data.trainval, data.items, data.users, user_rows, item_rows)
        n = fit.config.pool_size
        vectors = (fit.item_ids, fit.model.item_embeddings(item_rows)) if fit.model is not None else None
        table, per_user, lists_by_row = evaluate_fit(fit, moment, data.test, n, n_boot=n_boot, item_vectors=vectors,
                                                     extra_orders=SOURCES)
        # The two-stage lists as scored (what `recsys recommend --fit protocol --no-rules --k N` gives at t_test).
        pd.DataFrame([(u, i, r) for u, items in lists_by_row["two-stage"].items()
                      for r, i in enumerate(items, start=1)], columns=["user_id", "item_id", "rank"]
                     ).to_parquet(out_dir / "two_stage_lists.parquet", index=False)
        truth, _ = targets(moment.history, data.test)
        source_recall = {s: evaluate(lists_by_row[s], truth, len(fit.item_ids), ks=(n,), n_boot=0)[f"recall@{n}"]
                         for s in SOURCES}
        source_recall["merged pool"] = table["merged pool"][f"recall@{n}"]
        report: dict[str, Any] = {
            "run_id": run_id, "fit": "protocol", "t_val": data.t_val.isoformat(), "t_test": data.t_test.isoformat(),
            "k_max": n, "pool_size": n, "n_items": len(fit.item_ids), "test_users": len(truth), "rows": table,
            "source_recall": source_recall, "gate_metrics": gate.metrics,
            "cold_start": cold_start_row(fit, moment, data.test, n, n_boot, 42), "champion": None}
        name = model_name(p["namespace"])
        champion_version = aliases_of(name, run_settings(p)).get("champion")
        if champion_version is not None:
            bundle = load_bundle(name, version=champion_version, settings=run_settings(p))
            champ_t_test = pd.Timestamp(bundle.meta["t_test"])
            if champ_t_test > data.t_test:
                report["champion"] = {"version": champion_version, "invalid": (
                    f"the champion (version {champion_version}) was tested from {champ_t_test.isoformat()}, after this "
                    f"run's t_test {data.t_test.isoformat()}: its figures cannot be compared on this run's test "
                    "window (it trained on part of it); run on newer data or promote by hand")}
            else:
                cfit = load_fit(bundle.fit_dir("protocol"))
                rows = {"two-stage": "ranker", "merged pool": "pool"}
                ctable, cper_user, _ = evaluate_fit(cfit, moment, data.test, n, n_boot=n_boot, rows=rows)
                both = pd.concat([per_user, cper_user.add_prefix("champion:")], axis=1)
                paired = {}
                for metric in gate.metrics:
                    row, key = gate_column(metric, n)
                    paired[metric] = paired_differences(both, row, f"champion:{row}", [key], n_boot=max(n_boot, 1))[key]
                table["champion (two-stage)"] = ctable["two-stage"]
                report["champion"] = {"version": champion_version, "paired": paired,
                                      "note": "challenger minus champion on this run's test users, both protocol "
                                              "fits"}
        per_user.to_parquet(out_dir / "per_user.parquet")
        paths = write_report(report, out_dir)
        with mlflow_run(ranker_experiment(p["namespace"]), run_name=f"evaluate {run_id}",
                        tags=_ranker_tags(run_id, "evaluate"), resume_by=("recsys.run_id", "recsys.task")) as run:
            for row, metrics in table.items():
                log_flat(f"protocol.{re.sub(r'[^A-Za-z0-9_]+', '_', row.replace('+', 'plus')).strip('_')}.",
                         {k: v for k, v in metrics.items() if k != "ci95"})
            log_artifacts({"evaluate": out_dir})
            mlflow_run_id = run.info.run_id
        head = table["two-stage"]
        log.info("two-stage on test (protocol fit): NDCG@10 %.4f, recall@%d %.4f; popularity NDCG@10 %.4f",
                 head["ndcg@10"], n, head[f"recall@{n}"], table["popularity"]["ndcg@10"])
        return {"report": paths["json"], "html": paths["html"], "per_user": str(out_dir / "per_user.parquet"),
                "lists": str(out_dir / "two_stage_lists.parquet"),
                "headline": {k: head[k] for k in ("ndcg@10", f"recall@{n}", "recall@100")},
                "champion": report["champion"], "mlflow_run_id": mlflow_run_id, "rows": list(ROWS)}

    return run_stage(run_id, "evaluate", work)


def register_stage(run_id: str, candidates: CandidatesResult, ranker: dict[str, Any], index: dict[str, Any],
                   evaluated: dict[str, Any]) -> dict[str, Any]:
    """Assemble the bundle, register it as a new model version, decide the gate and move the alias."""
    from pipeline_tasks.bundle.registry import (
        GateConfig,
        GateFailedError,
        decide,
        metric_tags,
        register_version,
        version_of_run,
    )
    from pipeline_tasks.core.tracking import log_artifacts, mlflow_run
    from pipeline_tasks.online.bundle import BUNDLE_FILE, aliases_of, model_name

    p = run_config(run_id)
    gate = GateConfig.from_params(p.get("gate"))
    settings = run_settings(p)

    def work(out_dir: Path) -> dict[str, Any]:
        manifest = json.loads((run_dir(run_id) / "manifest.json").read_text())
        report = json.loads(Path(evaluated["report"]).read_text())
        bundle = out_dir / "bundle"
        if bundle.exists():
            shutil.rmtree(bundle)
        for fit in ("protocol", "serving"):
            shutil.copytree(ranker["fits"][fit], bundle / fit)
        shutil.copytree(index["index_dir"], bundle / "index")
        n = report["pool_size"]
        meta = {"model": model_name(p["namespace"]), "run_id": run_id, "namespace": p["namespace"],
                "feature_service": "ranker_v1",
                "t_val": report["t_val"], "t_test": report["t_test"],
                "as_of": json.loads((Path(ranker["fits"]["serving"]) / "fit.json").read_text()).get("as_of"),
                "data_snapshot_sha256": manifest.get("data", {}).get("snapshot_sha256"),
                "accepted_dir": candidates["accepted_dir"], "code": manifest.get("code"), "config": p,
                "index": {"sha256": index["sha256"], "kind": index["kind"], "n_items": index["n_items"]},
                "metrics": {"protocol": {row: {k: v for k, v in m.items() if k != "ci95"}
                                         for row, m in report["rows"].items()}},
                "fits": {"protocol": "trained up to t_test; its test figures are the reported ones",
                         "serving": "same hyper-parameters, every window up to as_of; what serving uses"}}
        (bundle / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=str))
        decision = decide(report, gate)
        name = model_name(p["namespace"])
        tags = {**_ranker_tags(run_id, "register"), "recsys.t_test": report["t_test"], "recsys.t_val": report["t_val"],
                "recsys.index_sha256": index["sha256"].get("index.faiss", ""),
                **metric_tags(report, ("ndcg@10", "recall@10", f"recall@{n}"))}
        earlier = version_of_run(name, run_id, settings)
        if earlier is not None:  # a retry after the version was created: never register the run twice
            log.info("%s version %d was registered by an earlier try of this task", name, earlier)
            version = earlier
        else:
            with mlflow_run(ranker_experiment(p["namespace"]), run_name=f"register {run_id}", tags=tags,
                            resume_by=("recsys.run_id", "recsys.task")) as run:
                log_artifacts({"bundle": bundle})
                version = register_version(name, f"{run.info.artifact_uri}/bundle", run.info.run_id, tags,
                                           decision, settings)
        result = {"model": name, "version": version, "gate": "passed" if decision.passed else "failed",
                  "alias": decision.alias, "reason": decision.reason, "comparisons": decision.comparisons,
                  "aliases": aliases_of(name, settings), "bundle_dir": str(bundle)}
        (out_dir / "register.json").write_text(json.dumps(result, indent=2, default=str))
        if not decision.passed:
            raise GateFailedError(f"{name} version {version} failed the gate; aliases untouched "
                                  f"({result['aliases']}): {decision.reason}")
        return result

    return run_stage(run_id, "register", work)


BENTO_SERVICE = "serving.service:RecsysService"


def bento_name(model: str) -> str:
    """A Bento name for a registered model (BentoML names: lower-case letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^a-z0-9_.-]", "-", model.lower()).strip("-._") or "recsys"


def bentoml_env(settings: Any) -> dict[str, str]:
    """The environment of the ``bentoml`` CLI: its store under ``$BENTOML_HOME`` (default
    ``$RECSYS_HOME/bentoml``) and this interpreter's scripts (``bentoml``, ``uv``) first on PATH."""
    import os
    import sys

    env = dict(os.environ)
    env.setdefault("BENTOML_HOME", str(settings.home / "bentoml"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return env


def build_bento_stage(run_id: str, registered: dict[str, Any]) -> dict[str, Any]:
    """``bentoml build`` of the registered bundle version: the service, the bundle and its serving snapshot in
    one Bento tagged ``<model>:v<version>``, labelled with the run; the tag goes to the model version in MLflow."""
    import subprocess
    import sys

    from pipeline_tasks.bundle.recommend import write_snapshot
    from pipeline_tasks.online.bundle import BUNDLE_FILE, client, open_bundle

    p = run_config(run_id)
    settings = run_settings(p)

    def work(out_dir: Path) -> dict[str, Any]:
        import serving

        name, version = registered["model"], int(registered["version"])
        tag = f"{bento_name(name)}:v{version}"
        env = bentoml_env(settings)
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        listed = subprocess.run([bentoml, "list", bento_name(name), "-o", "json"], env=env, capture_output=True,
                                text=True, check=False)
        existing = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
        if any(b.get("tag") == tag for b in existing):  # a retry after the build: one Bento per run
            log.info("Bento %s was built by an earlier try of this task", tag)
        else:
            ctx = out_dir / "context"
            if ctx.exists():
                shutil.rmtree(ctx)
            package = Path(serving.__file__).parent
            shutil.copytree(package, ctx / "serving", ignore=shutil.ignore_patterns("__pycache__", "bundle"))
            shutil.copytree(registered["bundle_dir"], ctx / "serving" / "bundle")
            meta_path = ctx / "serving" / "bundle" / BUNDLE_FILE
            meta = json.loads(meta_path.read_text())
            meta.update(version=version, model=name)
            meta_path.write_text(json.dumps(meta, indent=2, default=str))
            bundle = open_bundle(ctx / "serving" / "bundle")
            write_snapshot(bundle, ctx / "serving" / "bundle" / "snapshot", settings=settings)
            (ctx / "bentofile.yaml").write_text(
                f'service: "{BENTO_SERVICE}"\n'
                f"name: {bento_name(name)}\n"
                'description: "recsys two-stage recommendations (see serving/service.py)"\n'
                'include: ["serving/**"]\n'
                'exclude: ["**/__pycache__/**"]\n'
                "python:\n  lock_packages: false\n")
            labels = {"model": name, "model_version": str(version), "run_id": run_id,
                      "namespace": p["namespace"], "code": _code_label(meta.get("code"))}
            cmd = [bentoml, "build", "--version", f"v{version}", "-o", "tag", "."]
            for key, value in labels.items():
                cmd[2:2] = ["--label", f"{key}={re.sub(r'[^A-Za-z0-9_.-]', '-', value)[:63]}"]
            res = subprocess.run(cmd, cwd=ctx, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"bentoml build failed (exit {res.returncode}) in {ctx}: "
                                   f"{(res.stderr or res.stdout)[-2000:]}")
            log.info("built Bento %s (%s)", tag, res.stdout.strip().splitlines()[-1] if res.stdout else "")
        client(settings).set_model_version_tag(name, str(version), "recsys.bento", tag)
        result = {"tag": tag, "model": name, "version": version, "bentoml_home": env["BENTOML_HOME"],
                  "serve": f"BENTOML_HOME={env['BENTOML_HOME']} bentoml serve {tag}"}
        (out_dir / "bento.json").write_text(json.dumps(result, indent=2))
        return result

    return run_stage(run_id, "build_bento", work)


def _code_label(code: Any) -> str:
    """The code version of a bundle (its manifest's ``code``: a commit id, or a dict holding one)."""
    if isinstance(code, dict):
        return str(code.get("commit") or code.get("git_commit") or code.get("version") or "unknown")
    return str(code or "unknown")


def publish_snapshots_stage(run_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The hourly refresh's second step: a fresh serving snapshot for every live alias whose data, features or
    index extensions changed, pointed at so that its running services swap it in."""
    from pipeline_tasks.bundle.publish import publish_snapshots

    source = (params or {}).get("source") or None
    return run_stage(run_id, "publish_snapshots", publish_snapshots, source=source)
