"""The ranker's latency levers and what each costs in quality, on a finished run's protocol fit and test window.

    .venv/bin/python tests/benchmarks/bench_ranker_levers.py RUN_DIR [--pools 500:1000,500:500,250:250,100:100]
        [--trees 1,0.5,0.25] [--requests 300] [--json out.json]

RUN_DIR is a `recsys run` directory whose ranking tasks ran. Every variant ranks the protocol's test users at
``t_test`` with the shared request path (``ranked_lists``, no rules, as `evaluate`'s two-stage row) and is scored by
the shared protocol (NDCG@10, recall@10/@100/@500 with 95 % bootstrap CIs). Levers:

- candidates scored: ``pool_size:rank_size`` (each source's list length N, and how many of the fused pool the
  ranker scores; the default is ``N:2N``);
- model size: the first fraction of the ranker's trees (``--trees``; LightGBM's ``num_iteration``);
- compiled trees: the same model compiled by lleaves (the ``serving`` extra; skipped when missing), its
  scores compared with LightGBM's.

Per variant it also times the ranker alone on one request's candidates (``rank_size`` rows of the test pools,
one thread; p50 / p99 over ``--requests`` requests). Prints the table and the core count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_ranker_levers")


class _Recorded:
    """A ranker that scores with ``model`` and keeps the feature matrices it was given (for the timings)."""

    def __init__(self, predict: Any) -> None:
        self._predict = predict
        self.seen: list[np.ndarray] = []

    def predict(self, x: np.ndarray, num_threads: int = 1) -> np.ndarray:
        if sum(len(s) for s in self.seen) < 200_000:
            self.seen.append(np.asarray(x, np.float32))
        return self._predict(x)


def _timings(predict: Any, matrices: list[np.ndarray], rows: int, requests: int) -> dict[str, float]:
    """p50 / p99 (ms) of ``predict`` on ``requests`` slices of ``rows`` consecutive candidate rows."""
    x = np.concatenate(matrices)
    starts = np.arange(0, max(len(x) - rows, 1), rows)[:requests]
    out = []
    for s in starts:
        chunk = np.ascontiguousarray(x[s:s + rows])
        t = time.perf_counter()
        predict(chunk)
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(out, 50)), 3), "p99_ms": round(float(np.percentile(out, 99)), 3),
            "requests": len(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pools", default="500:1000,500:500,250:250,100:100",
                        help="pool_size:rank_size pairs to try (the first is the reference)")
    parser.add_argument("--trees", default="1,0.5,0.25", help="fractions of the ranker's trees to keep")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from pipeline_tasks.evaluation.metrics import evaluate, targets
    from pipeline_tasks.online.two_stage import Moment, load_fit, ranked_lists
    from pipeline_tasks.ranking.fits import load_run_data
    from pipeline_tasks.stages.ranking import read_features

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    cand = manifest["tasks"]["candidates"]["outputs"]
    trained = manifest["tasks"]["train_ranker"]["outputs"]
    data = load_run_data(cand["split_dir"], cand["accepted_dir"])
    fit = load_fit(trained["fits"]["protocol"])
    user_rows, item_rows = read_features(cand["features_dir"], "t_test")
    moment = Moment(data.t_test, data.trainval, data.items, data.users, user_rows, item_rows)
    truth, _ = targets(moment.history, data.test)
    users = list(truth)
    booster = fit.ranker
    n_trees = booster.num_trees()
    k = 500

    def run(name: str, config: Any, predict: Any, lever: str) -> dict[str, Any]:
        recorder = _Recorded(predict)
        variant = dataclasses.replace(fit, config=config, ranker=recorder)
        started = time.perf_counter()
        lists = ranked_lists(variant, moment, users, k, orders=("ranker",))["ranker"]
        seconds = time.perf_counter() - started
        recs = {u: [i for i, _ in items] for u, items in lists.items()}
        m = evaluate(recs, truth, len(fit.item_ids), ks=(10, 100, 500), n_boot=args.n_boot)
        row = {"variant": name, "lever": lever, "pool_size": config.pool_size, "rank_size": config.ranked,
               **{key: round(m[key], 4) for key in ("ndcg@10", "recall@10", "recall@100", "recall@500")},
               "ndcg@10_ci95": [round(v, 4) for v in m["ci95"]["ndcg@10"]],
               "ranker": _timings(predict, recorder.seen, config.ranked, args.requests),
               "lists_seconds": round(seconds, 1)}
        log.info("%s", row)
        return {**row, "_recs": recs}

    rows = []
    pools = [tuple(int(v) for v in p.split(":")) for p in args.pools.split(",") if p]
    for pool_size, rank_size in pools:
        config = dataclasses.replace(fit.config, pool_size=pool_size, rank_size=rank_size)
        rows.append(run(f"N={pool_size}, ranker scores {rank_size}", config,
                        lambda x: booster.predict(x, num_threads=1), "candidates"))
    reference = rows[0]
    for fraction in (float(f) for f in args.trees.split(",") if f):
        if fraction >= 1.0:
            continue
        trees = max(1, int(round(n_trees * fraction)))
        rows.append(run(f"first {trees} of {n_trees} trees", fit.config,
                        lambda x, t=trees: booster.predict(x, num_iteration=t, num_threads=1), "model size"))
    compiled: dict[str, Any] = {}
    try:
        import lleaves
    except ImportError:
        compiled = {"skipped": "lleaves is not installed (pip install -e '.[serving]')"}
        log.warning(compiled["skipped"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ranker.txt"
            booster.save_model(str(path))
            started = time.perf_counter()
            model = lleaves.Model(model_file=str(path))
            model.compile(cache=str(Path(tmp) / "ranker.so"))
            compile_s = time.perf_counter() - started
            row = run(f"lleaves, all {n_trees} trees", fit.config, lambda x: model.predict(x, n_jobs=1),
                      "compiled trees")
            probe = np.random.default_rng(0).normal(size=(2000, booster.num_feature())).astype(np.float32)
            diff = float(np.max(np.abs(model.predict(probe.astype(np.float64), n_jobs=1) -
                                       booster.predict(probe, num_threads=1))))
            compiled = {"compile_s": round(compile_s, 1), "max_abs_score_diff": diff,
                        "same_lists": row["_recs"] == reference["_recs"]}
            rows.append({**row, **compiled})
    reference_recs = reference["_recs"]
    for row in rows:
        row["same_lists_as_reference"] = row.pop("_recs") == reference_recs
    result = {"run_dir": str(args.run_dir), "trees": n_trees, "test_users": len(users), "cpu_count": os.cpu_count(),
              "rows": rows, "compiled": compiled}
    print(f"{'variant':34} {'NDCG@10':>8} {'95% CI':>16} {'R@10':>7} {'R@100':>7} {'R@500':>7} "
          f"{'ranker p50':>10} {'p99 ms':>7}")
    for row in rows:
        lo, hi = row["ndcg@10_ci95"]
        print(f"{row['variant']:34} {row['ndcg@10']:8.4f} {f'[{lo:.3f}, {hi:.3f}]':>16} {row['recall@10']:7.4f} "
              f"{row['recall@100']:7.4f} {row['recall@500']:7.4f} {row['ranker']['p50_ms']:10.3f} "
              f"{row['ranker']['p99_ms']:7.3f}")
    print(f"{len(users)} test users, {n_trees} trees, {os.cpu_count()} cores; compiled: {compiled}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
