"""The gate's champion branch (pure logic): paired differences with their bootstrap CI, the tolerance, and a
champion that cannot be compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_two_stage as tiny

from pipeline_tasks.bundle.registry import POOL_RECALL, GateConfig, decide, gate_column
from pipeline_tasks.evaluation.two_stage import paired_differences

ROW, KEY = "two-stage", "ndcg@10"
USERS = pd.Index(["u1", "u2", "u3", "u4", "u5"], name="user_id")


def _per_user(ours: list[float], champion: list[float]) -> pd.DataFrame:
    """This run's and the champion's per-user figures side by side, as ``evaluate_stage`` joins them."""
    return pd.DataFrame({f"{ROW}|{KEY}": ours, f"champion:{ROW}|{KEY}": champion}, index=USERS[:len(ours)])


def _diff(per_user: pd.DataFrame, n_boot: int = 1000) -> dict[str, float]:
    return paired_differences(per_user, ROW, f"champion:{ROW}", [KEY], n_boot=n_boot)[KEY]


def test_identical_users_give_a_zero_difference_and_a_zero_ci():
    values = [0.0, 0.3, 1.0, 0.55, 0.2]
    assert _diff(_per_user(values, values)) == {"difference": 0.0, "ci95": [0.0, 0.0]}


def test_the_ci_is_paired_by_user():
    # Users differ a lot (0 .. 0.9) but the challenger is better by exactly 0.05 for every one of them: paired,
    # every resample's mean difference is 0.05. An unpaired comparison of the two means would give a CI
    # around 0.05 several tenths wide.
    champion = [0.0, 0.9, 0.1, 0.8, 0.4]
    d = _diff(_per_user([v + 0.05 for v in champion], champion))
    assert d["difference"] == pytest.approx(0.05)
    assert d["ci95"] == pytest.approx([0.05, 0.05])


def test_the_difference_and_ci_by_hand():
    # Two users, differences 1 and 0. A resample of two users has mean 0 (p = 1/4), 0.5 (1/2) or 1 (1/4), so its
    # 2.5th percentile is 0 and its 97.5th is 1; the mean difference is 0.5.
    d = _diff(_per_user([1.0, 0.5], [0.0, 0.5]), n_boot=2000)
    assert d == {"difference": 0.5, "ci95": [0.0, 1.0]}
    # Four users, differences +0.1, -0.1, +0.3, 0: mean 0.075; the CI holds it and lies within [-0.1, 0.3].
    d = _diff(_per_user([0.5, 0.2, 0.9, 0.0], [0.4, 0.3, 0.6, 0.0]))
    assert d["difference"] == pytest.approx(0.075)
    low, high = d["ci95"]
    assert -0.1 <= low < 0.075 < high <= 0.3
    assert _diff(_per_user([0.5, 0.2, 0.9, 0.0], [0.4, 0.3, 0.6, 0.0])) == d  # seeded


def test_gate_metrics_map_to_the_report_rows():
    assert gate_column("ndcg@10", 500) == ("two-stage", "ndcg@10")
    assert gate_column(POOL_RECALL, 300) == ("merged pool", "recall@300")


def _report(paired: dict[str, dict], version: int = 3) -> dict:
    rows = {"two-stage": {"ndcg@10": 0.30}, "merged pool": {"recall@500": 0.80},
            "popularity": {"ndcg@10": 0.10, "recall@500": 0.50}}
    return {"pool_size": 500, "rows": rows, "champion": {"version": version, "paired": paired}}


def _paired(ours: list[float], champion: list[float]) -> dict[str, float]:
    """A gate metric's paired difference, computed from per-user figures as evaluate_stage does."""
    return _diff(_per_user(ours, champion), n_boot=200)


def test_a_challenger_worse_by_more_than_the_tolerance_on_one_metric_fails_naming_it():
    # NDCG@10: per-user 0.40 vs 0.42 for every user: the challenger trails by 0.02 > 0.01.
    ndcg = _paired([0.40] * 5, [0.42] * 5)
    pool = _paired([0.81] * 5, [0.80] * 5)  # pool recall is better by 0.01
    decision = decide(_report({"ndcg@10": ndcg, POOL_RECALL: pool}), GateConfig(tolerance=0.01))
    assert not decision.passed and decision.alias is None  # the aliases stay where they are
    assert decision.reason == ("ndcg@10 trails the champion (version 3) by 0.0200 > tolerance 0.01 "
                               "(paired 95 % CI of the difference [-0.0200, -0.0200])")
    assert POOL_RECALL not in decision.reason
    assert decision.comparisons["ndcg@10"]["difference"] == pytest.approx(-0.02)
    assert decision.comparisons[POOL_RECALL]["difference"] == pytest.approx(0.01)


