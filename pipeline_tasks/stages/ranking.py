"""Ranking stages: candidate fits, ranking sets, the Optuna study and the LightGBM rankers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from pipeline_tasks.core.runs import run_dir, run_stage, safe_run_id
from pipeline_tasks.data.split import SplitResult
from pipeline_tasks.data.validate import ValidationResult
from pipeline_tasks.features.history import end_of_day, features_at
from pipeline_tasks.retrieval.protocol import RetrievalResult
from pipeline_tasks.stages.common import run_config, run_features, run_settings

log = logging.getLogger(__name__)

MOMENTS = ("t_val", "t_test", "as_of")


class CandidatesResult(TypedDict):
    """The three fits' directories (two-tower, item graph, candidate config), the features each moment reads
    and the chosen fusion."""

    fits: dict[str, str]
    features_dir: str
    split_dir: str
    accepted_dir: str
    candidates: dict[str, Any]
    report: str


def _moments(data: Any, as_of: pd.Timestamp) -> dict[str, pd.Timestamp]:
    return {"t_val": data.t_val, "t_test": data.t_test, "as_of": as_of}


def serving_moment(validated: ValidationResult) -> pd.Timestamp:
    """The moment the serving fit looks from: the run's ``as_of`` (explicit), else its newest accepted event."""
    anchors = json.loads(Path(validated["report"]).read_text())["as_of"]
    return pd.Timestamp(anchors["horizon_anchor"]).tz_convert("UTC")


