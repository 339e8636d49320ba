"""Benchmark: validation (GX suites + quarantine + Data Docs) and time split throughput.

Usage: .venv/bin/python tests/benchmarks/bench_validate_split.py [--events 1000000] [--repeats 3]
Prints rows/s (median of the repeats) and the machine's core count. Not run in CI.
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

from pipeline_tasks.core.settings import disable_telemetry
from pipeline_tasks.data.contract import write_contract_dir
from pipeline_tasks.data.split import SplitConfig, split_contract_dir
from pipeline_tasks.data.synthetic import FaultConfig, SyntheticConfig, generate
from pipeline_tasks.data.validate import ValidationConfig, validate_contract_dir

log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    disable_telemetry()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = SyntheticConfig(n_users=20_000, n_items=50_000, n_days=120, n_events=args.events,
                              faults=FaultConfig.all())
        data = generate(cfg)
        write_contract_dir(data.tables, root / "src")
        rows = len(data.tables.interactions)
        validate_s, split_s = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            out = validate_contract_dir(root / "src", root / f"val{i}", ValidationConfig())
            t1 = time.perf_counter()
            split_contract_dir(out["accepted_dir"], root / f"split{i}", SplitConfig())
            t2 = time.perf_counter()
            validate_s.append(t1 - t0)
            split_s.append(t2 - t1)
        total = [v + s for v, s in zip(validate_s, split_s, strict=True)]
        result = {
            "cores": os.cpu_count(),
            "input_rows": rows,
            "quarantined": out["counts"]["interactions"]["quarantined"],
            "repeats": args.repeats,
            "validate_s_median": round(statistics.median(validate_s), 2),
            "split_s_median": round(statistics.median(split_s), 2),
            "total_s_median": round(statistics.median(total), 2),
            "total_s_max": round(max(total), 2),
            "rows_per_s_median": round(rows / statistics.median(total)),
        }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
