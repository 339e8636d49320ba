"""The LightGBM lambdarank ranker: training with query groups, and an Optuna study over its hyper-parameters.

The study (TPE sampler, median pruning through optuna-integration's LightGBM callback) maximises NDCG@10 on a
by-user holdout of the ranking set's queries; its storage is a SQLite file under ``$RECSYS_HOME/optuna/`` named
by the run, so a retried task resumes the study instead of starting over. The final ranker is trained on all
queries with the best parameters for the holdout's best iteration count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import SEED
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.params import known_params
from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS, PRIOR, QUERY_ID, prior_scores
from pipeline_tasks.ranking.dataset import LABEL

log = logging.getLogger(__name__)

# LightGBM's documented lambdarank defaults, the study's first trial (so a tiny budget still gives a sane model).
BASE_PARAMS: dict[str, Any] = {"learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
                               "feature_fraction": 0.9, "bagging_fraction": 0.9, "lambda_l2": 1e-3,
                               "lambdarank_truncation_level": 30, PRIOR: 0.0}
# The study's range of lambdarank's truncation level (LightGBM: pairs are formed with the top this-many items of a
# query). Deeper levels also order the pool's lower half (recall@N) at a cost linear in the level.
TRUNCATION_RANGE = (10, 200)


@dataclass(frozen=True)
class RankerConfig:
    """The ranker's training and tuning settings (DAG param ``ranker``)."""

    n_trials: int = 20
    timeout_s: float = 300.0  # the study stops starting trials after this many seconds
    holdout_share: float = 0.2  # share of the queries' users held out for early stopping and the study
    max_rounds: int = 500
    early_stopping_rounds: int = 30
    num_threads: int = 0  # 0: LightGBM's default (all cores)
    # Rows the study and the ranker train on at most: larger ranking sets are cut to a seeded sample of whole
    # queries (with a positive), so memory stays bounded (~60 float32 features: 5 M rows ~ 1.2 GB per copy).
    max_train_rows: int = 5_000_000
    # Below this many rows a single holdout of a few dozen queries is too noisy to choose hyper-parameters
    # on: each trial is scored by k-fold cross-validation over users instead (k = cv_folds).
    cv_below_rows: int = 200_000
    cv_folds: int = 5
    seed: int = SEED

    def __post_init__(self) -> None:
        if not 0 < self.holdout_share < 1:
            raise InvalidParamsError(f"ranker.holdout_share={self.holdout_share}: use a share in (0, 1)")
        if self.n_trials < 1 or self.max_rounds < 1:
            raise InvalidParamsError("ranker.n_trials and ranker.max_rounds must be >= 1")

    @classmethod
    def from_params(cls, p: Mapping[str, Any] | None) -> RankerConfig:
        return cls(**known_params(cls, p, "ranker"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_ranking_set(path: str | Path, max_rows: int | None = None, seed: int = SEED) -> pd.DataFrame:
    """The training columns of a ranking set (queries with a positive label only), sorted by query so that
    LightGBM's groups are contiguous runs; with ``max_rows``, a seeded sample of whole queries within it."""
    import pyarrow.parquet as pq

    keys = pq.read_table(path, columns=[QUERY_ID, LABEL]).to_pandas()
    per_query = keys.groupby(QUERY_ID)[LABEL].agg(["size", "max"])
    per_query = per_query[per_query["max"] > 0]
    chosen = per_query.index.to_numpy()
    if max_rows is not None and per_query["size"].sum() > max_rows:
        order = np.random.default_rng(seed).permutation(len(per_query))
        sizes = per_query["size"].to_numpy()[order]
        keep = order[np.cumsum(sizes) <= max_rows]
        chosen = per_query.index.to_numpy()[np.sort(keep)]
        log.info("ranking set %s: %d rows in %d queries with a positive; training on a seeded sample of %d queries "
                 "(%d rows, ranker.max_train_rows)", path, int(per_query["size"].sum()), len(per_query), len(chosen),
                 int(per_query["size"].to_numpy()[np.sort(keep)].sum()))
    table = pq.read_table(path, columns=[QUERY_ID, LABEL, *FEATURE_COLUMNS], filters=[(QUERY_ID, "in", list(chosen))])
    df = table.to_pandas()
    del table
    return df.sort_values(QUERY_ID, kind="stable").reset_index(drop=True)


def positive_queries(df: pd.DataFrame) -> pd.DataFrame:
    """Only the queries with at least one positive label (the others carry no ranking signal); the frame itself
    when every query has one (no copy)."""
    keep = df.groupby(QUERY_ID)[LABEL].transform("max") > 0
    return df if keep.all() else df[keep].reset_index(drop=True)


def holdout_mask(df: pd.DataFrame, share: float, seed: int) -> np.ndarray:
    """True for the rows of a seeded ``share`` of whole queries (the holdout)."""
    queries = np.sort(df[QUERY_ID].unique())
    rng = np.random.default_rng(seed)
    n_hold = max(1, int(round(share * len(queries)))) if len(queries) > 1 else 0
    held = rng.choice(queries, size=n_hold, replace=False) if n_hold else np.array([], dtype=queries.dtype)
    return df[QUERY_ID].isin(held).to_numpy()


def split_by_user(df: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): whole queries, a seeded ``share`` of them held out."""
    mask = holdout_mask(df, share, seed)
    return df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)


def fold_ids(df: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Each row's fold in 0..k-1, by whole query (one query per user); seeded."""
    queries = np.sort(df[QUERY_ID].unique())
    fold_of = dict(zip(queries, np.random.default_rng(seed).permutation(len(queries)) % k, strict=True))
    return df[QUERY_ID].map(fold_of).to_numpy()


def user_folds(df: pd.DataFrame, k: int, seed: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """k (train, holdout) splits of whole queries (one query per user), each query held out once; seeded."""
    assigned = fold_ids(df, k, seed)
    return [(df[assigned != f].reset_index(drop=True), df[assigned == f].reset_index(drop=True)) for f in range(k)]


def lgb_params(params: Mapping[str, Any], config: RankerConfig) -> dict[str, Any]:
    """Full LightGBM parameters: lambdarank with NDCG@10, deterministic with the seed."""
    return {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "verbosity": -1,
            "seed": config.seed, "deterministic": True, "force_col_wise": True, "bagging_freq": 1,
            "num_threads": config.num_threads, **params}


@dataclass
class RankerData:
    """A ranking set as a LightGBM dataset binned once with its raw rows freed (so an Optuna study does not bin or
    hold the rows again per trial), plus what the fusion prior (``init_score``) needs per trial."""

    dataset: lgb.Dataset
    fused: np.ndarray
    query: np.ndarray
    rows: int
    queries: int

    def with_prior(self, weight: float) -> lgb.Dataset:
        """The dataset, its ``init_score`` set to the fusion prior of this weight."""
        self.dataset.set_init_score(prior_scores(self.fused, self.query, weight))
        return self.dataset


def dataset_params(config: RankerConfig) -> dict[str, Any]:
    """The binning parameters: fixed for a study so a binned dataset is reused across trials (no pre-filter, so
    trials can vary ``min_data_in_leaf``)."""
    return {"max_bin": 255, "feature_pre_filter": False, "seed": config.seed, "verbosity": -1,
            "num_threads": config.num_threads}


def ranker_data(df: pd.DataFrame, config: RankerConfig, mask: np.ndarray | None = None,
                reference: RankerData | None = None) -> RankerData:
    """Bin ``df`` (or its rows under ``mask``; contiguous query runs) into a constructed LightGBM dataset."""
    rows = df if mask is None else df[mask]
    query = rows[QUERY_ID].to_numpy()
    groups = rows.groupby(QUERY_ID, sort=False).size().to_numpy()
    dataset = lgb.Dataset(rows[FEATURE_COLUMNS].to_numpy(np.float32), label=rows[LABEL].to_numpy(), group=groups,
                          feature_name=FEATURE_COLUMNS, params=dataset_params(config),
                          reference=None if reference is None else reference.dataset, free_raw_data=True).construct()
    return RankerData(dataset, rows["fused_score"].to_numpy(np.float32), query, len(rows), len(groups))


def train_ranker(train: pd.DataFrame | RankerData, params: Mapping[str, Any], config: RankerConfig,
                 holdout: pd.DataFrame | RankerData | None = None, rounds: int | None = None,
                 callbacks: list[Any] | None = None) -> tuple[lgb.Booster, dict[str, Any]]:
    """A lambdarank booster; with ``holdout``, early stopping on its NDCG@10. Returns the booster and its figures."""
    started = time.perf_counter()
    params = dict(params)
    prior = float(params.pop(PRIOR, 0.0))
    dtrain = train if isinstance(train, RankerData) else ranker_data(train, config)
    evals: dict[str, Any] = {}
    valid_sets, cbs = [], list(callbacks or [])
    if holdout is not None and len(holdout if isinstance(holdout, pd.DataFrame) else holdout.query):
        dhold = holdout if isinstance(holdout, RankerData) else ranker_data(holdout, config, reference=dtrain)
        valid_sets = [dhold.with_prior(prior)]
        cbs += [lgb.early_stopping(config.early_stopping_rounds, verbose=False), lgb.record_evaluation(evals)]
    booster = lgb.train({**dataset_params(config), **lgb_params(params, config)}, dtrain.with_prior(prior),
                        num_boost_round=rounds or config.max_rounds,
                        valid_sets=valid_sets, valid_names=["holdout"][:len(valid_sets)], callbacks=cbs)
    curve = evals.get("holdout", {}).get("ndcg@10", [])
    info = {"best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "holdout_ndcg@10": float(max(curve)) if curve else None, "seconds": round(time.perf_counter() - started, 2),
            "rows": dtrain.rows, "queries": dtrain.queries}
    return booster, info


def tune_ranker(df: pd.DataFrame, config: RankerConfig, storage: str | Path, study_name: str
                ) -> dict[str, Any]:
    """Run (or resume) the Optuna study; returns best params, value, iteration and the trials table."""
    import optuna
    from optuna_integration import LightGBMPruningCallback

    df = positive_queries(df)
    n_queries = df[QUERY_ID].nunique()
    held = holdout_mask(df, config.holdout_share, config.seed)
    if held.all() or not held.any():
        raise ValueError(f"the ranking set has too few queries with a positive label ({n_queries} "
                         "queries) to tune a ranker; give the run more data or a longer validation window")
    # Binned once for the whole study (trials differ only in training parameters and the prior's weight).
    if len(df) < config.cv_below_rows:
        fold = fold_ids(df, config.cv_folds, config.seed)
        folds = [(ranker_data(df, config, fold != f), f) for f in range(config.cv_folds)]
        folds = [(train_f, ranker_data(df, config, fold == f, reference=train_f)) for train_f, f in folds]
    else:
        folds = None
    train = ranker_data(df, config, ~held)
    holdout = ranker_data(df, config, held, reference=train)
    del df
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=f"sqlite:///{storage}", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=config.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=20),
                                load_if_exists=True)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if not done:
        study.enqueue_trial(BASE_PARAMS)

    def objective(trial: optuna.Trial) -> float:
        params = {
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.2, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 7, 127, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 10, 200, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
            "lambdarank_truncation_level": trial.suggest_int("lambdarank_truncation_level", *TRUNCATION_RANGE,
                                                             log=True),
            # how strongly the ranker starts from the pool's fusion order (0: not at all; see prior_scores)
            PRIOR: trial.suggest_float(PRIOR, 0.0, 3.0),
        }
        if folds is None:
            _, info = train_ranker(train, params, config, holdout=holdout,
                                   callbacks=[LightGBMPruningCallback(trial, "ndcg@10", valid_name="holdout")])
            trial.set_user_attr("best_iteration", info["best_iteration"])
            return float(info["holdout_ndcg@10"] or 0.0)
        scores, rounds = [], []
        for k, (fold_train, fold_holdout) in enumerate(folds):
            _, info = train_ranker(fold_train, params, config, holdout=fold_holdout)
            scores.append(float(info["holdout_ndcg@10"] or 0.0))
            rounds.append(info["best_iteration"])
            trial.report(float(np.mean(scores)), k)  # the median pruner compares running fold means
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial.set_user_attr("best_iteration", int(np.median(rounds)))
        trial.set_user_attr("fold_ndcg@10", [round(v, 4) for v in scores])
        return float(np.mean(scores))

    remaining = max(0, config.n_trials - len(done))
    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=config.timeout_s, gc_after_trial=True)
    else:
        log.info("study %s already has %d finished trials: resumed, nothing left to run", study_name, len(done))
    best = study.best_trial
    # Finished trials only: a trial a killed try left RUNNING in the storage never produced a value.
    n_finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                     for t in study.trials)
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    log.info("ranker study %s: best %s NDCG@10 %.4f in trial %d of %d: %s", study_name,
             f"{config.cv_folds}-fold cross-validated" if folds else "holdout", best.value, best.number,
             n_finished, best.params)
    return {"best_params": dict(best.params), "best_value": float(best.value),
            "best_iteration": int(best.user_attrs.get("best_iteration", config.max_rounds)),
            "n_trials": n_finished, "study": study, "trials": trials,
            "selection": f"{config.cv_folds}-fold cross-validation by user" if folds else "holdout by user",
            "train_queries": train.queries, "holdout_queries": holdout.queries}


def study_plots(study: Any, out_dir: str | Path) -> dict[str, str]:
    """The study's optimisation history and parameter importances as standalone HTML files."""
    import optuna.visualization as vis

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fn in (("optimization_history", vis.plot_optimization_history),
                     ("param_importances", vis.plot_param_importances)):
        try:
            fig = fn(study)
        except (ValueError, RuntimeError) as exc:  # importances need >= 2 completed trials
            log.warning("study plot %s skipped: %s", name, exc)
            continue
        path = out / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs=True)
        paths[name] = str(path)
    return paths


def feature_importance(booster: lgb.Booster) -> pd.DataFrame:
    """Gain and split importance per feature, by gain."""
    return pd.DataFrame({"feature": booster.feature_name(),
                         "gain": booster.feature_importance("gain"),
                         "split": booster.feature_importance("split")}).sort_values("gain", ascending=False)
