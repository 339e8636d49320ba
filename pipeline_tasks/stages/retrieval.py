"""Retrieval stages: train the two-tower model (and MF), build and publish the FAISS index, the item refresh."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline_tasks.core.runs import run_dir, run_stage, start_run
from pipeline_tasks.data.split import SplitResult
from pipeline_tasks.data.validate import ValidationResult
from pipeline_tasks.features.history import TrainingSetResult, end_of_day, features_at
from pipeline_tasks.retrieval.protocol import RetrievalResult
from pipeline_tasks.retrieval.refresh import catalog_recipe
from pipeline_tasks.stages.common import run_config, run_features, run_settings

if TYPE_CHECKING:  # snapshots imports pyspark: only the Spark task loads it
    from pipeline_tasks.features.snapshots import FeaturesResult



def _features_at_for(run_id: str, validated: ValidationResult) -> Callable[[Any], tuple[Any, Any]] | None:
    """The evaluation windows' features: every user's and item's values at a moment, read like training sets
    (Feast point-in-time, capped at the run's last recorded day); ``None`` if the run recorded no features."""
    import pandas as pd

    from pipeline_tasks.online.feature_store import get_store

    recorded = run_features(run_id, required=False)
    if recorded is None:
        return None
    settings = run_settings(run_config(run_id))
    until = end_of_day(recorded["last_day"])
    accepted = Path(validated["accepted_dir"])
    user_ids = pd.read_parquet(accepted / "interactions.parquet", columns=["user_id"])["user_id"].unique()
    item_ids = pd.read_parquet(accepted / "items.parquet", columns=["item_id"])["item_id"].unique()
    store = get_store(settings)

    def at(moment: Any) -> tuple[Any, Any]:
        return features_at(moment, user_ids=user_ids, item_ids=item_ids, settings=settings, until=until, store=store)

    return at


def train_two_tower_stage(run_id: str, validated: ValidationResult, split: SplitResult,
                          training_set: TrainingSetResult | None) -> RetrievalResult:
    """Two-tower + MF retrieval models by the offline protocol, logged to MLflow with curves and artifacts."""
    from pipeline_tasks.core.tracking import log_artifacts, log_flat, mlflow_run, retrieval_experiment
    from pipeline_tasks.retrieval.protocol import RetrievalConfig, train_retrieval

    p = run_config(run_id)
    config = RetrievalConfig.from_params(p.get("two_tower"))
    manifest = json.loads((run_dir(run_id) / "manifest.json").read_text())
    experiment = retrieval_experiment(p["namespace"])

    def work(out_dir: Path) -> RetrievalResult:
        ts_path = training_set["training_set"] if training_set else None
        split_dir = Path(split["split_info"]).parent
        tags = {"recsys.run_id": run_id, "recsys.data_snapshot_sha256": manifest.get("data", {}).get("snapshot_sha256"),
                "recsys.git_sha": manifest.get("code", {}).get("git_sha"), "recsys.source": p["source"],
                # the service the training examples' features came from (the towers read a subset of it)
                "recsys.feature_service": (training_set or {}).get("feature_service", "none"),
                "recsys.task": "train_two_tower"}
        with mlflow_run(experiment, run_name=f"two_tower {run_id}", tags=tags,
                        resume_by=("recsys.run_id", "recsys.task")) as run:
            import mlflow

            result = train_retrieval(out_dir, split_dir, validated["accepted_dir"], config, training_set=ts_path,
                                     snapshot=_features_at_for(run_id, validated))
            metrics = json.loads(Path(result["metrics"]).read_text())
            chosen = metrics["models"]["two_tower"]["chosen"]
            mlflow.log_params({**{f"two_tower.{k}": v for k, v in chosen.items()},
                               **{f"mf.{k}": v for k, v in metrics["models"]["mf"]["chosen"].items()},
                               "content_method": metrics["content_method"], "t_val": split["t_val"],
                               "t_test": split["t_test"], "grid_size": len(config.grid)})
            for name in ("two_tower", "mf"):
                for trial_no, trial in enumerate(metrics["models"][name]["trials"]):
                    for row in trial["history"]:  # learning curves, one series per grid trial
                        log_flat(f"{name}.trial{trial_no}.", {k: v for k, v in row.items() if k != "epoch"},
                                 step=int(row["epoch"]))
            for name, model in metrics["models"].items():
                log_flat(f"test.{name}.", model["test"])
                log_flat(f"test.{name}.ci_low.", {k: v[0] for k, v in model["test"]["ci95"].items()})
                log_flat(f"test.{name}.ci_high.", {k: v[1] for k, v in model["test"]["ci95"].items()})
            log_artifacts({"model": result["model_dir"], "mf_model": result["mf_model_dir"],
                           "metrics": result["metrics"]})
            return RetrievalResult(**result, mlflow_run_id=run.info.run_id, mlflow_experiment=experiment)

    return run_stage(run_id, "train_two_tower", work)


class IndexResult(TypedDict):
    """The published index version and its figures (``build_index/index.json`` has them all)."""

    kind: str
    n_items: int
    k: int
    recall_at_k: float | None
    target_reached: bool | None
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    memory_bytes: int | None
    build_seconds: float | None
    index_dir: str
    sha256: dict[str, str]
    meta: str


def build_index_stage(run_id: str, trained: RetrievalResult, features: FeaturesResult | None) -> IndexResult:
    """FAISS index of every catalog item embedded by the serving fit (with the newest feature snapshot), tuned to
    the recall target on held-out users, staged in the task's directory: ``register`` puts it into the bundle, and
    only the registry's aliases decide what is served."""
    import numpy as np

    from pipeline_tasks.core.tracking import log_artifacts, log_flat, mlflow_run
    from pipeline_tasks.online.two_tower import load_model
    from pipeline_tasks.retrieval.index_build import IndexConfig, build_index

    p = run_config(run_id)
    index_config = IndexConfig(**(p.get("index") or {}))

    def work(out_dir: Path) -> IndexResult:
        model_dir = trained.get("serving_model_dir") or trained["model_dir"]
        model = load_model(model_dir)
        # The catalog's features at the end of the run's last recorded day, by the one point-in-time read.
        recorded = run_features(run_id, required=False)
        item_rows = None
        if recorded is not None:
            until = end_of_day(recorded["last_day"])
            _, item_rows = features_at(until, item_ids=model.encoder.item_ids, settings=run_settings(p), until=until)
        vectors = model.item_embeddings(item_rows)
        queries = np.load(trained.get("serving_query_embeddings") or trained["query_embeddings"])
        target = out_dir / "index"
        provenance = {"model_dir": model_dir, "mlflow_run_id": trained.get("mlflow_run_id"), "run_id": run_id,
                      "content_method": model.encoder.content_method,
                      **catalog_recipe(p["source"], p["synthetic"])}
        meta = build_index(vectors, model.encoder.item_ids, queries, target, index_config, parent=provenance)
        (out_dir / "index.json").write_text(json.dumps(meta, indent=2, default=str))
        if trained.get("mlflow_run_id"):
            with mlflow_run(trained["mlflow_experiment"], run_id=trained["mlflow_run_id"]):
                log_flat("index.", {k: meta[k] for k in ("recall_at_k", "build_seconds", "memory_bytes",
                                                         "latency_ms_p50", "latency_ms_p99", "n_items")
                                    if meta.get(k) is not None})
                log_artifacts({"index": out_dir / "index.json"})
        summary = {k: meta.get(k) for k in ("kind", "n_items", "k", "recall_at_k", "target_reached",
                                            "latency_ms_p50", "latency_ms_p99", "memory_bytes", "build_seconds")}
        return IndexResult(**summary, index_dir=str(target), sha256=meta["sha256"], meta=str(out_dir / "index.json"))

    return run_stage(run_id, "build_index", work)


def refresh_items_stage(run_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The hourly item refresh: embed new catalog items and extend the serving index of every live alias."""
    from pipeline_tasks.retrieval.refresh import refresh_items

    start_run(run_id, config=dict(params or {}))
    source = (params or {}).get("source") or None
    return run_stage(run_id, "refresh_items", refresh_items, source=source)
