"""Benchmark: wall time of build_features (PySpark daily snapshots) on ml-100k and 1M synthetic events.

Usage: .venv/bin/python tests/benchmarks/bench_features.py [--datasets ml100k,synthetic_1m] [--repeats 3]
       [--master 'local[*]']
Each repeat writes into a fresh directory; the first repeat of a session also pays the JVM's
warm-up (JIT, code generation), so the median and the first run are both printed, with the
machine's core count. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline_tasks.data.contract import write_contract_dir

log = logging.getLogger("bench")

ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"
SYNTHETIC_1M = {"n_users": 20_000, "n_items": 50_000, "n_days": 120, "n_events": 1_000_000}


def _prepare(name: str, directory: Path) -> int:
    """Write the dataset's contract directory; returns its interaction count."""
    if name == "ml100k":
        from pipeline_tasks.data.movielens import load_movielens

        tables = load_movielens(ML100K)
    elif name == "synthetic_1m":
        from pipeline_tasks.data.synthetic import SyntheticConfig, generate

        tables = generate(SyntheticConfig(**SYNTHETIC_1M)).tables
    else:
        raise SystemExit(f"unknown dataset {name!r}; use ml100k or synthetic_1m")
    write_contract_dir(tables, directory)
    return len(tables.interactions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="ml100k,synthetic_1m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--master", default="local[*]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from pipeline_tasks.features.snapshots import build_features
    from pipeline_tasks.features.spark import get_spark

    results: dict = {"cores": os.cpu_count(), "master": args.master, "repeats": args.repeats, "datasets": {}}
    t0 = time.perf_counter()
    spark = get_spark(master=args.master, app_name="bench-features")
    spark.sparkContext.setLogLevel("ERROR")
    results["spark_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name in args.datasets.split(","):
                events = _prepare(name, root / name / "contract")
                seconds, out = [], {}
                for i in range(args.repeats):
                    start = time.perf_counter()
                    out = build_features(spark, root / name / "contract", root / name / f"out{i}")
                    seconds.append(time.perf_counter() - start)
                    log.info("%s run %d: %.1f s, rows %s", name, i, seconds[-1], out["rows"])
                results["datasets"][name] = {
                    "events": events,
                    "rows": out["rows"],
                    "days": out["days"],
                    "first_run_s": round(seconds[0], 2),
                    "median_s": round(statistics.median(seconds), 2),
                    "runs_s": [round(s, 2) for s in seconds],
                    "events_per_s_median": round(events / statistics.median(seconds)),
                }
    finally:
        spark.stop()
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
