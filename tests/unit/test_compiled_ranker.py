"""The ranker as compiled trees: lleaves gives the Booster's scores, caches its machine code, and a model that
differs is refused (the service then keeps the Booster)."""

from __future__ import annotations

import numpy as np
import pytest

lgb = pytest.importorskip("lightgbm")
pytest.importorskip("lleaves")

from pipeline_tasks.online.compiled_ranker import CompiledRanker, compile_ranker, verified  # noqa: E402


def _booster(seed: int, n_queries: int = 60, per_query: int = 30, n_features: int = 12) -> lgb.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_queries * per_query, n_features))
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values take the trees' default branches
    y = np.clip((x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=len(x))).round(), 0, 4)
    y = np.nan_to_num(y).astype(int)
    data = lgb.Dataset(x, y, group=[per_query] * n_queries)
    params = {"objective": "lambdarank", "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, "seed": seed,
              "deterministic": True, "num_threads": 1}
    return lgb.train(params, data, num_boost_round=25)


def test_compiled_trees_give_the_boosters_scores_and_are_cached(tmp_path):
    booster = _booster(0)
    compiled = compile_ranker(booster, tmp_path)
    assert isinstance(compiled, CompiledRanker)
    rows = np.random.default_rng(1).normal(size=(500, 12)).astype(np.float32)
    rows[::7, 3] = np.nan
    np.testing.assert_allclose(compiled.predict(rows), booster.predict(rows, num_threads=1), rtol=0, atol=1e-9)
    assert verified(compiled, booster, rows)
    cached = list(tmp_path.glob("ranker-*.o"))
    assert len(cached) == 1 and cached[0].stat().st_size > 0
    again = compile_ranker(booster, tmp_path)  # loads the cached machine code
    np.testing.assert_array_equal(again.predict(rows), compiled.predict(rows))
    assert again.num_trees() == booster.num_trees()  # the rest of the Booster's interface


def test_a_compiled_model_that_differs_is_refused(tmp_path):
    rows = np.random.default_rng(2).normal(size=(200, 12)).astype(np.float32)
    other = compile_ranker(_booster(1), tmp_path)
    assert not verified(other, _booster(0), rows)
    assert not verified(other, _booster(1), rows[:0])  # nothing to check against: refused
