"""Ranking-stage benchmark on a finished run: ranking-set build rows/s, ranker training time, and one request's
ranker scoring and whole two-stage path (p50 / p99, one thread).

    .venv/bin/python tests/benchmarks/bench_ranking.py RUN_DIR [--requests 300]

RUN_DIR is a `recsys run` directory (`$RECSYS_HOME/runs/<run>`) whose ranking tasks ran. The ranking set is
rebuilt from the run's validation fit into a temporary file (the `ranking_set` task's work: candidates from every
source, Feast point-in-time features read once per cut, feature assembly, labels), so its rows/s and peak memory
are this process's. Prints the figures and the core count; `--json` writes them too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_ranking")


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000.0
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--requests", type=int, default=300, help="requests for the latency figures")
    parser.add_argument("--skip-build", action="store_true", help="skip the ranking-set rebuild")
    parser.add_argument("--recommend-users", type=int, default=5000,
                        help="users for the batch recommendation timing (0: skip)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("feast", "mlflow", "alembic", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = args.run_dir.resolve()
    os.environ.setdefault("RECSYS_HOME", str(run_dir.parents[1]))

    from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS
    from pipeline_tasks.online.two_stage import Moment, candidate_blocks, load_fit, rank_block
    from pipeline_tasks.ranking.dataset import build_ranking_set, label_grades
    from pipeline_tasks.ranking.fits import load_run_data, validation_truth
    from pipeline_tasks.stages.ranking import read_features

    manifest = json.loads((run_dir / "manifest.json").read_text())
    cands = manifest["tasks"]["candidates"]["outputs"]
    ranker_out = manifest["tasks"]["train_ranker"]["outputs"]
    data = load_run_data(cands["split_dir"], cands["accepted_dir"])
    figures: dict[str, object] = {"cores": os.cpu_count(), "run_dir": str(run_dir),
                                  "interactions": len(data.everything), "items": len(data.items)}

    if not args.skip_build:
        fit = load_fit(cands["fits"]["validation"])
        user_rows, item_rows = read_features(cands["features_dir"], "t_val")
        moment = Moment(data.t_val, data.train, data.items, data.users, user_rows, item_rows)
        truth = validation_truth(data)
        with tempfile.TemporaryDirectory() as tmp:
            stats = build_ranking_set(fit, moment, label_grades(data.train, data.validation),
                                      Path(tmp) / "validation.parquet", user_ids=list(truth))
        figures["ranking_set"] = {k: stats[k] for k in ("rows", "queries", "seconds", "rows_per_second",
                                                        "pool_recall")}
    figures["train_ranker"] = ranker_out.get("figures")
    figures["tune_ranker_seconds"] = manifest["tasks"]["tune_ranker"].get("seconds")

    # One request = one user's pool (rank_size candidates) scored by the protocol ranker on one thread.
    fit = load_fit(ranker_out["fits"]["protocol"])
    user_rows, item_rows = read_features(cands["features_dir"], "t_test")
    moment = Moment(data.t_test, data.trainval, data.items, data.users, user_rows, item_rows)
    users = sorted(data.trainval["user_id"].astype(str).unique())
    rng = np.random.default_rng(0)
    sample = [users[i] for i in rng.choice(len(users), size=min(args.requests, len(users)), replace=False)]
    block = next(candidate_blocks(fit, moment, sample[:50]))
    x = block.features[FEATURE_COLUMNS].to_numpy(np.float32)
    per = block.pool.groupby("query_id").size()
    n_cand = int(per.median())
    figures["ranker_scoring"] = []
    for n in sorted({500, n_cand}):
        scoring = []
        for i in range(args.requests):
            start = (i * n) % max(1, len(x) - n)
            rows = x[start:start + n]
            t = time.perf_counter()
            fit.ranker.predict(rows, num_threads=1)
            scoring.append(time.perf_counter() - t)
        figures["ranker_scoring"].append({"candidates": n, "features": len(FEATURE_COLUMNS),
                                          "trees": fit.ranker.num_trees(), **_pcts(scoring)})
    request = []
    for user in sample:
        t = time.perf_counter()
        for b in candidate_blocks(fit, moment, [user], fill_k=20):
            rank_block(fit, b, 20)
        request.append(time.perf_counter() - t)
    figures["two_stage_request"] = {"k": 20, "note": "candidates + features + ranker + rules, one user, in process",
                                    **_pcts(request)}
    if args.recommend_users:
        from pipeline_tasks.bundle.recommend import recommend
        from pipeline_tasks.online.bundle import load_bundle

        registered = manifest["tasks"]["register"]["outputs"]
        bundle = load_bundle(registered["model"], version=registered["version"])
        n = min(args.recommend_users, len(users))
        t = time.perf_counter()
        recs = recommend(bundle, users[:n], 20, data.everything["timestamp"].max() + np.timedelta64(1, "s"))
        figures["recommend"] = {"users": n, "k": 20, "rows": len(recs), "seconds": round(time.perf_counter() - t, 2),
                                "note": "recsys recommend's work: serving fit, history, Feast features, rules"}
    figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    text = json.dumps(figures, indent=2, default=str)
    print(text)  # noqa: T201 (a benchmark prints its figures)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
