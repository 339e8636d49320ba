"""The recsys_training DAG run for real (`recsys run` -> `airflow dags test`) on synthetic data with
every fault injected, on a failing quality gate, on MovieLens 100K and on a CSV contract directory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline_tasks.cli import _json_lines
from pipeline_tasks.data.ingest import synthetic_config
from pipeline_tasks.data.synthetic import generate

pytestmark = pytest.mark.integration

# These tests are about ingest/validate/split; test_movielens_100k runs every task.
LATER_TASKS = ["--mark-success",
               "build_features|feast_apply|materialize|training_set|drift_check|train_two_tower|build_index|"
               "candidates|ranking_set|tune_ranker|train_ranker|evaluate|register|build_bento"]

FAULT_REASONS = {
    "null": {"missing_user_id", "missing_item_id", "missing_or_unparseable_timestamp"},
    "duplicate": {"duplicate"},
    "future": {"future_timestamp"},
    "too_old": {"too_old_timestamp"},
    "unknown_event": {"unknown_event_type"},
    "bad_id": {"invalid_user_id", "invalid_item_id"},
    "bot": {"bot"},
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_synthetic_with_every_fault(run_recsys):
    run = run_recsys("run", "--data", "synthetic", "--events", "40000", "--seed", "7",
                     "--faults", "all", "--quality-threshold", "0.9", *LATER_TASKS)
    assert run.returncode == 0, run.output[-4000:]
    assert run.manifest["tasks"]["split"]["status"] == "success"
    report = _read_json(run.run_dir / "validate" / "report.json")
    t = report["tables"]["interactions"]
    assert t["input"] == t["accepted"] + t["quarantined"]
    # Exactly the injected rows are quarantined, each with the reason of its fault class.
    config = synthetic_config({**run.manifest["config"]["synthetic"], "faults": "all"})
    data = generate(config)
    assert len(data.tables.interactions) == t["input"]
    q = pd.read_parquet(run.run_dir / "validate" / "quarantine" / "interactions.parquet")
    reasons = dict(zip(q["input_row"], q["reasons"].map(list), strict=True))
    expected_rows = set()
    for fault, allowed in FAULT_REASONS.items():
        rows = data.injected[fault]
        assert len(rows) > 0, f"generator injected no {fault} rows"
        for r in rows:
            assert r in reasons, f"{fault} row {r} was accepted"
            assert set(reasons[r]) <= allowed and reasons[r], f"{fault} row {r}: {reasons[r]}"
        expected_rows |= set(map(int, rows))
    assert set(map(int, reasons)) == expected_rows, "rows quarantined that carry no injected fault"
    # The spike is reported, not quarantined.
    spike_day = pd.Timestamp(config.start) + pd.Timedelta(days=int(data.injected["spike_day"][0]))
    assert spike_day.date().isoformat() in [s["day"] for s in report["spikes"]]
    split = _read_json(run.run_dir / "split" / "split.json")
    assert sum(split["counts"].values()) == t["accepted"]
    assert (run.run_dir / "validate" / "data_docs" / "index.html").exists()
    assert run.manifest["data"]["snapshot_sha256"] and run.manifest["input_rows"]["interactions"] == t["input"]


def test_quality_gate_fails_the_run_without_retry(run_recsys):
    run = run_recsys("run", "--data", "synthetic", "--events", "20000", "--faults", "0.03", *LATER_TASKS)
    assert run.returncode != 0
    assert "Data quality gate failed" in run.output
    assert "Top reasons:" in run.output
    assert "AirflowFailException" in run.output
    tasks = run.manifest["tasks"]
    assert tasks["validate"]["status"] == "failed" and "split" not in tasks
    # No retry: the validate task ran once and is failed (not up_for_retry).
    res = subprocess.run([str(Path(sys.executable).parent / "airflow"), "tasks", "states-for-dag-run",
                          "recsys_training", run.run_id, "-o", "json"], capture_output=True, text=True, check=True)
    states = {s["task_id"]: s for s in _json_lines(res.stdout)}
    assert states["validate"]["state"] == "failed"
    assert states["split"]["state"] == "upstream_failed"
    # The evidence is there for the user to open.
    q = pd.read_parquet(run.run_dir / "validate" / "quarantine" / "interactions.parquet")
    assert len(q) > 0


def test_movielens_100k(ml100k_run, ml100k, bench_protocol, caplog):
    run = ml100k_run.run
    report = _read_json(run.run_dir / "validate" / "report.json")
    assert report["tables"]["interactions"] == {"input": 100_000, "accepted": 100_000, "quarantined": 0,
                                                "reasons": {}}
    split = _read_json(run.run_dir / "split" / "split.json")
    assert split["counts"] == {"train": 79_999, "validation": 10_001, "test": 10_000}
    # Same boundaries as the independent implementation, reading the run's accepted contract dir.
    _, _, _, t_val, t_test = bench_protocol.split(run.run_dir / "validate" / "accepted")
    assert pd.Timestamp(split["t_val"]) == t_val and pd.Timestamp(split["t_test"]) == t_test
    # Every task ran: features, Feast, the training set, the drift check, the retrieval model and its index.
    assert {t: i["status"] for t, i in run.manifest["tasks"].items()} == {
        t: "success" for t in ("ingest", "validate", "split", "build_features", "feast_apply", "materialize",
                               "training_set", "drift_check", "train_two_tower", "build_index", "candidates",
                               "ranking_set", "tune_ranker", "train_ranker", "evaluate", "register",
                               "build_bento")}
    ts = pd.read_parquet(run.manifest["tasks"]["training_set"]["outputs"]["training_set"])
    requested = pd.concat([pd.read_parquet(run.run_dir / "split" / f"{w}.parquet")
                           for w in ("train", "validation", "test")])
    assert len(ts) == 100_000  # one row per requested row (all three windows), in order
    assert ts["user_id"].tolist() == requested["user_id"].tolist()
    assert ts["item_id"].tolist() == requested["item_id"].tolist()
    assert {"user_total_interactions", "item_popularity", "hour_sin", "user_category_share"} <= set(ts.columns)
    # Users rate most of their films on their first day: no snapshot is valid yet then (point in time).
    assert 0.1 < ts["user_total_interactions"].notna().mean() < 0.9
    drift = _read_json(run.run_dir / "drift_check" / "drift_report.json")
    assert drift["threshold"] == 0.2 and "event_type" in drift["features"]
    assert (run.run_dir / "drift_check" / "drift_report.html").stat().st_size > 100_000
    _check_feature_history(run)
    _check_retrieval(run)
    _check_ranking(run, ml100k_run.registered, caplog)


def _check_feature_history(run):
    """The run's source has its own namespace; the partitions it may read are recorded with checksums."""
    from pipeline_tasks.features.snapshots import partition_sha256

    namespace = run.manifest["config"]["namespace"]
    assert namespace.startswith("movielens_ml_100k_")
    features = run.manifest["features"]
    assert features["namespace"] == namespace and features["feature_store"].endswith(f"feature_store/{namespace}")
    assert features["last_day"] == "1998-04-22"  # the last day with an event: every day of 1998 is over
    for table in ("user_features", "item_features"):
        recorded = features["partitions"][table]
        assert max(recorded) == features["last_day"] and len(recorded) > 200
        part = Path(features["feature_store"]) / "offline" / table / f"snapshot_date={features['last_day']}"
        assert partition_sha256(part)[0] == recorded[features["last_day"]]