def test_every_failing_metric_is_named():
    paired = {"ndcg@10": {"difference": -0.03, "ci95": [-0.05, -0.01]},
              POOL_RECALL: {"difference": -0.2, "ci95": [-0.25, -0.15]}}
    decision = decide(_report(paired), GateConfig(tolerance=0.01))
    assert not decision.passed
    parts = decision.reason.split("; ")
    assert parts[0].startswith("ndcg@10 trails the champion (version 3) by 0.0300")
    assert parts[1].startswith("pool_recall trails the champion (version 3) by 0.2000")


@pytest.mark.parametrize("difference", [-0.0099, -0.01, 0.0, 0.2])
def test_a_challenger_within_the_tolerance_becomes_challenger(difference):
    paired = {m: {"difference": difference, "ci95": [difference - 0.01, difference + 0.01]}
              for m in ("ndcg@10", POOL_RECALL)}
    decision = decide(_report(paired), GateConfig(tolerance=0.01))
    assert decision.passed and decision.alias == "challenger"
    assert decision.reason == "within 0.01 of champion version 3 on ndcg@10, pool_recall"


def test_the_tolerance_and_the_gate_metrics_are_params():
    paired = {"ndcg@10": {"difference": -0.03, "ci95": [-0.04, -0.02]},
              "recall@10": {"difference": 0.0, "ci95": [0.0, 0.0]}}
    assert decide(_report(paired), GateConfig(metrics=["ndcg@10"], tolerance=0.05)).passed
    assert not decide(_report(paired), GateConfig(metrics=["ndcg@10"], tolerance=0.02)).passed
    assert decide(_report(paired), GateConfig(metrics=["recall@10"], tolerance=0.0)).passed
    with pytest.raises(KeyError):  # a gate metric the evaluation did not pair is an error, never a pass
        decide(_report(paired), GateConfig(metrics=[POOL_RECALL]))


def test_a_champion_tested_later_than_this_run_fails_the_gate_with_the_reason():
    reason = ("the champion (version 3) was tested from 2025-03-01T00:00:00+00:00, after this run's t_test "
              "2025-02-01T00:00:00+00:00: ...")
    report = _report({}) | {"champion": {"version": 3, "invalid": reason}}
    # Even a run that beats popularity by far is refused: the champion's figures are not comparable.
    decision = decide(report, GateConfig())
    assert not decision.passed and decision.alias is None and decision.reason == reason


def test_a_random_paired_ci_holds_its_mean():
    rng = np.random.default_rng(7)
    champion = rng.uniform(size=5)
    ours = champion + rng.normal(0, 0.1, size=5)
    d = _diff(_per_user(ours.tolist(), champion.tolist()))
    diffs = ours - champion
    assert d["difference"] == pytest.approx(diffs.mean())
    assert diffs.min() <= d["ci95"][0] <= d["difference"] <= d["ci95"][1] <= diffs.max()


# The champion branch of the evaluate task, end to end on the tiny catalog: a real MLflow registry (file store under
# tmp_path), the champion's bundle registered, both protocol fits ranked on this run's test users.


