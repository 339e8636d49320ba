"""The retrieval stage's protocol (DATA_CONTRACT.md): choose hyper-parameters on the validation window,
refit on train + validation, score on the test window; two-tower, the team's MF and popularity side by side.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, SEED, TIMESTAMP, USER_ID
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.two_tower import TwoTowerConfig, TwoTowerModel
from pipeline_tasks.retrieval.two_tower_training import Window, fit, grid_configs, recommend

log = logging.getLogger(__name__)

# (user_rows, item_rows) of the feature snapshot valid at a moment; None where there is no store.
SnapshotFn = Callable[[pd.Timestamp], tuple[pd.DataFrame | None, pd.DataFrame | None]]

EVAL_KS = (10, 100, 500)
# Chosen on ml-100k's validation window (README): the log-Q variant matters most, then history length.
DEFAULT_GRID: list[dict[str, Any]] = [{"logq": "sample"}, {"logq": "sample", "history_len": 50}, {"logq": "batch"}]
DEFAULT_MF_GRID: list[dict[str, Any]] = [{"logq": "sample", "lr": 5e-3}, {"logq": "batch", "lr": 5e-3}]


@dataclass(frozen=True)
class RetrievalConfig:
    """What the ``train_two_tower`` stage trains and how it scores."""

    base: dict[str, Any] = field(default_factory=dict)  # TwoTowerConfig overrides for every config
    grid: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_GRID))
    mf_grid: list[dict[str, Any]] = field(default_factory=lambda: list(DEFAULT_MF_GRID))
    content_method: str = "auto"  # auto | minilm | hashed
    n_boot: int = 1000
    seed: int = SEED
    # Wall-clock seconds for each model's grid on the validation window, and again for its refit:
    # training time grows with the data, so on large data fewer configs (the first ones, the best-known
    # defaults) and epochs fit, and the stage stays within about 4x this (two models, grid + refit).
    # Small data (ml-100k: ~6 s an epoch) trains its first configs in full. None: no limit.
    grid_budget_s: float | None = 120.0
    # Also fit the chosen config on every window (train + validation + test) for serving: the ranker's
    # candidates then come from a model that saw the newest events. Off: serving uses the protocol's refit.
    serving_fit: bool = True

    @classmethod
    def from_params(cls, p: Mapping[str, Any] | None) -> RetrievalConfig:
        p = dict(p or {})
        unknown = set(p) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidParamsError(f"unknown two_tower params {sorted(unknown)}; "
                                     f"known: {sorted(cls.__dataclass_fields__)}")
        unknown_base = set(p.get("base") or {}) - set(TwoTowerConfig.__dataclass_fields__)
        if unknown_base:
            raise InvalidParamsError(f"unknown two_tower.base hyper-parameters {sorted(unknown_base)}; "
                                     f"known: {sorted(TwoTowerConfig.__dataclass_fields__)}")
        return cls(**p)


def load_split(split_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The split's three windows and its ``split.json``."""
    d = Path(split_dir)
    frames = [pd.read_parquet(d / f"{w}.parquet", columns=[USER_ID, ITEM_ID, TIMESTAMP, "event_type"])
              for w in ("train", "validation", "test")]
    return frames[0], frames[1], frames[2], json.loads((d / "split.json").read_text())


def popularity_recs(history: pd.DataFrame, user_ids: Sequence[str], item_ids: Sequence[str],
                    k: int) -> dict[str, list[str]]:
    """Most-interacted items of ``history`` (distinct users), minus each user's seen items."""
    from pipeline_tasks.evaluation.metrics import top_k_unseen

    index = {v: i for i, v in enumerate(item_ids)}
    pairs = history.drop_duplicates([USER_ID, ITEM_ID])
    counts = np.bincount(pairs[ITEM_ID].astype(str).map(index).dropna().astype(int), minlength=len(item_ids))
    scores = counts.astype(np.float64)[None, :]
    seen = pairs.groupby(pairs[USER_ID].astype(str))[ITEM_ID].apply(
        lambda s: np.array([index[i] for i in s.astype(str) if i in index], dtype=np.int64))
    ids = np.asarray(item_ids, dtype=object)
    out = {}
    for u in user_ids:
        row = top_k_unseen(scores, [seen.get(str(u), np.zeros(0, np.int64))], k)[0]
        out[str(u)] = ids[row[row >= 0]].tolist()
    return out