def _check_retrieval(run):
    """The two-tower stage followed the protocol on the real split and the index serves the whole catalog."""
    import mlflow

    from pipeline_tasks.online.index import load_index

    metrics = _read_json(run.run_dir / "train_two_tower" / "metrics.json")
    assert metrics["test_users"] == 90 and metrics["items"] == 1682  # DATA_CONTRACT.md: 90 test users
    assert metrics["content_method"] == "minilm"
    tt, mf, pop = (metrics["models"][m]["test"] for m in ("two_tower", "mf", "popularity"))
    for m in (tt, mf, pop):
        assert m["users"] == 90 and m["ci95"]["recall@100"][0] <= m["recall@100"] <= m["ci95"]["recall@100"][1]
    trial = metrics["models"]["two_tower"]["trials"][0]
    assert trial["history"][0]["loss"] > trial["history"][-1]["loss"]  # it learned
    # The team's bar (README): above popularity and our MF on recall@100 and @500.
    for k in ("recall@100", "recall@500"):
        assert tt[k] > pop[k] and tt[k] > mf[k], (k, tt[k], pop[k], mf[k])
    built = run.manifest["tasks"]["build_index"]["outputs"]
    index = load_index(built["index_dir"])
    assert built["kind"] == "flat" and built["recall_at_k"] == 1.0 and len(index.item_ids) == 1682
    assert built["sha256"] == index.sha256 and Path(built["index_dir"]).is_relative_to(run.run_dir)  # staged only
    assert not (Path(run.manifest["run_dir"]).parents[1] / "indexes" / "current.json").exists()
    source_path = Path(run.manifest["config"]["source"].removeprefix("movielens:")).resolve()
    assert index.meta["parent"]["source"] == f"movielens:{source_path}"  # the catalog the refresh reads
    # MLflow has the run with its lineage, curves and test metrics.
    out = run.manifest["tasks"]["train_two_tower"]["outputs"]
    out_ts = run.manifest["tasks"]["training_set"]["outputs"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(run.manifest['run_dir']).parents[1]}/mlflow/mlflow.db")
    logged = client.get_run(out["mlflow_run_id"])
    experiment = client.get_experiment(logged.info.experiment_id).name
    assert experiment == out["mlflow_experiment"] == f"recsys_retrieval_{run.manifest['config']['namespace']}"
    assert logged.data.tags["recsys.data_snapshot_sha256"] == run.manifest["data"]["snapshot_sha256"]
    assert logged.data.tags["recsys.run_id"] == run.run_id
    # tagged with the service the training examples' features came from
    assert logged.data.tags["recsys.feature_service"] == out_ts["feature_service"] == "ranker_v1"
    assert logged.data.metrics["test.two_tower.recall_at_100"] == pytest.approx(tt["recall@100"])
    assert "index.latency_ms_p99" in logged.data.metrics
    assert len(client.get_metric_history(logged.info.run_id, "two_tower.trial0.loss")) == len(trial["history"])