def _evaluate_against(home, champion_prefers_later: bool, champion_t_test: pd.Timestamp,
                      run_prefers_later: bool = True) -> dict:
    """``evaluate_stage`` of a run (test window from AT) whose source has a champion, then the gate's decision."""
    from pipeline_tasks.bundle.registry import GateDecision, register_version
    from pipeline_tasks.core.runs import run_dir, update_manifest
    from pipeline_tasks.online.bundle import BUNDLE_FILE, model_name
    from pipeline_tasks.stages.bundle import evaluate_stage

    run_id, namespace = "manual__challenger", "gate_ns"
    update_manifest(run_dir(run_id), config={"namespace": namespace, "two_tower": {"n_boot": 400}})
    history = tiny.history()
    split, accepted = home / "split", home / "accepted"
    split.mkdir()
    accepted.mkdir()
    history.to_parquet(split / "train.parquet", index=False)
    history.iloc[:0].to_parquet(split / "validation.parquet", index=False)
    # Test window: u1 finds i2 (its pool: i1 at i2i rank 1, i2 at rank 2), u3 finds i1 (its only candidate).
    pd.DataFrame({"user_id": ["u1", "u3"], "item_id": ["i2", "i1"], "timestamp": [tiny.AT, tiny.AT],
                  "event_type": "view"}).to_parquet(split / "test.parquet", index=False)
    (split / "split.json").write_text(json.dumps({"t_val": tiny.ts(20).isoformat(), "t_test": tiny.AT.isoformat()}))
    tiny.items().to_parquet(accepted / "items.parquet", index=False)
    ours = tiny.fit(history, run_prefers_later).save(home / "run_fit", {"fit": "protocol"})
    champion = home / "champion_bundle"
    tiny.fit(history, champion_prefers_later).save(champion / "protocol", {"fit": "protocol"})
    (champion / BUNDLE_FILE).write_text(json.dumps({"run_id": "manual__champion",
                                                    "t_test": champion_t_test.isoformat()}))
    register_version(model_name(namespace), champion.as_uri(), "", {"recsys.run_id": "manual__champion"},
                     GateDecision(True, "champion", "first model", {}))
    features = home / "features"
    features.mkdir()
    candidates = {"split_dir": str(split), "accepted_dir": str(accepted), "features_dir": str(features)}
    evaluated = evaluate_stage(run_id, candidates, {"fits": {"protocol": str(ours)}})
    report = json.loads(Path(evaluated["report"]).read_text())
    return {"report": report, "decision": decide(report, GateConfig(tolerance=0.01))}


def test_evaluate_pairs_the_champion_on_this_runs_users_and_the_gate_passes_a_better_run(mlflow_home):
    # This run's ranker puts u1's i2 first (NDCG 1); the champion's puts i1 first (NDCG 1/log2(3)). u3 has one
    # candidate: the same NDCG for both. The pools are the same: pool recall differs by 0 for every user.
    got = _evaluate_against(mlflow_home, champion_prefers_later=False, champion_t_test=tiny.AT)
    paired = got["report"]["champion"]["paired"]
    gain = (1 - 1 / np.log2(3)) / 2
    assert paired["ndcg@10"]["difference"] == pytest.approx(gain)
    # Two users, differences `2 gain` and 0: the resampled means are 0, gain or 2 gain (p = 1/4, 1/2, 1/4).
    assert paired["ndcg@10"]["ci95"] == pytest.approx([0.0, 2 * gain])
    assert paired[POOL_RECALL] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    rows = got["report"]["rows"]
    assert rows["two-stage"]["ndcg@10"] - rows["champion (two-stage)"]["ndcg@10"] == pytest.approx(gain)
    assert got["decision"].passed and got["decision"].alias == "challenger"


def test_evaluate_and_gate_refuse_a_run_that_trails_the_champion(mlflow_home):
    got = _evaluate_against(mlflow_home, champion_prefers_later=True, champion_t_test=tiny.AT, run_prefers_later=False)
    loss = (1 - 1 / np.log2(3)) / 2
    assert got["report"]["champion"]["paired"]["ndcg@10"]["difference"] == pytest.approx(-loss)
    decision = got["decision"]
    assert not decision.passed and decision.alias is None
    assert decision.reason.startswith(f"ndcg@10 trails the champion (version 1) by {loss:.4f} > tolerance 0.01 "
                                      f"(paired 95 % CI of the difference [{-2 * loss:+.4f}, +0.0000])")
    assert POOL_RECALL not in decision.reason


def test_a_champion_tested_after_this_runs_t_test_is_not_compared(mlflow_home):
    later = tiny.AT + pd.Timedelta(days=1)
    got = _evaluate_against(mlflow_home, champion_prefers_later=False, champion_t_test=later)
    champion = got["report"]["champion"]
    assert "paired" not in champion and champion["version"] == 1
    assert champion["invalid"].startswith(f"the champion (version 1) was tested from {later.isoformat()}, after this "
                                          f"run's t_test {tiny.AT.isoformat()}")
    assert not got["decision"].passed and got["decision"].reason == champion["invalid"]
