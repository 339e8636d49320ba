"""Ranking labels, query groups, the lambdarank ranker and its Optuna study (small synthetic ranking sets)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS, QUERY_ID
from pipeline_tasks.ranking.dataset import GRADES, LABEL, label_grades
from pipeline_tasks.ranking.ranker import (
    RankerConfig,
    load_ranking_set,
    positive_queries,
    split_by_user,
    train_ranker,
    tune_ranker,
    user_folds,
)


def test_grades_best_event_new_items_only():
    history = pd.DataFrame({"user_id": ["u1"], "item_id": ["seen"]})
    future = pd.DataFrame({"user_id": ["u1", "u1", "u1", "u1", "u2"],
                           "item_id": ["a", "a", "b", "seen", "a"],
                           "event_type": ["view", "purchase", "click", "purchase", "favorite"]})
    got = label_grades(history, future).set_index(["user_id", "item_id"])[LABEL].to_dict()
    assert got == {("u1", "a"): GRADES["purchase"], ("u1", "b"): GRADES["click"], ("u2", "a"): GRADES["favorite"]}
    assert GRADES["purchase"] > GRADES["add_to_cart"] > GRADES["click"] == GRADES["favorite"] > GRADES["view"] > 0


def _ranking_set(n_queries: int = 120, per_query: int = 30, seed: int = 0) -> pd.DataFrame:
    """Queries whose label depends on two features (so a ranker can learn it), rows shuffled across queries."""
    rng = np.random.default_rng(seed)
    n = n_queries * per_query
    x = rng.normal(size=(n, len(FEATURE_COLUMNS))).astype(np.float32)
    signal = x[:, 0] + 0.5 * x[:, 3]
    label = np.digitize(signal, [1.0, 1.8, 2.5]).astype(np.int8)
    df = pd.DataFrame(x, columns=FEATURE_COLUMNS)
    df.insert(0, QUERY_ID, np.repeat([f"q{i:03d}" for i in range(n_queries)], per_query))
    df.insert(1, LABEL, label)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_user_folds_hold_each_query_out_once():
    df = _ranking_set(n_queries=23, per_query=4)
    folds = user_folds(df, 5, seed=0)
    held = [set(h[QUERY_ID]) for _, h in folds]
    assert sum(len(h) for h in held) == 23 and set().union(*held) == set(df[QUERY_ID])
    for train, hold in folds:
        assert not set(train[QUERY_ID]) & set(hold[QUERY_ID])


def test_groups_are_contiguous_and_holdout_is_by_query(tmp_path):
    path = tmp_path / "set.parquet"
    _ranking_set().to_parquet(path)
    df = load_ranking_set(path)
    starts = df[QUERY_ID].ne(df[QUERY_ID].shift()).cumsum()
    assert starts.max() == df[QUERY_ID].nunique()  # each query one contiguous run
    train, hold = split_by_user(df, 0.25, seed=1)
    assert not set(train[QUERY_ID]) & set(hold[QUERY_ID])
    assert hold[QUERY_ID].nunique() == 30
    assert split_by_user(df, 0.25, seed=1)[1][QUERY_ID].tolist() == hold[QUERY_ID].tolist()  # seeded
    no_pos = df.assign(**{LABEL: np.where(df[QUERY_ID] == "q000", 0, df[LABEL])})
    assert "q000" not in set(positive_queries(no_pos)[QUERY_ID])


def test_ranker_learns_and_is_deterministic(tmp_path):
    path = tmp_path / "set.parquet"
    _ranking_set().to_parquet(path)
    df = positive_queries(load_ranking_set(path))
    train, hold = split_by_user(df, 0.2, seed=0)
    cfg = RankerConfig(max_rounds=60, early_stopping_rounds=10, num_threads=1)
    params = {"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 10}
    a, info = train_ranker(train, params, cfg, holdout=hold)
    b, _ = train_ranker(train, params, cfg, holdout=hold)
    x = hold[FEATURE_COLUMNS].to_numpy(np.float32)
    assert np.array_equal(a.predict(x), b.predict(x))  # same seed, same model
    assert info["holdout_ndcg@10"] > 0.8  # the signal is learnable
    scores = a.predict(x)
    assert np.corrcoef(scores, hold[FEATURE_COLUMNS[0]])[0, 1] > 0.5


@pytest.mark.parametrize("cv_below_rows", [0, 1_000_000], ids=["holdout", "cross-validation"])
def test_study_resumes_from_its_storage(tmp_path, cv_below_rows):
    import optuna

    path = tmp_path / "set.parquet"
    _ranking_set(n_queries=60).to_parquet(path)
    df = load_ranking_set(path)
    kw = {"max_rounds": 30, "early_stopping_rounds": 5, "num_threads": 1, "cv_below_rows": cv_below_rows}
    storage = tmp_path / "optuna" / "ns.db"

    def finished(study: optuna.Study) -> list[tuple]:
        return [(t.number, t.params, t.value, t.datetime_start, t.datetime_complete) for t in study.trials
                if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]

    first = tune_ranker(df, RankerConfig(n_trials=3, **kw), storage, "ranker_run1")
    assert first["n_trials"] == 3 and first["best_value"] > 0.5
    assert first["selection"] == ("holdout by user" if cv_below_rows == 0 else "5-fold cross-validation by user")
    assert first["trials"]["params_learning_rate"].iloc[0] == pytest.approx(0.05)  # the documented defaults first
    before = finished(first["study"])
    assert [t[0] for t in before] == [0, 1, 2]
    # The task is killed inside its next trial: the storage keeps a trial that never finished.
    optuna.load_study(study_name="ranker_run1", storage=f"sqlite:///{storage}").ask()

    # The retry (n_trials is the study's target total) keeps the finished trials as they were (same params,
    # values and start times: not re-run) and runs only the missing one.
    again = tune_ranker(df, RankerConfig(n_trials=4, **kw), storage, "ranker_run1")
    after = finished(again["study"])
    assert after[:3] == before
    assert len(after) == 4 and after[3][3] >= before[-1][4]  # one new trial, started after the first try's
    assert again["n_trials"] == 4  # finished trials; the killed one is not counted
    assert again["best_value"] == max(t[2] for t in after)
    # A retry of a study that already has its trials runs none.
    done = tune_ranker(df, RankerConfig(n_trials=4, **kw), storage, "ranker_run1")
    assert finished(done["study"]) == after and done["n_trials"] == 4
    # Another run's study in the same storage starts from scratch.
    other = tune_ranker(df, RankerConfig(n_trials=1, **kw), storage, "ranker_run2")
    assert [t[0] for t in finished(other["study"])] == [0] and other["n_trials"] == 1
    with pytest.raises(InvalidParamsError, match="unknown ranker params"):
        RankerConfig.from_params({"trials": 3})


def test_load_caps_rows_by_whole_queries(tmp_path):
    path = tmp_path / "set.parquet"
    full = _ranking_set(n_queries=50, per_query=20)
    full.loc[full[QUERY_ID] == "q001", LABEL] = 0  # a query without a positive is never trained on
    full.to_parquet(path)
    everything = load_ranking_set(path)
    with_positive = full.groupby(QUERY_ID)[LABEL].max().gt(0)
    assert set(everything[QUERY_ID]) == set(with_positive[with_positive].index)
    assert "q001" not in set(everything[QUERY_ID])
    capped = load_ranking_set(path, max_rows=300, seed=3)
    assert len(capped) <= 300 and capped.groupby(QUERY_ID).size().eq(20).all()  # whole queries only
    assert capped[QUERY_ID].tolist() == load_ranking_set(path, max_rows=300, seed=3)[QUERY_ID].tolist()
    assert list(capped.columns[:2]) == [QUERY_ID, LABEL]