SERVING_PROBE = """
import json, os, sys
import pandas as pd
from pipeline_tasks.online.bundle import open_bundle
from pipeline_tasks.online.two_stage import Moment, candidate_blocks, load_fit, rank_block

bundle = open_bundle(sys.argv[1])
fit = load_fit(bundle.fit_dir("serving"))
accepted = bundle.meta["accepted_dir"]
history = pd.read_parquet(accepted + "/interactions.parquet")
moment = Moment(history["timestamp"].max(), history, pd.read_parquet(accepted + "/items.parquet"))
recs = [rank_block(fit, block, 20) for block in candidate_blocks(fit, moment, [sys.argv[2]], fill_k=20)][0]
heavy = ("pyspark", "airflow", "optuna", "great_expectations", "evidently", "pipeline_tasks.retrieval",
         "pipeline_tasks.stages", "pipeline_tasks.features", "pipeline_tasks.data", "pipeline_tasks.evaluation",
         "pipeline_tasks.ranking", "pipeline_tasks.bundle", "mlflow")
loaded = sorted({m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy)})
print(json.dumps({"items": [i for i, _ in recs[sys.argv[2]]], "loaded": loaded}), flush=True)
os._exit(0)
"""


def _check_ranking(run, registered, caplog):
    """Two-stage evaluation, no leakage into the ranker's candidates, the registry and the bundle round trip."""
    import numpy as np

    from pipeline_tasks.online.bundle import load_bundle
    from pipeline_tasks.online.candidates import CandidateConfig, build_item_graph
    from pipeline_tasks.online.two_stage import load_fit
    from pipeline_tasks.ranking.fits import content_vectors, load_run_data

    tasks = run.manifest["tasks"]
    report = _read_json(Path(tasks["evaluate"]["outputs"]["report"]))
    rows = report["rows"]
    assert report["test_users"] == 90 and report["pool_size"] == 500
    assert {"popularity", "recent popularity", "two-tower alone", "merged pool", "two-stage",
            "two-stage + rules"} <= set(rows)
    two_stage = rows["two-stage"]
    assert two_stage["ndcg@10"] > rows["popularity"]["ndcg@10"]
    assert two_stage["ci95"]["ndcg@10"][0] <= two_stage["ndcg@10"] <= two_stage["ci95"]["ndcg@10"][1]
    assert {"gini@10", "novelty@10", "ild@10", "category_diversity@10", "coverage@10"} <= set(two_stage)
    assert set(report["source_recall"]) == {"two_tower", "i2i", "content", "trending", "popularity", "merged pool"}
    html = Path(tasks["evaluate"]["outputs"]["html"]).read_text()
    assert "Two-stage evaluation" in html and "plotly" in html.lower()

    # No leakage: the validation fit (the ranker's training candidates) saw only events before t_val.
    data = load_run_data(run.run_dir / "split", run.run_dir / "validate" / "accepted")
    fits = tasks["candidates"]["outputs"]["fits"]
    validation = load_fit(fits["validation"])
    assert validation.model.encoder.user_ids == sorted(data.train["user_id"].astype(str).unique())
    rebuilt = build_item_graph(data.train, validation.item_ids, content_vectors(validation.model),
                               CandidateConfig.from_params(validation.config.to_dict()))
    assert (rebuilt.cooccurrence != validation.graph.cooccurrence).nnz == 0  # the graph is train-only
    leaked = build_item_graph(data.trainval, validation.item_ids, content_vectors(validation.model),
                              CandidateConfig.from_params(validation.config.to_dict()))
    assert (leaked.cooccurrence != validation.graph.cooccurrence).nnz > 0  # (the check can tell them apart)
    ranking = pd.read_parquet(tasks["ranking_set"]["outputs"]["validation"]["path"],
                              columns=["user_id", "item_id", "label"])
    positives = ranking[ranking["label"] > 0]
    assert len(positives) > 0
    label_pairs = set(zip(positives["user_id"], positives["item_id"], strict=True))
    val_pairs = set(zip(data.validation["user_id"].astype(str), data.validation["item_id"].astype(str), strict=True))
    train_pairs = set(zip(data.train["user_id"].astype(str), data.train["item_id"].astype(str), strict=True))
    assert label_pairs <= val_pairs and not label_pairs & train_pairs  # labels: new items of the next window

    # The registry: version 1, first model, beats popularity -> champion; lineage on the bundle.
    assert registered["version"] == 1 and registered["gate"] == "passed" and registered["alias"] == "champion"
    bundle = load_bundle(registered["model"])
    assert bundle.version == 1 and bundle.aliases == ["champion"]
    assert bundle.meta["data_snapshot_sha256"] == run.manifest["data"]["snapshot_sha256"]
    assert bundle.meta["feature_service"] == "ranker_v1" and bundle.meta["code"]["git_sha"]
    assert bundle.meta["index"]["sha256"] == tasks["build_index"]["outputs"]["sha256"]
    assert bundle.tags["recsys.run_id"] == run.run_id

    # Round trip: `recsys recommend` with the registered protocol fit reproduces the evaluated lists.
    lists = pd.read_parquet(tasks["evaluate"]["outputs"]["lists"])
    users = sorted(lists["user_id"].unique())[:25]
    users_file = run.run_dir.parent / "round_trip_users.txt"
    users_file.write_text("\n".join(users))
    out = run.run_dir.parent / "round_trip.parquet"
    res = subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", "recommend", "--users", str(users_file),
                          "--k", "500", "--as-of", report["t_test"], "--fit", "protocol", "--no-rules",
                          "--model", registered["model"], "--model-version", "1", "--output", str(out)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = pd.read_parquet(out)
    for user in users:
        expected = lists[lists["user_id"] == user].sort_values("rank")["item_id"].tolist()
        assert got[got["user_id"] == user].sort_values("rank")["item_id"].tolist() == expected, user
    assert np.isfinite(got["score"]).all()

    # A cold user and a request long after the newest snapshot: trending for the one, a warning (never nulls).
    users_file.write_text("no_such_user\n" + users[0])
    from typer.testing import CliRunner

    from pipeline_tasks.cli import app

    with caplog.at_level(logging.WARNING, logger="pipeline_tasks.bundle.recommend"):
        res = CliRunner().invoke(app, ["recommend", "--users", str(users_file), "--k", "20", "--as-of",
                                       "1998-09-01T00:00:00+00:00", "--model", registered["model"],
                                       "--output", str(out)])
    assert res.exit_code == 0, res.output[-3000:]
    assert "past the newest feature snapshot" in caplog.text and "using the newest snapshot" in caplog.text
    got = pd.read_parquet(out)
    assert got.groupby("user_id").size().to_dict() == {"no_such_user": 20, users[0]: 20}
    seen = set(data.everything.loc[data.everything["user_id"].astype(str) == users[0], "item_id"].astype(str))
    assert not seen & set(got.loc[got["user_id"] == users[0], "item_id"])

    # What serving will do: the champion's serving fit through `online` alone, no training code loaded.
    probe = subprocess.run([sys.executable, "-c", SERVING_PROBE, str(bundle.path), users[0]],
                           capture_output=True, text=True, check=False, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    served = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(served["items"]) == 20 and len(set(served["items"])) == 20 and served["loaded"] == []


def test_csv_contract_directory(run_recsys, tmp_path, ml100k):
    from pipeline_tasks.data.movielens import load_movielens

    tables = load_movielens(ml100k)
    src = tmp_path / "csv_source"
    src.mkdir()
    inter = tables.interactions.head(5000).copy()
    inter["timestamp"] = inter["timestamp"].map(lambda t: t.isoformat())  # ISO-8601 with offset
    inter.drop(columns=["raw_timestamp", "raw_value"]).to_csv(src / "interactions.csv", index=False)
    tables.items.to_csv(src / "items.csv", index=False)
    run = run_recsys("run", "--data", str(src), *LATER_TASKS)
    assert run.returncode == 0, run.output[-4000:]
    accepted = pd.read_parquet(run.run_dir / "validate" / "accepted" / "interactions.parquet")
    assert len(accepted) == 5000
    assert str(accepted["timestamp"].dtype) == "datetime64[ns, UTC]"
    users = pd.read_parquet(run.run_dir / "validate" / "accepted" / "users.parquet")
    assert set(users["user_id"]) == set(accepted["user_id"])  # every mentioned user has a row