def _examples(train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame, training_set: str | Path | None
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Training examples for the train window, for train + validation and for all three windows: the Feast
    point-in-time training set when there is one (features as of each interaction), else the bare interactions."""
    if training_set is None:
        return (train, pd.concat([train, validation], ignore_index=True),
                pd.concat([train, validation, test], ignore_index=True))
    ts = pd.read_parquet(training_set).rename(columns={"event_timestamp": TIMESTAMP})
    trainval = ts[ts["window"].isin(["train", "validation"])].reset_index(drop=True)
    # A training set written before it covered the test window: those rows come without features.
    everything = ts if (ts["window"] == "test").any() else pd.concat([ts, test], ignore_index=True)
    return ts[ts["window"] == "train"].reset_index(drop=True), trainval, everything


class RetrievalResult(TypedDict, total=False):
    """The trained models, their metrics and the held-out users' embeddings (the index build's queries)."""

    model_dir: str  # the protocol's refit (train + validation): scored on test
    train_model_dir: str  # the chosen grid trial (train only): the ranker's validation-window candidates
    serving_model_dir: str  # the chosen config on every window (= model_dir when serving_fit is off)
    mf_model_dir: str
    metrics: str
    query_embeddings: str
    serving_query_embeddings: str  # the serving fit's embeddings of the same users (the index is of that fit)
    content_method: str
    test: dict[str, dict[str, float]]
    mlflow_run_id: str  # added by the train_two_tower stage
    mlflow_experiment: str


def train_retrieval(out_dir: str | Path, split_dir: str | Path, accepted_dir: str | Path,
                    config: RetrievalConfig = RetrievalConfig(),  # noqa: B008 (frozen)
                    training_set: str | Path | None = None, snapshot: SnapshotFn | None = None) -> RetrievalResult:
    """Train, select, refit and score the two-tower and MF models; write the refit two-tower to
    ``out_dir/model``, metrics to ``out_dir/metrics.json`` and held-out user embeddings for the index."""
    from pipeline_tasks.evaluation.metrics import evaluate, targets
    from pipeline_tasks.retrieval.content import embed_texts, item_texts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, validation, test, split_info = load_split(split_dir)
    items = pd.read_parquet(Path(accepted_dir) / "items.parquet")
    users_path = Path(accepted_dir) / "users.parquet"
    users = pd.read_parquet(users_path) if users_path.exists() else None
    item_ids = items[ITEM_ID].astype(str).tolist()

    t0 = time.perf_counter()
    content, method = embed_texts(item_texts(items), method=config.content_method)
    content_seconds = time.perf_counter() - t0
    log.info("content embeddings: %d items with %s in %.1f s", len(items), method, content_seconds)

    t_val, t_test = pd.Timestamp(split_info["t_val"]), pd.Timestamp(split_info["t_test"])
    no_rows: tuple[None, None] = (None, None)
    val_truth, _ = targets(train, validation)
    trainval = pd.concat([train, validation], ignore_index=True)
    test_truth, _ = targets(trainval, test)
    val_window = Window(train, val_truth, *(snapshot(t_val) if snapshot else no_rows))
    test_window = Window(trainval, test_truth, *(snapshot(t_test) if snapshot else no_rows))
    train_ex, trainval_ex, all_ex = _examples(train, validation, test, training_set)
    base = TwoTowerConfig.from_dict({**config.base, "seed": config.seed})
    log.info("retrieval protocol: %d validation users, %d test users, %d items", len(val_truth), len(test_truth),
             len(items))

    results: dict[str, Any] = {"content_method": method, "content_seconds": round(content_seconds, 2),
                               "validation_users": len(val_truth), "test_users": len(test_truth),
                               "items": len(items), "models": {}}
    models: dict[str, TwoTowerModel] = {}
    chosen_trial: dict[str, TwoTowerModel] = {}
    for name, grid in (("two_tower", config.grid), ("mf", config.mf_grid)):
        configs = grid_configs(TwoTowerConfig.from_dict({**base.to_dict(), "model": name}), grid)
        trials = []
        best_model: TwoTowerModel | None = None
        deadline = time.monotonic() + config.grid_budget_s if config.grid_budget_s is not None else None
        skipped = []
        for cfg in configs:
            if trials and deadline is not None and time.monotonic() >= deadline:
                skipped.append(cfg.to_dict())
                continue
            m = fit(train_ex, items, users, content, method, cfg, validation=val_window, deadline=deadline)
            if best_model is None or m.info["best_val_recall"] > best_model.info["best_val_recall"]:
                best_model = m  # the chosen trial (train only) gives the ranker its validation candidates
            trials.append({"config": cfg.to_dict(), "best_epoch": m.info["best_epoch"],
                           "val_recall": m.info["best_val_recall"], "history": m.info["history"],
                           "stopped_by_budget": m.info["stopped_by_budget"]})
        if skipped:
            log.warning("%s: the grid's time budget (%.0f s) was spent after %d of %d configs; not tried: %s",
                        name, config.grid_budget_s, len(trials), len(configs), skipped)
        best = max(range(len(trials)), key=lambda i: trials[i]["val_recall"])
        chosen = configs[best]
        t1 = time.perf_counter()
        refit_deadline = time.monotonic() + config.grid_budget_s if config.grid_budget_s is not None else None
        refit = fit(trainval_ex, items, users, content, method, chosen, epochs=trials[best]["best_epoch"],
                    deadline=refit_deadline)
        refit_seconds = time.perf_counter() - t1
        recs = recommend(refit, test_window, users, max(EVAL_KS))
        metrics = evaluate(recs, test_truth, len(items), ks=EVAL_KS, n_boot=config.n_boot, seed=config.seed)
        results["models"][name] = {"chosen": chosen.to_dict(), "trials": trials, "skipped": skipped, "test": metrics,
                                   "refit_seconds": round(refit_seconds, 2), "refit_epochs": refit.info["epochs"],
                                   "refit_stopped_by_budget": refit.info["stopped_by_budget"],
                                   "seconds_per_epoch": refit.info["seconds_per_epoch"]}
        models[name] = refit
        if best_model is not None:
            chosen_trial[name] = best_model
        log.info("%s on test: recall@100 %.4f, recall@500 %.4f (chosen %s)", name, metrics["recall@100"],
                 metrics["recall@500"], grid[best] if grid else {})
    pop = popularity_recs(trainval, list(test_truth), item_ids, max(EVAL_KS))
    results["models"]["popularity"] = {"test": evaluate(pop, test_truth, len(items), ks=EVAL_KS,
                                                        n_boot=config.n_boot, seed=config.seed)}

    model = models["two_tower"]
    model.info.update({"content_method": method, "split": {"t_val": split_info["t_val"],
                                                           "t_test": split_info["t_test"]}})
    model.save(out / "model")
    models["mf"].save(out / "mf_model")
    trial = chosen_trial["two_tower"]
    trial.info.update({"content_method": method, "trained_until": split_info["t_val"]})
    trial.save(out / "train_model")
    serving_dir = out / "model"
    if config.serving_fit:
        chosen_cfg = TwoTowerConfig.from_dict(results["models"]["two_tower"]["chosen"])
        t2 = time.perf_counter()
        serving = fit(all_ex, items, users, content, method, chosen_cfg,
                      epochs=results["models"]["two_tower"]["refit_epochs"],
                      deadline=time.monotonic() + config.grid_budget_s if config.grid_budget_s is not None else None)
        serving.info.update({"content_method": method, "trained_until": "as_of"})
        serving_dir = out / "serving_model"
        serving.save(serving_dir)
        results["models"]["two_tower"]["serving_fit_seconds"] = round(time.perf_counter() - t2, 2)
    # Held-out users' query embeddings (test users at t_test): the index builder tunes against them.
    queries = model.user_embeddings(list(test_truth), trainval, test_window.user_rows, users)
    np.save(out / "query_embeddings.npy", queries.astype(np.float32))
    if config.serving_fit:  # the index holds the serving fit's items: tune it with that fit's queries
        everything = pd.concat([trainval, test], ignore_index=True)
        serving_queries = serving.user_embeddings(list(test_truth), everything, test_window.user_rows, users)
        np.save(out / "serving_query_embeddings.npy", serving_queries.astype(np.float32))
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
    summary = {m: {k: r["test"][k] for k in ("recall@100", "recall@500", "ndcg@10")}
               for m, r in results["models"].items()}
    return RetrievalResult(model_dir=str(out / "model"), train_model_dir=str(out / "train_model"),
                           serving_model_dir=str(serving_dir), mf_model_dir=str(out / "mf_model"),
                           metrics=str(out / "metrics.json"), query_embeddings=str(out / "query_embeddings.npy"),
                           serving_query_embeddings=str(out / ("serving_query_embeddings.npy" if config.serving_fit
                                                               else "query_embeddings.npy")),
                           content_method=method, test=summary)