def read_features(features_dir: str | Path, moment: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The Feast ``ranker_v1`` user and item rows the candidates stage read at a moment (None without a store)."""
    d = Path(features_dir)
    out = []
    for kind in ("users", "items"):
        path = d / f"{moment}_{kind}.parquet"
        out.append(pd.read_parquet(path) if path.exists() else None)
    return out[0], out[1]


def candidates_stage(run_id: str, validated: ValidationResult, split: SplitResult,
                     trained: RetrievalResult) -> CandidatesResult:
    """Item graphs of the three fits, Feast features at each cut, and the pool's fusion chosen on validation."""
    from pipeline_tasks.online.candidates import CandidateConfig, ItemGraph
    from pipeline_tasks.online.feature_store import get_store
    from pipeline_tasks.online.two_stage import Fit, Moment
    from pipeline_tasks.online.two_tower import load_model
    from pipeline_tasks.ranking.fits import (
        build_graphs,
        choose_candidates,
        choose_graph,
        content_vectors,
        load_run_data,
        validation_truth,
    )

    p = run_config(run_id)
    base = CandidateConfig.from_params(p.get("candidates"))

    def work(out_dir: Path) -> CandidatesResult:
        split_dir = Path(split["split_info"]).parent
        data = load_run_data(split_dir, validated["accepted_dir"])
        as_of = serving_moment(validated)
        models = {"validation": load_model(trained["train_model_dir"]), "protocol": load_model(trained["model_dir"]),
                  "serving": load_model(trained.get("serving_model_dir") or trained["model_dir"])}
        features_dir = out_dir / "features"
        features_dir.mkdir(parents=True, exist_ok=True)
        recorded = run_features(run_id, required=False)
        if recorded is not None:
            settings = run_settings(p)
            until = end_of_day(recorded["last_day"])
            store = get_store(settings)
            user_ids = data.everything["user_id"].astype(str).unique()
            item_ids = data.items["item_id"].astype(str).unique()
            for name, at in _moments(data, as_of).items():
                users, items = features_at(at, user_ids=user_ids, item_ids=item_ids, feature_service="ranker_v1",
                                           settings=settings, until=until, store=store)
                users.to_parquet(features_dir / f"{name}_users.parquet", index=False)
                items.to_parquet(features_dir / f"{name}_items.parquet", index=False)
        user_rows, item_rows = read_features(features_dir, "t_val")
        moment = Moment(data.t_val, data.train, data.items, data.users, user_rows, item_rows)
        truth = validation_truth(data)
        probe = Fit(models["validation"], ItemGraph(models["validation"].encoder.item_ids, None, None), base)
        with_graph, graph, graph_table = choose_graph(probe, moment, truth, base, content_vectors(models["validation"]))
        chosen, table = choose_candidates(Fit(models["validation"], graph, with_graph), moment, truth, with_graph)
        graphs = build_graphs(data, models, chosen, known={"validation": graph})
        fits = {}
        for name in ("validation", "protocol", "serving"):
            fits[name] = str(Fit(models[name], graphs[name], chosen).save(
                out_dir / "fits" / name, {"fit": name, "run_id": run_id, "as_of": as_of.isoformat(),
                                          "t_val": data.t_val.isoformat(), "t_test": data.t_test.isoformat()}))
        report = out_dir / "candidates.json"
        report.write_text(json.dumps({"chosen": chosen.to_dict(), "graphs": graph_table, "grid": table}, indent=2))
        return CandidatesResult(fits=fits, features_dir=str(features_dir), split_dir=str(split_dir),
                                accepted_dir=str(validated["accepted_dir"]), candidates=chosen.to_dict(),
                                report=str(report))

    return run_stage(run_id, "candidates", work)


class RankingSetResult(TypedDict):
    """The validation and test ranking sets and their build figures."""

    validation: dict[str, Any]
    test: dict[str, Any]


def ranking_set_stage(run_id: str, candidates: CandidatesResult) -> RankingSetResult:
    """Validation-window queries from the validation fit (the protocol ranker's data) and test-window queries from
    the protocol fit (the serving ranker's data), with graded labels."""
    from pipeline_tasks.online.two_stage import Moment, load_fit
    from pipeline_tasks.ranking.dataset import build_ranking_set, label_grades
    from pipeline_tasks.ranking.fits import load_run_data, test_truth, validation_truth

    def work(out_dir: Path) -> RankingSetResult:
        data = load_run_data(candidates["split_dir"], candidates["accepted_dir"])
        out: dict[str, Any] = {}
        for name, fit_name, at, history, future, truth in (
                ("validation", "validation", data.t_val, data.train, data.validation, validation_truth(data)),
                ("test", "protocol", data.t_test, data.trainval, data.test, test_truth(data))):
            fit = load_fit(candidates["fits"][fit_name])
            user_rows, item_rows = read_features(candidates["features_dir"], "t_val" if name == "validation"
                                                 else "t_test")
            labels = label_grades(history, future)
            moment = Moment(at, history, data.items, data.users, user_rows, item_rows)
            out[name] = build_ranking_set(fit, moment, labels, out_dir / f"{name}.parquet", user_ids=list(truth))
        (out_dir / "ranking_set.json").write_text(json.dumps(out, indent=2))
        return RankingSetResult(validation=out["validation"], test=out["test"])

    return run_stage(run_id, "ranking_set", work)


def _ranker_tags(run_id: str, task: str) -> dict[str, Any]:
    manifest = json.loads((run_dir(run_id) / "manifest.json").read_text())
    return {"recsys.run_id": run_id, "recsys.task": task,
            "recsys.data_snapshot_sha256": manifest.get("data", {}).get("snapshot_sha256"),
            "recsys.git_sha": manifest.get("code", {}).get("git_sha"), "recsys.feature_service": "ranker_v1"}


def ranker_experiment(namespace: str) -> str:
    """The MLflow experiment of a source's ranker studies and fits."""
    return f"recsys_ranker_{namespace}"


def tune_ranker_stage(run_id: str, ranking_set: RankingSetResult) -> dict[str, Any]:
    """Optuna study (TPE, pruning) of the lambdarank ranker on a by-user holdout of the validation queries;
    resumes from ``$RECSYS_HOME/optuna/`` when the task is retried."""
    from pipeline_tasks.core.settings import load_settings
    from pipeline_tasks.core.tracking import log_artifacts, log_flat, log_params_once, mlflow_run
    from pipeline_tasks.ranking.ranker import RankerConfig, load_ranking_set, study_plots, tune_ranker

    p = run_config(run_id)
    config = RankerConfig.from_params(p.get("ranker"))

    def work(out_dir: Path) -> dict[str, Any]:
        storage = load_settings().home / "optuna" / f"{p['namespace']}.db"
        study_name = f"ranker_{safe_run_id(run_id)}"
        with mlflow_run(ranker_experiment(p["namespace"]), run_name=f"tune_ranker {run_id}",
                        tags=_ranker_tags(run_id, "tune_ranker"), resume_by=("recsys.run_id", "recsys.task")) as run:
            # passed straight in, so the study can free the rows once it has binned them
            path = ranking_set["validation"]["path"]
            result = tune_ranker(load_ranking_set(path, config.max_train_rows, config.seed), config, storage,
                                 study_name)
            plots = study_plots(result["study"], out_dir / "plots")
            result["trials"].to_csv(out_dir / "trials.csv", index=False)
            log_params_once({**{f"best.{k}": v for k, v in result["best_params"].items()},
                             **{f"config.{k}": v for k, v in config.to_dict().items()}})
            log_flat("study.", {"best_holdout_ndcg_at_10": result["best_value"], "n_trials": result["n_trials"],
                                "best_iteration": result["best_iteration"]})
            log_artifacts({"study": out_dir})
            summary = {k: result[k] for k in ("best_params", "best_value", "best_iteration", "n_trials",
                                              "train_queries", "holdout_queries", "selection")}
            summary.update(storage=str(storage), study_name=study_name, plots=plots, mlflow_run_id=run.info.run_id)
        (out_dir / "study.json").write_text(json.dumps(summary, indent=2))
        return summary

    return run_stage(run_id, "tune_ranker", work)


def train_ranker_stage(run_id: str, candidates: CandidatesResult, ranking_set: RankingSetResult,
                       tuned: dict[str, Any]) -> dict[str, Any]:
    """The protocol ranker (validation queries) and the serving ranker (test queries), same hyper-parameters and
    rounds; each saved into a copy of its fit."""
    from pipeline_tasks.core.tracking import log_artifacts, log_flat, mlflow_run
    from pipeline_tasks.online.two_stage import RANKER_FILE
    from pipeline_tasks.ranking.ranker import (
        RankerConfig,
        feature_importance,
        load_ranking_set,
        ranker_data,
        train_ranker,
    )

    p = run_config(run_id)
    config = RankerConfig.from_params(p.get("ranker"))
    serving_fit = (p.get("two_tower") or {}).get("serving_fit", True)

    def work(out_dir: Path) -> dict[str, Any]:
        fits, figures = {}, {}
        with mlflow_run(ranker_experiment(p["namespace"]), run_name=f"train_ranker {run_id}",
                        tags=_ranker_tags(run_id, "train_ranker"), resume_by=("recsys.run_id", "recsys.task")) as run:
            for fit_name, set_name in (("protocol", "validation"), ("serving", "test")):
                target = out_dir / fit_name
                if target.exists():
                    shutil.rmtree(target)
                source_fit = candidates["fits"][fit_name if serving_fit else "protocol"]
                shutil.copytree(source_fit, target)
                data = ranker_data(load_ranking_set(ranking_set[set_name]["path"], config.max_train_rows,
                                                    config.seed), config)  # binned; the rows are freed
                booster, info = train_ranker(data, tuned["best_params"], config, rounds=tuned["best_iteration"])
                del data
                booster.save_model(str(target / RANKER_FILE))
                fit_info = json.loads((target / "fit.json").read_text())
                fit_info.update(ranker={"params": tuned["best_params"], "rounds": tuned["best_iteration"],
                                        "trained_on": f"{set_name} window queries", **info})
                (target / "fit.json").write_text(json.dumps(fit_info, indent=2, default=str))
                importance = feature_importance(booster)
                importance.to_csv(out_dir / f"{fit_name}_feature_importance.csv", index=False)
                log_flat(f"{fit_name}.", {"train_seconds": info["seconds"], "rows": info["rows"],
                                          "queries": info["queries"]})
                fits[fit_name], figures[fit_name] = str(target), info
            log_artifacts({"feature_importance": out_dir / "protocol_feature_importance.csv"})
            mlflow_run_id = run.info.run_id
        return {"fits": fits, "figures": figures, "mlflow_run_id": mlflow_run_id}

    return run_stage(run_id, "train_ranker", work)
